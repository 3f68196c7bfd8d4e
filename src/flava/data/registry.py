"""Open any data spec as a source of one kind: the one function training and evaluation share.

Pairs: WebDataset `.tar` shards (files, directories, globs, brace ranges, URLs, `pipe:` commands,
or a shard index written by `flava prepare`), CSV/TSV/JSONL tables of image path + caption (read
by `data.tables`), parquet files or Hugging Face datasets saved to disk. Images: folders (class
sub-folders give labels), tar shards, parquet, datasets. Text: `.txt`/`.jsonl` (optionally
compressed; local, remote), parquet, datasets. An empty spec list means the packaged demo data of that kind.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from ..errors import DataError
from . import arrow, demo, sources, tables, tars, texts
from .images import IMAGE_SUFFIXES, RealPaths, files_below, find_images, holds_below, passed_over, walk_files
from .shards import ShardCache, bare_name, is_remote
from .sources import Source

Kind = Literal["pairs", "images", "text"]
KINDS: tuple[Kind, ...] = ("pairs", "images", "text")


def _shards_in(folder: Path) -> list[str]:
    """The tar shards (plain or compressed) below `folder`, as paths relative to it."""
    return [str(q.relative_to(folder)) for q in files_below(folder, tars.TAR_SUFFIXES)]


def _is_tar_spec(spec: str) -> bool:
    p = Path(spec)
    if not is_remote(spec) and p.is_dir():  # by what it holds, whatever its name ("my.tar_files/")
        return (p / tars.INDEX).is_file() or holds_below(p, tars.TAR_SUFFIXES)
    low = spec.lower().rstrip("/")
    return low.endswith((".tar", ".tgz", ".json", "}")) or low.startswith("pipe:") or ".tar" in low


def _img2dataset_output(spec: str) -> bool:
    """A folder of shards each with its metadata table beside it (NNNNN.tar + NNNNN.parquet: urls
    and captions, no image), as img2dataset writes them: its shards are the data."""
    p = Path(spec)
    if is_remote(spec) or not p.is_dir():
        return False
    stems = {_stem(name) for name in _shards_in(p)}
    metadata = [_stem(str(q.relative_to(p))) for q in files_below(p, (".parquet",))]
    return bool(metadata) and all(stem in stems for stem in metadata)


def _stem(relative: str) -> str:
    """A file's path without its suffixes: p1/00000.tar.gz -> p1/00000."""
    head, _, name = relative.rpartition("/")
    return f"{head}/{name.split('.', 1)[0]}" if head else name.split(".", 1)[0]


def _refuse_shards_beside_images(spec: str) -> None:
    """A folder read as shards leaves out the images beside them (a class folder's sub-folders,
    a preview), unsaid: refused, naming both."""
    p = Path(spec)
    if is_remote(spec) or not p.is_dir():
        return
    shard = image = None
    for q in walk_files(p):  # one walk, ended once both are met (a shard folder is walked again to read it)
        if shard is None and q.name.lower().endswith(tars.TAR_SUFFIXES):
            shard = q
        elif image is None and q.suffix.lower() in IMAGE_SUFFIXES:
            image = q
        if shard is not None and image is not None:
            suffix = "." + shard.name.split(".", 1)[1]
            raise DataError(f"{spec} holds both shards ({shard.relative_to(p)}) and image files "
                            f"({image.relative_to(p)}): name the shards alone ({p / ('*' + suffix)}), or move the "
                            "shards out of it to read the images")


def open_source(kind: Kind, spec: str, cache: ShardCache | None = None) -> Source:
    """One data spec read as a source of `kind`; remote shards go through `cache` when given."""
    spec = str(spec)
    if kind not in KINDS:
        raise DataError(f"unknown data kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not spec.strip():  # as a path, "" is the working folder: whatever lies there would be read
        raise DataError(f"an empty {kind} source names nothing; give a file, folder, glob or URL")
    missing = None if is_remote(spec) else arrow.missing_with_columns(spec)
    if missing is not None:  # read as shards, it was "no tar shards match PATH?image=jpg"
        raise DataError(f"{missing} does not exist (named by {spec}, whose columns after '?' a parquet file or a "
                        "`datasets` directory takes)")
    if is_remote(spec) and arrow.is_arrow_spec(spec):  # read as a local path, it "matched nothing"
        also = ", .txt or .jsonl files" if kind == "text" else ""
        raise DataError(f"{spec}: parquet is read from local files; copy it here and name its local path (remote "
                        f"{kind} are read from WebDataset shards{also})")
    if arrow.is_arrow_spec(spec) and not _img2dataset_output(spec):
        return {"pairs": arrow.arrow_pairs, "images": arrow.arrow_images, "text": arrow.arrow_text}[kind](spec)
    _refuse_tables_as_several(kind, spec)
    if kind == "text":
        return texts.text_file(spec, cache=cache)
    if kind == "images" and tables.is_table(spec) and not spec.lower().endswith(texts.TEXT_SUFFIXES):
        raise DataError(f"{spec} is a table: images are image files, folders, globs, shards or parquet; a table of "
                        "image and caption is pair data (--pairs; data.pairs in a training config)")
    if kind == "pairs" and tables.is_table(spec) and not is_remote(spec):
        return sources.csv_pairs(spec)
    if kind in ("pairs", "images") and spec.lower().endswith(texts.TEXT_SUFFIXES) and not (
            kind == "pairs" and tables.is_table(spec)):  # read as a tar, it was "damaged"
        raise DataError(f"{spec} is text, not {kind}: {kind} are "
                        + ("WebDataset shards (.tar) or tables (CSV, TSV, JSONL, parquet) of image and caption"
                           if kind == "pairs" else "image files, folders, shards or parquet")
                        + "; text is for pretraining's data.text (or embed's --texts)")
    remote = is_remote(spec) and not spec.startswith("pipe:")  # as a path, http://h/x.csv was http:/h/x.csv
    named = bare_name(spec)  # http://h/x.csv?v=2 was read as a tar
    one = "table" if tables.is_table(named) else "image" if named.lower().rstrip("/").endswith(
        tuple(IMAGE_SUFFIXES)) else None
    if remote and one:
        raise DataError(f"{spec}: remote {kind} are read from WebDataset shards (.tar files, a folder or glob of "
                        f"them, or their index.json); copy the {one} here and name its local path")
    if kind == "pairs" or remote or _is_tar_spec(spec):
        _refuse_shards_beside_images(spec)
        return tars.tar_source(kind, spec, cache)
    if is_loose_image(spec):
        return loose_images([spec])
    return sources.image_folder(spec)


def _refuse_tables_as_several(kind: Kind, spec: str) -> None:
    """A CSV, TSV or JSONL table named where it cannot be read as one: with parquet's column
    query, as text, or among others (a folder or glob of them). Read as shards or text files,
    each was 'no tar shards match' or 'no .txt or .jsonl files match', though the files exist."""
    if is_remote(spec):
        return
    path, query = spec.partition("?")[::2]
    delimited = tuple(suffix for suffix, form in tables.FORMATS.items() if form != "parquet")
    if query and path.lower().endswith(delimited) and Path(path).is_file():
        raise DataError(f"{path}: a CSV, TSV or JSONL table's columns are found by their names (image and caption; "
                        "text and label for tasks): rename them; ?COLUMN=NAME is for parquet and `datasets` sources")
    if kind == "text" and path.lower().endswith(delimited) and not path.lower().endswith(".jsonl") \
            and Path(path).is_file():
        raise DataError(f"{path} is a table: text sources are .txt files (a text a line), .jsonl (a `text` field a "
                        "line), parquet or `datasets` (?text=COLUMN): save its column as one of those")
    if Path(path).is_dir():
        entries = list(Path(path).iterdir())  # listed once: a folder of shards may hold thousands
        found = sorted(q.name for q in entries
                       if q.name.lower().endswith(delimited) and q.is_file() and not passed_over(q.name))
        holds_other = any(q.name.lower().endswith((*IMAGE_SUFFIXES, *tars.TAR_SUFFIXES, ".txt", ".parquet", ".arrow"))
                          for q in entries)
    elif any(c in path for c in "*?["):
        import glob

        matched = glob.glob(path)
        found = sorted(m for m in matched if m.lower().endswith(delimited))
        holds_other = len(found) < len(matched)
    else:
        return
    if found and not holds_other and kind == "pairs":
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise DataError(f"{spec} names {len(found):,} table(s) ({shown}): a table is a source of its own: name each "
                        "(data.pairs=[...], or --pairs A.csv B.csv)")


def check_distinct(paths: Sequence, where: str, hint: str = " (a weight draws one more often)") -> None:
    """Each source once: a repeat drew it twice as often unsaid and its counts overwrote each other's."""
    seen: dict[str, str] = {}
    for p in map(str, paths):
        key = p if is_remote(p) else str(Path(p).resolve())
        if key in seen:  # a folder and a link to it are one source named twice, under two names
            named = f"{p} twice" if seen[key] == p else f"{seen[key]} and {p}, one source (both are {key})"
            raise DataError(f"{where} names {named}; give each source once{hint}")
        seen[key] = p


def check_disjoint(srcs: Sequence[Source], where: str, hint: str = " (a weight draws one more often)",
                   pairs_as_images: bool = False) -> None:
    """Each shard once: a folder and a glob or a file in it named beside each other (`shards` and
    `shards/00000.tar`) drew those shards twice as often, unsaid; so did image files (`imgs` and
    `imgs/a*.jpg`). Paths are compared with their folders' links resolved (`RealPaths`: a stat a
    folder, not a file; shard lists run to thousands), so a folder and a link to it are one. One
    source may name an image twice (a table's rows), two may not. `pairs_as_images`: a pair's image
    counts as an image (train-codebook reads both as one stream of images)."""
    real = RealPaths()
    owner: dict[tuple, Source] = {}
    image_owner: dict[str, Source] = {}
    for src in srcs:
        for shard in src.shards:
            # A file (a tar's or text's url, a parquet's path), and the part of it read: a text
            # file's byte range, a parquet row group.
            url = getattr(shard, "url", None) or getattr(getattr(shard, "file", None), "path", None)
            if url is None:  # records in memory: a folder's listing, a table's rows (pairs may share an image)
                for r in shard.records if isinstance(shard, sources.RecordShard) else ():
                    image = isinstance(r, sources.ImageRecord) or pairs_as_images and isinstance(r, sources.PairRecord)
                    if not image or not isinstance(r.image, Path):  # a member, pixels
                        continue
                    first = image_owner.setdefault(real(r.image), src)
                    if first is not src:
                        raise DataError(f"{where}: the image {r.image} is named by both {first.name} and {src.name}; "
                                        f"give each image once{hint}")
                continue
            # ... and what is read of it: another column of a parquet file, field of a JSONL file.
            key = (url if is_remote(url) else real(url), getattr(shard, "start", None),
                   getattr(shard, "unit", None), repr(getattr(shard, "columns", None)), getattr(shard, "field", None))
            if key in owner:
                named = f"both {owner[key].name} and {src.name}" if owner[key] is not src else f"{src.name} twice"
                raise DataError(f"{where}: the shard {url} is named by {named}; give each shard once{hint}")
            owner[key] = src


MISSING_CHECKED = 256
"""Image files of a listed source looked for at the start (a stat each)."""


def missing_files(source: Source, seed: int = 0) -> tuple[int, int]:
    """(image files that do not exist, files looked for) among a seeded sample of a listed
    source's records (a table's rows, a folder's files): a table whose paths are mostly wrong
    trains on its few good rows repeated, which the end-of-run counts were the first to say.
    Sources read from shards hold their images: (0, 0)."""
    import numpy as np

    records = [r for shard in source.shards if isinstance(shard, sources.RecordShard) for r in shard.records]
    picked = np.random.default_rng([seed, 29]).permutation(len(records))[:MISSING_CHECKED]
    refs = (getattr(records[int(i)], "image", records[int(i)]) for i in picked)
    paths = [ref for ref in refs if isinstance(ref, Path)]
    return sum(not p.exists() for p in paths), len(paths)  # a folder is there: counted when read


def is_loose_image(spec: str) -> bool:
    """An image file or a glob of them (not of shards), as opposed to a folder, shards or a table."""
    spec = str(spec)
    if "://" in spec or _is_tar_spec(spec) or arrow.is_arrow_spec(spec):  # `x.parquet?image=jpg` is no glob
        return False
    return Path(spec).is_file() and Path(spec).suffix.lower() in IMAGE_SUFFIXES or any(c in spec for c in "*?[")


def image_sources(specs: Sequence[str], cache: ShardCache | None = None) -> list[Source]:
    """Image data specs opened: folders, shards and parquet each a source, and every image file and
    glob among them one source, last."""
    loose = [str(s) for s in specs if is_loose_image(s)]
    return [open_source("images", str(s), cache) for s in specs if not is_loose_image(s)] + \
        ([loose_images(loose)] if loose else [])


def loose_images(specs: Sequence[str]) -> Source:
    """Image files and globs gathered into one source: a source per file drew whole batches of one
    image, and a glob was read as a folder's name. An image two of them name is refused, as
    `check_disjoint` refuses one that two sources name."""
    links: set[str] = set()
    found = find_images(list(specs), file_links=links)
    real = RealPaths(links)
    seen: set[str] = set()
    twice = next((p for p in found if (key := real(p)) in seen or seen.add(key)), None)
    if twice is not None:
        by = [str(s) for s in specs if any(real(q) == real(twice) for q in find_images([s]))]
        raise DataError(f"the image {twice} is named by both {by[0]} and {by[-1]}; give each image once")
    return Source("images", [sources.ImageRecord(p) for p in found], ", ".join(map(str, specs)))


_DEMO = {"pairs": demo.easy_vqa_pairs, "images": demo.demo_image_source, "text": demo.bbc_news_text}


def demo_source(kind: Kind) -> Source:
    return _DEMO[kind]()


def estimated_size(source: Source, outage: tuple[float, str] | None = None) -> int:
    """Samples in a source: known from an index or a table, else the records of its first shard
    scaled to all of them: by their bytes where those are known at no cost (local files, which a
    short or a re-cut shard may make unlike the first), else by their count. `outage`: how long
    its store is waited for and the setting that says so (`open_waiting`'s defaults: None)."""
    if source.known_size is not None:
        return source.known_size
    from .sources import open_waiting

    # A local shard named but not there (a brace range past the last one written) holds nothing: it
    # had been counted as the first shard's like, and the source drawn that much more often.
    gone = set(missing_shards(source))
    there = [s for i, s in enumerate(source.shards) if i not in gone] or source.shards
    # Waited for: a source weighed by a store's outage would be mixed wrongly for the whole run.
    first = len(open_waiting(there[0], *(outage or ())).records)
    sizes = [sources.shard_bytes(s) for s in there]
    # Bytes stand for records only among shards stored alike (not a compressed file beside plain
    # ones) and where the first holds any (a first shard of bad records says nothing of its bytes).
    alike = len({_suffix(getattr(s, "url", "")) for s in there}) == 1
    if first and alike and all(sizes):
        return max(1, round(first * sum(sizes) / sizes[0]))
    return max(1, first) * len(there)


def missing_shards(source: Source) -> list[int]:
    """The indices of a source's local shard files that do not exist (a stat each; remote ones and
    records in memory are not looked for)."""
    from .shards import _local

    urls = [getattr(s, "url", None) for s in source.shards]
    return [i for i, u in enumerate(urls) if isinstance(u, str) and not is_remote(u) and getattr(
        source.shards[i], "end", None) is None and not os.path.exists(_local(u))]


def _suffix(url: str) -> str:
    name = url.rsplit("/", 1)[-1].lower()
    return name.rsplit(".", 1)[-1] if "." in name else ""


def refuse_empty(src: Source) -> None:
    """A source known to hold no usable sample (a table of a header alone), refused here, not at its first draw."""
    if src.known_size == 0:
        rejected = ", ".join(f"{n} {why}" for why, n in src.listing_rejected.most_common())
        raise DataError(f"{src.name} holds no usable sample ({rejected}); fix those rows" if rejected else
                        f"{src.name} holds no samples; give data that has some (a table needs rows "
                        f"under its header)")


def open_stream(kind: Kind, specs: Sequence, maker, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                num_workers: int = 0, lanes: int = 0, cache: ShardCache | None = None, outage_s: float | None = None,
                kind_workers: int | None = None):
    """The training stream of one kind: each spec (a path, or an object with `path` and `weight`)
    opened as a source; a draw picks a source by weight (plain paths weigh by their size); no
    specs: the packaged demo data. `outage_s`: how long a shard whose store cannot serve it now is
    waited for (None: `sources.OUTAGE_S`). Each source has `num_workers` loader workers, or with
    `kind_workers` a share of those by its weight (at least one)."""
    from .pipeline import BatchStream, KindStream
    from .sources import OUTAGE_S

    paths = [getattr(s, "path", s) for s in specs]
    weights = [getattr(s, "weight", None) for s in specs]
    check_distinct(paths, f"data.{kind}")
    if any(w is None for w in weights) and any(w is not None for w in weights):
        raise DataError(f"give every data.{kind} source a weight, or none (then each weighs by its size)")
    if kind == "images" and paths and all(w is None for w in weights):  # image files and globs: one source
        srcs = image_sources(paths, cache)
        weights = [None] * len(srcs)
    else:
        srcs = [open_source(kind, str(p), cache) for p in paths] if paths else [demo_source(kind)]
    check_disjoint(srcs, f"data.{kind}")
    for src in srcs:
        refuse_empty(src)
        if kind == "images" and src.known_size == 1:  # every batch drawn from it would be that image repeated
            beside = " (or move it into a folder beside it)" if len(srcs) > 1 else ""
            raise DataError(f"{src.name} is a source of one image: every images batch drawn from it would repeat "
                            f"it; give a folder, a glob or shards of many{beside}")
    weights = weights or [None]  # the demo source stands alone
    estimated = len(srcs) > 1 and weights[0] is None
    if estimated:  # waited for as long as the run waits for a store (data.outage_minutes), not the default
        weights = [float(estimated_size(s, (OUTAGE_S if outage_s is None else outage_s, "data.outage_minutes")))
                   for s in srcs]
    shares = [w if w is not None else 1.0 for w in weights]
    workers = [num_workers] * len(srcs) if kind_workers is None else \
        [max(1, int(kind_workers * share / max(sum(shares), 1e-12))) for share in shares]
    streams = [BatchStream(kind, src, maker, batch_size, seed=seed + 7919 * i, rank=rank, world=world,
                           num_workers=n, lanes=lanes, outage_s=OUTAGE_S if outage_s is None else outage_s)
               for i, (src, n) in enumerate(zip(srcs, workers))]
    return KindStream(kind, streams, [w if w is not None else 1.0 for w in weights], seed, estimated)
