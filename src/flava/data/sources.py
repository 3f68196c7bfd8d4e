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
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .images import IMAGE_SUFFIXES, find_images

CAPTION_SUFFIXES = (".txt", ".caption", ".json")


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
        return ref.convert("RGB")
    try:
        if isinstance(ref, TarMember):
            data = ref.read()
        else:
            if not ref.exists():
                raise BadSample("missing image file")
            data = ref.read_bytes()
        if not data:
            raise BadSample("empty image file")
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except BadSample:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
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
        except json.JSONDecodeError:
            raise BadSample("unreadable caption json") from None
        text = (obj.get("caption") or obj.get("text") or "") if isinstance(obj, dict) else ""
    return text


def _expand(pattern: str) -> list[Path]:
    p = Path(pattern)
    if p.is_dir():
        return sorted(q for q in p.iterdir() if q.suffix == ".tar")
    if p.is_file():
        return [p]
    return sorted(Path(m) for m in glob.glob(pattern, recursive=True))


def tar_pairs(pattern: str) -> Source:
    """WebDataset shards: members sharing a key (name up to the first dot) form one sample."""
    shards = _expand(pattern)
    if not shards:
        raise DataError(f"no tar shards match {pattern}")
    records, rejected = [], Counter()
    for shard in shards:
        groups: dict[str, dict[str, TarMember]] = {}
        try:
            with tarfile.open(shard, "r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    name = Path(info.name)
                    key = str(name.parent / name.name.split(".", 1)[0])
                    ext = "." + name.name.split(".", 1)[1].lower() if "." in name.name else ""
                    groups.setdefault(key, {})[ext] = TarMember(shard, info.offset_data, info.size, ext)
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


def csv_pairs(path: str, image_column: str = "image", caption_column: str = "caption") -> Source:
    """CSV (or TSV by suffix) with a header; relative image paths are relative to the file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"pair file {p} does not exist")
    delimiter = "\t" if p.suffix.lower() in (".tsv", ".tab") else ","
    with p.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = [c for c in (image_column, caption_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(
                f"{p} has no column {missing[0]!r} (columns: {', '.join(reader.fieldnames or [])}); "
                f"name the columns with image_column / caption_column"
            )
        records = [PairRecord(p.parent / row[image_column], row[caption_column] or "") for row in reader]
    return Source("pairs", records, str(p))


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
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            if f.suffix.lower() == ".jsonl":
                try:
                    line = json.loads(line).get(field_name, "")
                except (json.JSONDecodeError, AttributeError):
                    rejected["unreadable json line"] += 1
                    continue
            records.append(line)
    return Source("text", records, path, rejected)
