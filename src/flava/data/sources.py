"""Data sources as indexable record lists, so any position can be resumed exactly.

Pairs: WebDataset tar shards (image + .txt/.json caption per key), CSV/TSV of image path +
caption. Images: folders (class sub-folders give labels). Text: .txt (a line each) and .jsonl.
Tar shards are indexed once (member offsets), then read by seeking; nothing is decoded until a
record is used, and a record that fails then is skipped and counted by the pipeline.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import sys
import tarfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .images import IMAGE_SUFFIXES, find_images
from .transforms import to_rgb

CAPTION_SUFFIXES = (".txt", ".caption", ".json")
TABLE_SUFFIXES = (".csv", ".tsv", ".tab")
MAX_IMAGE_PIXELS = 40_000_000
"""Images with more pixels are refused before decoding (a 13000x13000 PNG decodes to 1 GB)."""
# One caption or text may be long (a paragraph); csv's default 128 KiB field limit would make
# one such row abort the whole file, so the limit is lifted and length is judged per sample.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class BadSample(Exception):
    """A record that cannot be used; `kind` names why (it is counted under that name)."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


@dataclass(frozen=True)
class TarMember:
    shard: Path
    offset: int
    size: int
    ext: str = ""

    def read(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise BadSample("truncated tar member")
        return data


ImageRef = Path | TarMember | Image.Image


def open_image(ref: ImageRef) -> Image.Image:
    """Decode to RGB or raise BadSample with the reason."""
    if isinstance(ref, Image.Image):
        return to_rgb(ref)
    try:
        if isinstance(ref, TarMember):
            data = ref.read()
        else:
            if not ref.exists():
                raise BadSample("missing image file")
            data = ref.read_bytes()
        if not data:
            raise BadSample("empty image file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise BadSample("image too large")
                im.load()
                return to_rgb(im)
    except BadSample:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise BadSample("image too large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, MemoryError):
        raise BadSample("unreadable image") from None


@dataclass(frozen=True)
class PairRecord:
    image: ImageRef
    caption: str | TarMember


@dataclass(frozen=True)
class ImageRecord:
    image: ImageRef
    label: int = -1


@dataclass
class Source:
    """Records of one kind plus what was rejected while indexing them."""

    kind: str
    """'pairs', 'images' or 'text'."""
    records: list
    name: str
    rejected: Counter = field(default_factory=Counter)
    classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)


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


def _expand(pattern: str) -> list[Path]:
    p = Path(pattern)
    if p.is_dir():
        return sorted(q for q in p.iterdir() if q.suffix == ".tar")
    if p.is_file():
        return [p]
    return sorted(Path(m) for m in glob.glob(pattern, recursive=True))


def _end_marker_present(f, end: int, size: int) -> bool:
    """A complete tar ends with two zero blocks after its last member."""
    if size - end < 1024:
        return False
    f.seek(end)
    return not any(f.read(1024))


def tar_pairs(pattern: str) -> Source:
    """WebDataset shards: members sharing a key (name up to the first dot) form one sample.

    A shard cut short (a failed upload or copy) keeps the samples before the cut and is counted
    as truncated; a member whose header claims more bytes than the file holds is not used."""
    shards = _expand(pattern)
    if not shards:
        raise DataError(f"no tar shards match {pattern}")
    records, rejected = [], Counter()
    for shard in shards:
        groups: dict[str, dict[str, TarMember]] = {}
        try:
            size = shard.stat().st_size
            with open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                end = 0
                for info in tar:
                    end = info.offset_data + info.size
                    if not info.isfile():
                        continue
                    if end > size:
                        rejected["tar member past the end of its shard"] += 1
                        continue
                    name = Path(info.name)
                    key = str(name.parent / name.name.split(".", 1)[0])
                    ext = "." + name.name.split(".", 1)[1].lower() if "." in name.name else ""
                    groups.setdefault(key, {})[ext] = TarMember(shard, info.offset_data, info.size, ext)
                end = -(-end // 512) * 512
                if not _end_marker_present(f, end, size):
                    rejected["truncated tar shard"] += 1
        except (tarfile.TarError, OSError):
            rejected["corrupt tar shard (read up to the damage)"] += 1
        for key, members in groups.items():
            image = next((m for ext, m in members.items() if ext in IMAGE_SUFFIXES), None)
            caption = next((members[e] for e in CAPTION_SUFFIXES if e in members), None)
            if image is None or caption is None:
                rejected["incomplete tar sample"] += 1
                continue
            records.append(PairRecord(image, caption))
    return Source("pairs", records, pattern, rejected)


def _undecodable(value: str | None) -> bool:
    return value is not None and any("\udc80" <= ch <= "\udcff" for ch in value)


def csv_pairs(path: str, image_column: str = "image", caption_column: str = "caption") -> Source:
    """CSV (or TSV by suffix) with a header; relative image paths are relative to the file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"pair file {p} does not exist")
    delimiter = "\t" if p.suffix.lower() in (".tsv", ".tab") else ","
    records, rejected = [], Counter()
    # Bytes that are not UTF-8 survive as surrogates, so one bad row is counted, not fatal.
    with p.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = [c for c in (image_column, caption_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(
                f"{p} has no column {missing[0]!r} (columns: {', '.join(reader.fieldnames or [])}); "
                f"name the columns with image_column / caption_column"
            )
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error:
                rejected["malformed csv row"] += 1
                continue
            image, caption = row.get(image_column), row.get(caption_column)
            if _undecodable(image) or _undecodable(caption):
                rejected["undecodable csv row"] += 1
            elif not image:
                rejected["csv row without an image"] += 1
            else:
                records.append(PairRecord(p.parent / image, caption or ""))
    return Source("pairs", records, str(p), rejected)


def image_folder(path: str) -> Source:
    """Every image below `path`; the first-level sub-folder names are the class labels."""
    root = Path(path)
    files = find_images([root])
    classes = sorted({f.relative_to(root).parts[0] for f in files if len(f.relative_to(root).parts) > 1})
    index = {c: i for i, c in enumerate(classes)}
    records = [ImageRecord(f, index.get(f.relative_to(root).parts[0], -1) if classes else -1) for f in files]
    return Source("images", records, str(root), classes=classes)


def text_file(path: str, field_name: str = "text") -> Source:
    """A .txt file (one text per non-empty line) or .jsonl (the `field_name` of each object)."""
    p = Path(path)
    files = sorted(p.rglob("*")) if p.is_dir() else _expand(path)
    files = [f for f in files if f.is_file() and f.suffix.lower() in (".txt", ".jsonl")]
    if not files:
        raise DataError(f"no .txt or .jsonl files match {path}")
    records, rejected = [], Counter()
    for f in files:
        jsonl = f.suffix.lower() == ".jsonl"
        for raw in f.read_bytes().splitlines():
            try:
                line = raw.decode("utf-8")
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
                line = obj.get(field_name) if isinstance(obj, dict) else None
                if not isinstance(line, str):
                    rejected["json line without a text string"] += 1
                    continue
            records.append(line)
    return Source("text", records, path, rejected)
