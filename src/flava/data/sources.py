"""Data sources: lists of shards, each read whole when a stream reaches it.

Pairs: WebDataset tar shards (image + .txt/.json caption per key; `flava prepare` adds image-token
ids and crops), tables of image path + caption (`data.tables`). Images: folders (class sub-folders give labels),
tar shards. Text: .txt (a line each) and .jsonl, split into byte ranges, or whole when compressed
or remote. Nothing is read when a source is opened beyond the shard list (and a shard index when
one exists); a shard is indexed when a stream first needs it, and a record is decoded when used:
one that fails then is skipped and counted by the pipeline.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .images import IMAGE_SUFFIXES, find_images
from .tables import read_table
from .transforms import crop_resize, extreme_aspect, to_rgb

CAPTION_SUFFIXES = (".txt", ".caption", ".json")
MAX_IMAGE_PIXELS = 40_000_000
"""Images with more pixels are refused before decoding (a 13000x13000 PNG decodes to 1 GB)."""


class BadSample(Exception):
    """A record that cannot be used; `kind` names why (it is counted under that name)."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


_FDS: dict[Path, tuple[tuple[int, int, int], int]] = {}
"""Open shards of this process: path -> ((inode, size, mtime), descriptor)."""
MAX_OPEN_SHARDS = 32


def _shard_fd(path: Path) -> int:
    """A read-only descriptor of a local shard, kept open across its members (an open per member
    costs as much as reading it). pread needs no shared offset, so forked loader workers may use
    an inherited one; a file replaced on disk (another inode, size or time) is opened again."""
    st = os.stat(path)
    key = (st.st_ino, st.st_size, st.st_mtime_ns)
    held = _FDS.get(path)
    if held is not None and held[0] == key:
        return held[1]
    if held is not None:
        os.close(_FDS.pop(path)[1])
    while len(_FDS) >= MAX_OPEN_SHARDS:
        os.close(_FDS.pop(next(iter(_FDS)))[1])
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    _FDS[path] = key, fd
    return fd


@dataclass(frozen=True)
class TarMember:
    """A tar member of a local shard, read by seeking."""

    shard: Path
    offset: int
    size: int
    ext: str = ""

    def read(self) -> bytes:
        data = os.pread(_shard_fd(self.shard), self.size, self.offset)
        if len(data) != self.size:
            raise BadSample("truncated tar member")
        return data


@dataclass(frozen=True)
class Blob:
    """A tar member of a shard held in memory (a remote shard read whole)."""

    data: bytes | memoryview
    ext: str = ""

    def read(self) -> bytes:
        return bytes(self.data)


Member = TarMember | Blob
ImageRef = Path | Member | Image.Image


def _image_bytes(ref: Path | Member) -> bytes:
    if isinstance(ref, (TarMember, Blob)):
        data = ref.read()
    else:
        if not ref.exists():
            raise BadSample("missing image file")
        try:
            data = ref.read_bytes()
        except OSError:
            raise BadSample("unreadable image") from None
    if not data:
        raise BadSample("empty image file")
    return data


def _check_size(width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise BadSample("image too large")
    if extreme_aspect(width, height):
        raise BadSample("extreme aspect ratio")


def open_image(ref: ImageRef | bytes, draft: Callable[[int, int], tuple[int, int]] | None = None) -> Image.Image:
    """Decode to RGB or raise BadSample with the reason. `draft` maps the stored (width, height)
    to the smallest size worth decoding: a JPEG is then decoded at 1/2, 1/4 or 1/8 scale in the
    DCT domain where that still covers it (libjpeg's scaled decoding, through PIL's draft mode)."""
    if isinstance(ref, Image.Image):
        _check_size(*ref.size)
        return to_rgb(ref)
    try:
        data = ref if isinstance(ref, bytes) else _image_bytes(ref)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                _check_size(im.width, im.height)
                if draft is not None:
                    im.draft("RGB", draft(im.width, im.height))
                im.load()
                return to_rgb(im)
    except BadSample:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise BadSample("image too large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, MemoryError):
        raise BadSample("unreadable image") from None


def decode_rgb(ref: ImageRef, draft: Callable[[int, int], tuple[int, int]] | None = None) -> np.ndarray:
    """[H, W, 3] uint8 RGB, as `open_image` gives, faster for JPEGs: libjpeg-turbo through
    simplejpeg (the same pixels as PIL, without PIL's per-image overheads; with `draft`, the
    smallest of its n/8 DCT scales that still covers the request). Other formats, and JPEGs it
    does not read (CMYK), go through PIL."""
    if isinstance(ref, Image.Image):
        return np.array(open_image(ref))
    data = _image_bytes(ref)
    if data[:2] == b"\xff\xd8":
        import simplejpeg

        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            colorspace = None  # PIL says what is wrong with it
        if colorspace in ("YCbCr", "Gray", "RGB"):
            _check_size(width, height)
            least = draft(width, height) if draft is not None else (0, 0)
            try:
                return simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=least[0], min_height=least[1])
            except ValueError:
                pass
    return np.array(open_image(data, draft))  # a writable copy: torch wraps it


def decode_crop(ref: ImageRef, choose: Callable[[int, int], tuple[float, float, float, float]],
                *sizes: int) -> list[torch.Tensor]:
    """[3, size, size] uint8 for each size: the box `choose(width, height)` picks (left, top,
    right, bottom, in pixels of the stored image) resized. The box is chosen from the stored size
    before decoding, so the choice is the same whatever scale the JPEG is then decoded at: the
    smallest that still gives the box `max(sizes)` pixels each way."""
    chosen: list = []

    def least(width: int, height: int) -> tuple[int, int]:
        left, top, right, bottom = box = choose(width, height)
        chosen[:] = [box, (width, height)]
        side = max(sizes)
        return (max(1, math.ceil(width * side / max(right - left, 1e-6))),
                max(1, math.ceil(height * side / max(bottom - top, 1e-6))))

    image = decode_rgb(ref, draft=least)
    if not chosen:  # an in-memory image: decoded already, no draft was asked
        least(image.shape[1], image.shape[0])
    (left, top, right, bottom), (width, height) = chosen
    fx, fy = image.shape[1] / width, image.shape[0] / height
    return crop_resize(image, (left * fx, top * fy, right * fx, bottom * fy), *sizes)


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
        self.classes = list(classes or [])
        self.known_size = size if size is not None else (len(records) if records is not None else None)
        """Samples in all shards when known without reading them (an index, a table), else None."""
        self.prepared: dict | None = None
        """What `flava prepare` recorded (codebook, crops), when the shards are prepared ones."""
        self._opened: tuple[list, Counter] | None = None

    def _read_all(self) -> tuple[list, Counter]:
        if self._opened is None:
            records, rejected = [], Counter(self.listing_rejected)
            for shard in self.shards:
                opened = open_shard(shard)
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
        self.known_size = None if self.known_size is None or other.known_size is None else \
            self.known_size + other.known_size
        self._opened = None


def open_shard(shard) -> Opened:
    """A shard's records; a shard that cannot be read at all yields none and one rejection."""
    try:
        return shard.open()
    except FileNotFoundError:
        return Opened([], Counter({"missing shard": 1}))
    except (OSError, DataError, tarfile.TarError, EOFError):
        return Opened([], Counter({"unreadable shard": 1}))
    except Exception as e:  # remote stores raise their own error types (timeouts, refusals)
        if type(e).__module__.split(".")[0] in ("aiohttp", "botocore", "fsspec", "s3fs", "requests", "urllib3"):
            return Opened([], Counter({"unreadable shard": 1}))
        raise


def read_caption(value: str | TarMember) -> str:
    if isinstance(value, str):
        return value
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
        text = obj.get("caption", obj.get("text", ""))
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise BadSample("caption is not text")
    return text


def _end_marker_present(f, end: int, size: int) -> bool:
    """A complete tar ends with two zero blocks after its last member."""
    if size - end < 1024:
        return False
    f.seek(end)
    return not any(f.read(1024))


TOKENS_EXT, CROPS_EXT = ".tokens.npy", ".crops.npy"


@dataclass(frozen=True)
class TarShard:
    """A WebDataset tar: members sharing a key (the name up to its first dot) form one sample.

    A shard cut short (a failed upload or copy) keeps the samples before the cut and is counted
    as truncated; a member whose header claims more bytes than the file holds is not used."""

    url: str
    kind: str
    cache: object = None
    size: int | None = None
    """Samples, when an index says so."""

    @property
    def name(self) -> str:
        return self.url

    def _members(self, rejected: Counter) -> dict[str, dict[str, Member]]:
        from webdataset.tariterators import base_plus_ext

        from .shards import read

        where = read(self.url, self.cache)
        data = None
        if isinstance(where, Path):
            f = open(where, "rb")
            total = where.stat().st_size
        else:
            data, total = memoryview(where), len(where)
            f = io.BytesIO(where)
        groups: dict[str, dict[str, Member]] = {}
        try:
            with f, tarfile.open(fileobj=f, mode="r:") as tar:
                end = 0
                for info in tar:
                    end = info.offset_data + info.size
                    if not info.isfile():
                        continue
                    if end > total:
                        rejected["tar member past the end of its shard"] += 1
                        continue
                    split = base_plus_ext(info.name)
                    key, ext = (split[0], "." + split[1].lower()) if split[0] else (info.name, "")
                    groups.setdefault(key, {})[ext] = (
                        TarMember(where, info.offset_data, info.size, ext) if data is None
                        else Blob(data[info.offset_data:end], ext))
                if not _end_marker_present(f, -(-end // 512) * 512, total):
                    rejected["truncated tar shard"] += 1
        except (tarfile.TarError, OSError):
            rejected["corrupt tar shard (read up to the damage)"] += 1
        return groups

    def open(self) -> Opened:
        rejected: Counter = Counter()
        records = []
        for members in self._members(rejected).values():
            image = next((m for ext, m in members.items() if ext in IMAGE_SUFFIXES), None)
            prepared = PreparedCrops(members[CROPS_EXT], members[TOKENS_EXT]) \
                if CROPS_EXT in members and TOKENS_EXT in members else None
            if self.kind == "images":
                if image is None:
                    rejected["incomplete tar sample"] += 1
                    continue
                label = members.get(".cls")
                records.append(ImageRecord(image, _label(label), prepared))
                continue
            caption = next((members[e] for e in CAPTION_SUFFIXES if e in members), None)
            if image is None or caption is None:
                rejected["incomplete tar sample"] += 1
                continue
            records.append(PairRecord(image, caption, prepared))
        return Opened(records, rejected)


def _label(member: Member | None) -> int:
    if member is None:
        return -1
    try:
        return int(member.read().decode().strip())
    except (ValueError, UnicodeDecodeError, BadSample):
        return -1


INDEX = "index.json"
"""The shard index `flava prepare` writes beside its shards (wids' shard-list layout)."""


def read_index(url: str) -> dict:
    """A shard index: {"shardlist": [{"url", "nsamples"}], "flava": {...}}; shard URLs relative
    to the index."""
    from .shards import is_remote, read

    try:
        raw = read(url)
        text = raw.read_text() if isinstance(raw, Path) else raw.decode()
        index = json.loads(text)
        shards = index["shardlist"]
        base = url.rsplit("/", 1)[0] if "/" in url else "."
        for s in shards:
            if not (is_remote(s["url"]) or s["url"].startswith("/")):
                s["url"] = f"{base}/{s['url']}"
            s["nsamples"] = int(s["nsamples"])
        return index
    except FileNotFoundError:
        raise DataError(f"shard index {url} does not exist") from None
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise DataError(f"shard index {url} could not be read ({type(e).__name__}); write it again with "
                        "`flava prepare`") from None


def tar_source(kind: str, spec: str, cache=None) -> Source:
    """Tar shards named by a spec (see `data.shards`), or by a shard index (`index.json`, or a
    directory holding one)."""
    from .shards import expand, is_remote

    index_url = spec if spec.endswith(".json") else None
    if index_url is None and not is_remote(spec) and (Path(spec) / INDEX).is_file():
        index_url = str(Path(spec) / INDEX)
    if index_url is not None:
        index = read_index(index_url)
        shards = [TarShard(s["url"], kind, cache, s["nsamples"]) for s in index["shardlist"]]
        source = Source(kind, name=spec, shards=shards, size=sum(s.size for s in shards))
        source.prepared = index.get("flava")
        return source
    urls = expand(spec, (".tar",))
    if not urls:
        raise DataError(f"no tar shards match {spec}")
    return Source(kind, name=spec, shards=[TarShard(u, kind, cache) for u in urls])


def tar_pairs(pattern: str, cache=None) -> Source:
    return tar_source("pairs", pattern, cache)


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
    records, rejected = [], Counter(table.rejected)
    for row in table.rows:
        image, caption = row.get(image_key), row.get(caption_key)
        if not image:
            rejected["csv row without an image"] += 1
        else:
            records.append(PairRecord(p.parent / str(image), "" if caption is None else str(caption)))
    return Source("pairs", records, str(p), rejected)


def image_folder(path: str) -> Source:
    """Every image below `path`; the first-level sub-folder names are the class labels."""
    root = Path(path)
    files = find_images([root])
    classes = sorted({f.relative_to(root).parts[0] for f in files if len(f.relative_to(root).parts) > 1})
    index = {c: i for i, c in enumerate(classes)}
    records = [ImageRecord(f, index.get(f.relative_to(root).parts[0], -1) if classes else -1) for f in files]
    return Source("images", records, str(root), classes=classes)


TEXT_SUFFIXES = (".txt", ".jsonl")
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
TEXT_RANGE_BYTES = 8 << 20
"""Uncompressed local text is read in byte ranges of this size, so no corpus is ever whole in memory."""


@dataclass(frozen=True)
class TextShard:
    """Lines of a text file: those that start within [start, end) of a local uncompressed file, or
    every line of a compressed or remote one (a shard of its own)."""

    url: str
    start: int = 0
    end: int | None = None
    field: str = "text"
    cache: object = None

    @property
    def name(self) -> str:
        return self.url if self.end is None else f"{self.url}@{self.start}"

    def _lines(self) -> list[bytes]:
        from .shards import is_remote

        if self.end is not None:
            with open(self.url, "rb") as f:
                if self.start > 0:
                    f.seek(self.start - 1)
                    if f.read(1) != b"\n":
                        f.readline()  # the line that started before this range belongs to the one before
                lines = []
                while f.tell() < self.end:
                    line = f.readline()
                    if not line:
                        break
                    lines.append(line)
                return lines
        import fsspec

        if is_remote(self.url):
            from .shards import read

            raw = read(self.url, self.cache)
            raw = raw.read_bytes() if isinstance(raw, Path) else raw
            compression = fsspec.utils.infer_compression(self.url)
            if compression:
                with fsspec.compression.compr[compression](io.BytesIO(raw), mode="rb") as f:
                    return f.read().splitlines()
            return raw.splitlines()
        with fsspec.open(self.url, "rb", compression="infer") as f:
            return f.read().splitlines()

    def open(self) -> Opened:
        rejected: Counter = Counter()
        jsonl = self.url.lower().removesuffix(_compression_suffix(self.url)).endswith(".jsonl")
        records = []
        for raw in self._lines():
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                rejected["undecodable text line"] += 1
                continue
            if not line.strip():
                continue
            if jsonl:
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, RecursionError):
                    rejected["unreadable json line"] += 1
                    continue
                line = obj.get(self.field) if isinstance(obj, dict) else None
                if not isinstance(line, str):
                    rejected["json line without a text string"] += 1
                    continue
            records.append(line)
        return Opened(records, rejected)


def _compression_suffix(url: str) -> str:
    return next((c for c in COMPRESSED if url.lower().endswith(c)), "")


def text_file(path: str, field_name: str = "text", cache=None) -> Source:
    """Text from .txt files (one text per non-empty line) or .jsonl (the `field_name` of each
    object), optionally compressed (.gz, .bz2, .xz, .zst): a file, directory, glob or URL."""
    from .shards import expand, is_remote, size_of

    p = Path(path)
    if not is_remote(path) and p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file())
    else:
        files = expand(path, tuple(s + c for s in TEXT_SUFFIXES for c in ("", *COMPRESSED)))
    files = [f for f in files if f.lower().removesuffix(_compression_suffix(f)).endswith(TEXT_SUFFIXES)]
    if not files:
        raise DataError(f"no .txt or .jsonl files match {path}")
    shards: list[TextShard] = []
    for f in files:
        size = None if _compression_suffix(f) else size_of(f)
        if size is None:
            shards.append(TextShard(f, field=field_name, cache=cache))
        else:
            shards += [TextShard(f, a, min(a + TEXT_RANGE_BYTES, size), field_name)
                       for a in range(0, max(size, 1), TEXT_RANGE_BYTES)]
    return Source("text", name=path, shards=shards)
