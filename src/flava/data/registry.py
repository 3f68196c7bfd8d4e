"""Open any data spec as a source of one kind: the one function training and evaluation share.

Pairs: WebDataset `.tar` shards (a file, a directory of shards or a glob), `.csv`/`.tsv` files of
image path + caption, parquet files or Hugging Face datasets saved to disk. Images: folders
(class sub-folders give labels), parquet, datasets. Text: `.txt`/`.jsonl`, parquet, datasets.
An empty spec list means the packaged demo data of that kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from ..errors import DataError
from . import arrow, demo, sources
from .sources import Source

Kind = Literal["pairs", "images", "text"]
KINDS: tuple[Kind, ...] = ("pairs", "images", "text")


def open_source(kind: Kind, spec: str) -> Source:
    """One data spec read as a source of `kind`."""
    spec = str(spec)
    if arrow.is_arrow_spec(spec):
        return {"pairs": arrow.arrow_pairs, "images": arrow.arrow_images, "text": arrow.arrow_text}[kind](spec)
    if kind == "pairs":
        return sources.csv_pairs(spec) if spec.lower().endswith(sources.TABLE_SUFFIXES) else sources.tar_pairs(spec)
    if kind == "images":
        return sources.image_folder(spec)
    if kind == "text":
        return sources.text_file(spec)
    raise DataError(f"unknown data kind {kind!r}; choose one of {', '.join(KINDS)}")


_DEMO = {"pairs": demo.easy_vqa_pairs, "images": demo.demo_image_source, "text": demo.bbc_news_text}


def open_sources(kind: Kind, specs: Sequence[str]) -> Source:
    """Several specs of one kind as one source (their records in order); none: the demo data."""
    if not specs:
        src = _DEMO[kind]()
    else:
        parts = [open_source(kind, s) for s in specs]
        src = parts[0]
        for extra in parts[1:]:
            src.records += extra.records
            src.rejected += extra.rejected
    if len(src) == 0:
        raise DataError(f"the {kind} data ({', '.join(map(str, specs)) or 'demo'}) holds no usable record")
    return src
