"""Data sources: lists of shards, each read whole when a stream reaches it.

A record names what one sample is made of (an image, a caption, what `flava prepare` stored);
a shard yields records when opened; a `Source` is a kind plus its shards. Pairs: WebDataset tar
shards (`data.tars`), tables of image path + caption (`data.tables`). Images: folders (class
sub-folders give labels), tar shards. Text: .txt and .jsonl files (`data.texts`). Nothing is
read when a source is opened beyond the shard list (and a shard index when one exists); a shard
is indexed when a stream first needs it, and a record is decoded (`data.decode`) when used: one
that fails then is skipped and counted by the pipeline.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError, first_line
from ..io.files import sha256_of
from .images import find_images, without_repeats
from .members import BadSample, ImageRef, Member, TarMember, refuse_urls, table_image
from .shards import unreachable
from .tables import UNCLOSED, read_table

CAPTION_SUFFIXES = (".txt", ".caption", ".json")


@dataclass(frozen=True)
class PreparedCrops:
    """What `flava prepare` stored beside an image: crop boxes (fractions of the stored image,
    left, top, right, bottom) and the image codebook's token ids for each crop."""

    crops: Member
    tokens: Member


@dataclass(frozen=True)
class PairRecord:
    image: ImageRef
    caption: str | Member
    prepared: PreparedCrops | None = None
    key: str | None = None
    """A WebDataset sample's key (its members' shared name), where there is one."""
    sidecar: Member | None = None
    """A WebDataset sample's `.json` member (img2dataset's url, size, ...): metadata `flava embed` keeps."""


@dataclass(frozen=True)
class ImageRecord:
    image: ImageRef
    label: int = -1
    prepared: PreparedCrops | None = None


@dataclass
class Opened:
    """A shard's records, and what was rejected while indexing it."""

    records: list
    rejected: Counter = field(default_factory=Counter)
    failure: str = ""
    """A shard that gave no record, named: with its reader's words where it could not be read at
    all (a refused connection, a missing key). A source none of whose shards gives one is refused
    with it."""
    passing: bool = False
    """Whether the shard could not be read for a reason that may pass (a store that could not be
    reached or did not answer: `shards.unreachable`), not for what it holds (a damaged tar), its
    absence, or the store's refusal or error (which the user must see to)."""


@dataclass(frozen=True)
class RecordShard:
    """Records already in memory (CSV rows, folder listings, the demo data)."""

    name: str
    records: tuple

    def open(self) -> Opened:
        return Opened(list(self.records))

    @property
    def size(self) -> int:
        return len(self.records)


class Source:
    """Shards of one kind. `records` and `rejected` read every shard (for evaluation sets and
    inspection); training streams read shards one at a time through `shards`."""

    def __init__(self, kind: str, records: list | None = None, name: str = "", rejected: Counter | None = None,
                 classes: list[str] | None = None, shards: list | None = None, size: int | None = None):
        self.kind, self.name = kind, name
        """'pairs', 'images' or 'text'."""
        self.shards = list(shards) if shards is not None else [RecordShard(name, tuple(records or ()))]
        self.listing_rejected = Counter(rejected or {})
        """Rejected before any shard was read (rows of a table, lines of a file read up front)."""
        self.listing_first: dict[str, tuple[int, str]] = {}
        """The line of each reason's first rejection there and what is wrong with it."""
        self.listing_notes: list[str] = []
        """What its listing chose that the user may not expect (a parquet's caption column among several)."""
        self.listing_spans: list[tuple[int, int]] = []
        """Rows of a table whose quoted cell took lines that read as rows (`Table.spanning`)."""
        self.classes = list(classes or [])
        self.known_size = size if size is not None else (len(records) if records is not None else None)
        """Samples in all shards when known without reading them (an index, a table), else None."""
        self.known_bytes: int | None = None
        """The bytes of its local files (text, tables): a resume compares them, as an edit may keep
        the count of lines or rows that positions index."""
        self.known_digest: str | None = None
        """A digest of its local table's bytes: an edit that keeps their count (a caption retyped)."""
        self.known_names: str | None = None
        """A digest of the file names its records index, in order (image folders): a resume compares
        it, as files renamed, added and removed may keep their count."""
        self.prepared: dict | None = None
        """What `flava prepare` recorded (codebook, crops), when the shards are prepared ones."""
        self.prepared_apart: list[str] = []
        """Folders of shards prepared otherwise that one glob named, each with how (pretraining
        refuses them as one source: a draw's targets come from one codebook, or none)."""
        self._opened: tuple[list, Counter] | None = None

    def _read_all(self) -> tuple[list, Counter]:
        if self._opened is None:
            records, rejected = [], Counter(self.listing_rejected)
            for shard in self.shards:
                opened = open_waiting(shard)  # an evaluation or embedding set with a shard missed is another
                records += opened.records
                rejected += opened.rejected
            self._opened = records, rejected
        return self._opened

    @property
    def records(self) -> list:
        return self._read_all()[0]

    @property
    def rejected(self) -> Counter:
        return self._read_all()[1]

    def __len__(self) -> int:
        return len(self.records)

    def extend(self, other: "Source") -> None:
        self.shards += other.shards
        self.listing_rejected += other.listing_rejected
        self.listing_first = {**other.listing_first, **self.listing_first}
        self.listing_spans += other.listing_spans
        self.listing_notes += other.listing_notes
        self.known_size = None if self.known_size is None or other.known_size is None else \
            self.known_size + other.known_size
        self.known_bytes = None if self.known_bytes is None or other.known_bytes is None else \
            self.known_bytes + other.known_bytes
        self.known_digest = None if self.known_digest is None or other.known_digest is None else \
            hashlib.blake2b(f"{self.known_digest} {other.known_digest}".encode(), digest_size=16).hexdigest()
        self.known_names = None if self.known_names is None or other.known_names is None else \
            names_digest([self.known_names, other.known_names])
        self._opened = None


def open_shard(shard) -> Opened:
    """A shard's records; a shard that cannot be read at all yields none, one rejection and why."""
    try:
        opened = shard.open()
    except FileNotFoundError as e:
        return Opened([], Counter({"missing shard": 1}), _failure(shard, e))
    except (OSError, DataError, tarfile.TarError, EOFError) as e:
        return Opened([], Counter({"unreadable shard": 1}), _failure(shard, e), passing=unreachable(e))
    except Exception as e:  # remote stores raise their own error types (timeouts, refusals)
        if type(e).__module__.split(".")[0] in ("aiohttp", "botocore", "fsspec", "s3fs", "requests", "urllib3"):
            return Opened([], Counter({"unreadable shard": 1}), _failure(shard, e), passing=unreachable(e))
        raise
    if not opened.records and opened.rejected and not opened.failure:  # read, and nothing in it usable
        opened.failure = shard.name
    return opened


class StoreOutage(DataError):
    """A store that could not serve a shard for longer than the wait allowed (`open_waiting`)."""


OUTAGE_S = 1800.0
"""How long a shard whose store cannot serve it now is waited for (`open_waiting`), by default."""
OUTAGE_PAUSES_S = (5.0, 120.0)
"""The first pause between reads of such a shard, doubled after each up to the second."""


def open_waiting(shard, outage_s: float = OUTAGE_S, setting: str = "data.outage_minutes") -> Opened:
    """A shard's records, read again until its store serves it (`Opened.passing`: not reached, no
    answer, a "come back later") for up to `outage_s` seconds from the first read (0: it is counted
    and passed over at once, as a damaged one is). Passing over it would make what a run trains on
    depend on when the network failed, and its resume inexact. A stop ends the wait
    (`stopping.abandonable`); a DataError, naming `setting`, once it is over."""
    began, pause = time.monotonic(), OUTAGE_PAUSES_S[0]
    opened = open_shard(shard)
    while opened.passing and outage_s > 0:
        waited = time.monotonic() - began
        if waited >= outage_s:
            raise StoreOutage(f"{opened.failure}: the store could not serve it for {_duration(waited)} (the wait "
                              f"allowed: {setting}={outage_s / 60:g}; a shard that fails so for good is passed over "
                              f"with 0)")
        pause = min(pause, outage_s - waited)
        # From a loader worker too: a wait on the network is never silent.
        print(f"note: {opened.failure}; waiting for the store: reading it again in {pause:.3g} s "
              f"({_duration(waited)} of up to {_duration(outage_s)}, {setting})", file=sys.stderr, flush=True)
        time.sleep(pause)
        pause = min(2 * pause, OUTAGE_PAUSES_S[1])
        opened = open_shard(shard)
        if not opened.passing:
            print(f"note: {shard.name} read after {_duration(time.monotonic() - began)} of waiting", file=sys.stderr,
                  flush=True)
    return opened


def shard_bytes(shard) -> int | None:
    """A shard's bytes where they are known at no cost: a local file's, or its byte range's."""
    from .shards import size_of

    url = getattr(shard, "url", None)
    if not isinstance(url, str):
        return None
    if getattr(shard, "end", None) is not None:  # a range of lines of a local text file
        return shard.end - shard.start
    return size_of(url)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _failure(shard, e: Exception) -> str:
    """`shard: what its reader said`, on one line."""
    said = first_line(e)[:300]
    return said if shard.name in said else f"{shard.name}: {said}"


def read_caption(value: str | TarMember | None) -> str:
    """A caption's text: a string as it is, a shard's member read (a .json one's `caption` or
    `text`); a table's empty cell is empty text, anything else (a number, a list) BadSample."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if not hasattr(value, "read"):
        raise BadSample("caption is not text")
    raw = value.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadSample("undecodable caption") from None
    if value.ext == ".json":
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            raise BadSample("unreadable caption json") from None
        if not isinstance(obj, dict):
            raise BadSample("caption json is not an object")
        # The first of them that holds text: an empty `caption` beside a `text` is not the caption.
        text = next((obj[k] for k in ("caption", "text") if obj.get(k) not in (None, "")), "")
        if not isinstance(text, str):
            raise BadSample("caption is not text")
    return text


def csv_pairs(path: str, image_column: str = "image", caption_column: str = "caption") -> Source:
    """A table (see `data.tables`: CSV, TSV, JSONL, parquet) of image path + caption; relative image
    paths are relative to the file. Bad rows are counted, not fatal."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"pair file {p} does not exist")
    table = read_table(p, bad_rows="skip")
    fix = (f"rename the columns to {image_column!r} and {caption_column!r} (a parquet or datasets source "
           f"names its own: data.parquet?image=COL&caption=COL)")
    image_key, caption_key = table.column(image_column, fix=fix), table.column(caption_column, fix=fix)
    records, rejected, first = [], Counter(table.rejected), dict(table.first_bad)
    for row in table.rows:
        image, caption = row.get(image_key), row.get(caption_key)
        if not image:
            rejected["table row without an image"] += 1
            first.setdefault("table row without an image", (row.line, f"its {image_key!r} cell is empty"))
        elif caption_key not in row.values:  # a JSONL row without the key: no caption at all, not an empty one
            rejected["table row without a caption"] += 1
            first.setdefault("table row without a caption", (row.line, f"it has no {caption_key!r}"))
        elif caption is not None and not isinstance(caption, str):  # JSON's lists, numbers, objects
            rejected["caption is not text"] += 1
            first.setdefault("caption is not text", (row.line, f"its {caption_key!r} is not text"))
        else:
            records.append(PairRecord(table_image(p.parent, image), caption or ""))
    refuse_urls(p, [r.image for r in records])
    source = Source("pairs", records, str(p), rejected)
    # Positions index its rows: an edit that keeps their count (other captions) is told by the size,
    # and one that keeps that too by the digest.
    source.known_bytes = p.stat().st_size
    source.known_digest = sha256_of(p)
    source.listing_first = first
    source.listing_spans = list(table.spanning)
    return source


def listing_said(source: Source) -> list[str]:
    """What a source's listing found worth saying at a run's start (`pretrain`, `prepare`): its bad
    rows, its rows a stray quote likely merged, and what it chose (a parquet's caption column)."""
    return [said for said in (bad_rows_said(source), spans_said(source), *source.listing_notes) if said]


def spans_said(source: Source) -> str:
    """Rows whose quoted cell took lines that read as rows of their own, said at a run's start:
    valid CSV, kept as written, but most likely a stray quote that merged those rows into one cell."""
    if not source.listing_spans:
        return ""
    (first, last), n = source.listing_spans[0], len(source.listing_spans)
    return (f"{n:,} row{'s hold' if n > 1 else ' holds'} a quoted cell over several lines that read alone as rows (the "
            f"first, lines {first:,}-{last:,}): a quote opened in a cell and closed lines later (an inch mark?) takes "
            "the rows between into that cell; check that cell's quotes")


def bad_rows_said(source: Source) -> str:
    """A listed source's bad rows (a table's), said at a run's start: how many of its rows they
    are and the first of them, or the quote never closed that left the rest of the file unread;
    '' without any. They are skipped and counted; the counts at the run's end had been the first
    word of them."""
    bad = sum(source.listing_rejected.values())
    if not bad:
        return ""
    if source.kind == "images":  # a folder's files: a link beside its target (`without_repeats`)
        return (f"{bad:,} of its {bad + (source.known_size or 0):,} image files are left out: "
                + ", ".join(f"{n:,} {why}" for why, n in source.listing_rejected.most_common()))
    rows = f"{bad:,} of its {bad + source.known_size:,} rows" if source.known_size is not None else \
        f"{bad:,} row{'s' if bad != 1 else ''}"
    counts = ", ".join(f"{n:,} {why}" for why, n in source.listing_rejected.most_common())
    if UNCLOSED in source.listing_first:  # its lines follow the line of the quote, up to the file's end
        opened = source.listing_first[UNCLOSED][0] - 1
        return (f"a quote opened on line {opened:,} is never closed, so lines {opened:,}-"
                f"{opened + source.listing_rejected[UNCLOSED]:,} are unread and {rows} are skipped ({counts}); "
                "close that quote, or double a quote inside a quoted cell")
    line, what = min(source.listing_first.values(), default=(0, ""))
    return f"{rows} are bad and skipped ({counts})" + (f"; the first, line {line:,}: {what}" if line else "")


def image_folder(path: str) -> Source:
    """Every image below `path`; the first-level sub-folder names are the class labels."""
    root = Path(path)
    links: set[str] = set()
    # A link beside its target drew that image twice as often (embed leaves it out, and says so).
    files, repeats = without_repeats(find_images([root], file_links=links), links)
    classes = sorted({f.relative_to(root).parts[0] for f in files if len(f.relative_to(root).parts) > 1})
    index = {c: i for i, c in enumerate(classes)}
    records = [ImageRecord(f, index.get(f.relative_to(root).parts[0], -1) if classes else -1) for f in files]
    source = Source("images", records, str(root), Counter({"image named twice (a link)": repeats}) if repeats else None,
                    classes=classes)
    source.known_names = names_digest(str(f.relative_to(root)) for f in files)
    return source


def names_digest(names: Iterable[str]) -> str:
    import hashlib

    digest = hashlib.blake2b(digest_size=8)
    for name in names:
        digest.update(name.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()
