"""`flava search`: the nearest items of an index to a text or an image."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def add(sub) -> None:
    p = sub.add_parser("search", help="search a vector index by text or by image")
    p.add_argument("--index", required=True, help="an index directory (`flava index`)")
    p.add_argument("--model", help="the model that embeds the query (default: the checkpoint that made the index; "
                   "another checkpoint is refused)")
    p.add_argument("--allow-other-model", dest="allow_other_model", action="store_true",
                   help="rank with --model's queries although it is not the checkpoint that made the index "
                        "(the scores then compare two models; a warning says so)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a text query")
    what.add_argument("--image", help="an image file as the query")
    p.add_argument("-k", type=int, default=10, help="how many results (default 10)")
    p.add_argument("--json", action="store_true", help="print a JSON list of {position, item, score, metadata}")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> None:
    import sys

    from ..errors import InputError
    from ..retrieval.embed import Embedder
    from ..retrieval.index import VectorIndex, query_model
    from .embed import load_for_inference

    if args.k < 1:
        raise InputError(f"-k must be at least 1; got {args.k}")
    if args.text is not None and not args.text.strip():
        raise InputError("the --text query is empty")
    if args.image is not None and not Path(args.image).is_file():
        raise InputError(f"--image {args.image}: " + ("a folder; give one image file" if Path(args.image).is_dir()
                                                      else "no such file"))
    index = VectorIndex.open(args.index)
    name, warning = query_model(index, args.model, args.allow_other_model)
    if warning:
        print(warning, file=sys.stderr)
    # Queries embedded as the index's vectors were: int8 activations are quantized otherwise.
    embedder = Embedder(load_for_inference(name, None, bool(index.int8)))
    query = embedder.texts([args.text]) if args.text is not None else embedder.images([args.image])
    hits = index.search(query, args.k)[0]
    if args.json:
        print(json.dumps([{"position": h.position, "item": h.item, "score": round(h.score, 6),
                           "metadata": h.metadata} for h in hits], ensure_ascii=False))
        return
    table = Table(title=escape(f"{len(hits)} nearest of {len(index)} in {args.index}"))
    for col in ("#", "score", "item"):
        table.add_column(col)
    extra = sorted({k for h in hits for k in h.metadata} - {"image_path", "caption"} - {h.field for h in hits})
    for col in extra:
        table.add_column(escape(col))
    for rank, h in enumerate(hits, 1):  # captions and metadata are the data's text, never markup
        table.add_row(str(rank), f"{h.score:.4f}", escape(h.item),
                      *["" if h.metadata.get(c) is None else escape(str(h.metadata[c])) for c in extra])
    console.print(table)
