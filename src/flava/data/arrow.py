"""Parquet files and Hugging Face `datasets` directories (Arrow) as data sources, read with pyarrow alone.

A spec is `PATH[:SPLIT][?KEY=COLUMN&...]`:

- PATH: a .parquet file, a directory of .parquet files (its sub-folders too), a glob
  ending in .parquet, or a directory written by `Dataset.save_to_disk` (state.json + Arrow
  stream files) or `DatasetDict.save_to_disk` (dataset_dict.json + one sub-directory a split);
- SPLIT: the split of a DatasetDict directory, needed when it holds more than one;
- KEY=COLUMN: which column plays which part: `image` and `caption` (pairs), `image` and `label`
  (images), `text` (text). Without them the first present of image/img/jpg/png and
  caption/text/sentence/txt is taken, `label` when present, and `text`. The same names can be
  given as keyword arguments. Example: `cc3m:train?image=jpg&caption=txt`.

Image cells may be Hugging Face Image structs {bytes, path}, plain binary, or a path string;
a path relative to the file that holds it is resolved against that file's directory. Each row
group (parquet) or record batch (Arrow) is a shard: only file metadata is read when the source is
built; captions, labels and texts when a stream reaches the shard; images as (file, unit, row)
references when used, through a small per-process cache of the last decoded units. Parquet is decoded a whole row group at a
time, so image parquet should be written with small row groups (`datasets` uses 100 rows).
"""

from __future__ import annotations

import functools
import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import DataError
from ..io.files import read_json
from .images import files_below, holds_below
from .members import Blob, ImageURL, table_image
from .sources import ImageRecord, Opened, PairRecord, Source

IMAGE_COLUMNS = ("image", "img", "jpg", "png")
CAPTION_COLUMNS = ("caption", "text", "sentence", "txt")
_KEYS = {"pairs": ("image", "caption"), "images": ("image", "label"), "text": ("text",)}
_DEFAULTS = {"image": IMAGE_COLUMNS, "caption": CAPTION_COLUMNS, "text": ("text",), "label": ("label",)}


# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class _Spec:
    text: str
    path: str
    split: str | None
    columns: dict


def _split_query(spec: str) -> tuple[str, str]:
    # `?` is also a glob wildcard: a suffix counts as column options only when it holds a `=`.
    head, sep, query = spec.rpartition("?")
    return (head, query) if sep and "=" in query else (spec, "")


def _split_split(path: str) -> tuple[str, str | None]:
    if Path(path).exists() or ":" not in path:
        return path, None
    head, _, split = path.rpartition(":")
    if split and "/" not in split and Path(head).is_dir():
        return head, split
    return path, None


def _parse(spec: str, kind: str, overrides: dict[str, str | None]) -> _Spec:
    rest, query = _split_query(spec)
    path, split = _split_split(rest)
    columns: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or not key or not value:
            raise DataError(f"{spec}: column option {item!r} must look like key=column")
        columns[key] = value
    for key, value in overrides.items():
        if value is None:
            continue
        if columns.get(key, value) != value:
            raise DataError(f"{spec}: the {key} column is named twice ({columns[key]!r} and {value!r})")
        columns[key] = value
    unknown = [k for k in columns if k not in _KEYS[kind]]
    if unknown:
        raise DataError(f"{spec}: {unknown[0]!r} is not a column option for {kind}; "
                        f"use {', '.join(_KEYS[kind])}")
    return _Spec(spec, path, split, columns)


def missing_with_columns(spec: str) -> str | None:
    """The path of a spec that names columns (`PATH?image=COL`) where nothing lies; None otherwise."""
    path, query = _split_query(str(spec))
    path = _split_split(path)[0]
    return path if query and not Path(path).exists() and not glob.has_magic(path) else None


def is_arrow_spec(spec: str) -> bool:
    """Whether `spec` names parquet data or a `save_to_disk` directory (so the arrow_* readers should read it)."""
    path, _ = _split_split(_split_query(str(spec))[0])
    if path.lower().endswith(".parquet"):
        return True
    p = Path(path)
    return p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()
                           or holds_below(p, (".parquet",)))


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class _Shard:
    """One data file: parquet (read by row group) or an Arrow IPC stream (read by record batch)."""

    path: str
    format: str


@functools.lru_cache(maxsize=8)
def _arrow_batches(path: str) -> list[pa.RecordBatch]:
    # Memory-mapped and zero-copy, as `datasets` reads them: only the pages used are loaded.
    with pa.ipc.open_stream(pa.memory_map(path)) as reader:
        return list(reader)


@functools.lru_cache(maxsize=4)
def _parquet_unit(path: str, unit: int, column: str) -> pa.Array:
    return pq.ParquetFile(path).read_row_group(unit, columns=[column]).column(0).combine_chunks()


def _unit(shard: _Shard, unit: int, column: str) -> pa.Array:
    if shard.format == "arrow":
        return _arrow_batches(shard.path)[unit].column(column)
    return _parquet_unit(shard.path, unit, column)


def _open(shard: _Shard) -> tuple[pa.Schema, list[int]]:
    """Schema and rows per unit, read without decoding any data."""
    try:
        if shard.format == "arrow":
            batches = _arrow_batches(shard.path)
            if not batches:
                with pa.ipc.open_stream(pa.memory_map(shard.path)) as reader:
                    return reader.schema, []
            return batches[0].schema, [b.num_rows for b in batches]
        meta = pq.ParquetFile(shard.path).metadata
        return meta.schema.to_arrow_schema(), [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    except (pa.ArrowException, OSError) as e:
        what = "an Arrow stream file" if shard.format == "arrow" else "a parquet file"
        raise DataError(f"{shard.path} could not be read as {what} ({e})") from None


def _read_json(path: Path) -> dict:
    return read_json(path, "dataset file", DataError, expect=dict)


def _shards(spec: _Spec) -> tuple[list[_Shard], dict]:
    """The data files of a spec, in order, and the `datasets` features when recorded."""
    p = Path(spec.path)
    if p.is_dir() and (p / "dataset_dict.json").is_file():
        splits = [str(s) for s in _read_json(p / "dataset_dict.json").get("splits", [])]
        split = spec.split
        if split is None:
            if len(splits) != 1:
                raise DataError(f"{p} holds the splits {', '.join(splits) or '(none)'}; name one, e.g. "
                                f"{p}:{splits[0] if splits else 'train'}")
            split = splits[0]
        elif split not in splits:
            raise DataError(f"{p} has no split {split!r}; it holds {', '.join(splits)}")
        p = p / split
        if not (p / "state.json").is_file():
            raise DataError(f"{p} (split {split!r}) has no state.json; the dataset directory is incomplete")
    elif spec.split is not None:
        raise DataError(f"{spec.text}: a split applies only to a DatasetDict directory (one with dataset_dict.json)")

    if p.is_dir() and (p / "state.json").is_file():
        state = _read_json(p / "state.json")
        if state.get("_indices_data_files"):
            raise DataError(f"{p} keeps an indices mapping (an old `datasets` layout); load it with `datasets` "
                            f"and save it again after flatten_indices()")
        names = [f.get("filename") for f in state.get("_data_files", []) if isinstance(f, dict)]
        for name in names:
            if not name or not (p / name).is_file():
                raise DataError(f"{p}: data file {name!r} listed in state.json is missing")
        info = p / "dataset_info.json"
        features = (_read_json(info).get("features") or {}) if info.is_file() else {}
        return [_Shard(str(p / n), "arrow") for n in names], features

    if p.is_dir():
        files = [f for f in files_below(p, (".parquet",)) if f.is_file()]  # not ._x.parquet
    elif p.is_file():
        files = [p]
    else:
        files = sorted(Path(m) for m in glob.glob(spec.path, recursive=True) if Path(m).is_file())
    if not files:
        raise DataError(f"no parquet files or datasets directory match {spec.path}")
    return [_Shard(str(f), "parquet") for f in files], {}


def _hf_features(schema: pa.Schema) -> dict:
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        return (json.loads(raw).get("info", {}).get("features") or {}) if raw else {}
    except (json.JSONDecodeError, AttributeError):
        return {}


# --------------------------------------------------------------------------- image cells


@dataclass(frozen=True)
class ArrowImage:
    """One image cell, read when the image is used. It offers `exists` and `read_bytes` like a
    Path, which is what `decode.open_image` asks of an image file."""

    shard: _Shard
    column: str
    unit: int
    row: int

    def _ref(self) -> Path | Blob | ImageURL | None:
        """What the cell holds, as a table's image cell is read (`members.table_image`): the bytes,
        a path relative to the file's folder, or a URL, which is not fetched."""
        value = _unit(self.shard, self.unit, self.column)[self.row].as_py()
        if isinstance(value, dict):  # the `datasets` Image struct
            value = value.get("bytes") or value.get("path")
        return table_image(Path(self.shard.path).parent, value) if value else None

    def exists(self) -> bool:
        ref = self._ref()
        return ref is not None and (not isinstance(ref, Path) or ref.is_file())

    def missing(self) -> str:
        """Why a cell that does not `exist` gives no image: empty (null, no bytes), or a missing file."""
        return "row without an image" if self._ref() is None else "missing image file"

    def read_bytes(self) -> bytes:
        ref = self._ref()
        return ref.read_bytes() if isinstance(ref, Path) else ref.read()  # a URL's read says it is not fetched

    def file(self) -> Path | None:
        """The local image file a path cell names; None for a bytes cell (not read to say so) or a URL."""
        if _holds_bytes(self.shard, self.column):
            return None
        ref = self._ref()
        return ref if isinstance(ref, Path) else None

    def locator(self) -> str:
        """The image file a path cell names (or its URL), or where the bytes of a bytes cell are:
        `FILE#UNIT:ROW:COLUMN`, which `image_cell` reads again."""
        if not _holds_bytes(self.shard, self.column):  # a bytes column's cells are not read to name them
            ref = self._ref()
            if isinstance(ref, (Path, ImageURL)):
                return str(ref.resolve() if isinstance(ref, Path) else ref)
        return f"{Path(self.shard.path).resolve()}#{self.unit}:{self.row}:{self.column}"


@functools.lru_cache(maxsize=64)
def _holds_bytes(shard: _Shard, column: str) -> bool:
    t = _open(shard)[0].field(column).type
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


@functools.lru_cache(maxsize=2)
def _other_rows(shard: _Shard, unit: int, leave_out: tuple[str, ...]) -> list[dict]:
    schema = _open(shard)[0]
    # Binary and image-struct columns are images, not metadata.
    names = [f.name for f in schema if f.name not in leave_out and not pa.types.is_binary(f.type)
             and not pa.types.is_large_binary(f.type) and not (pa.types.is_struct(f.type) and _is_image_type(f.type))]
    try:
        if shard.format == "arrow":
            return _arrow_batches(shard.path)[unit].select(names).to_pylist()
        return pq.ParquetFile(shard.path).read_row_group(unit, columns=names).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{shard.path}: its other columns could not be read ({e})") from None


def other_cells(ref: ArrowImage, leave_out: tuple[str, ...]) -> dict:
    """The cells of `ref`'s row outside the columns `leave_out` names and the image columns (what
    `flava embed` keeps as metadata, as it keeps a CSV's other columns); a unit is read once."""
    return _other_rows(ref.shard, ref.unit, tuple(sorted({ref.column, *leave_out})))[ref.row]


def image_cell(name: str) -> ArrowImage | None:
    """The cell an `ArrowImage.locator` of a bytes cell names; None for any other text."""
    m = re.fullmatch(r"(.+\.(parquet|arrow))#(\d+):(\d+):(.+)", name, flags=re.IGNORECASE | re.DOTALL)
    if not m:
        return None
    file, fmt, unit, row, column = m.groups()
    return ArrowImage(_Shard(file, fmt.lower()), column, int(unit), int(row))


def _is_image_type(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        names = {t.field(i).name for i in range(t.num_fields)}
        return bool(names & {"bytes", "path"})
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_string(t) or \
        pa.types.is_large_string(t)


def _is_text_type(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


# --------------------------------------------------------------------------- sources


_CHECKS = {
    "image": (_is_image_type, "an image struct {bytes, path}, binary or a path string"),
    "caption": (_is_text_type, "a string"),
    "text": (_is_text_type, "a string"),
    "label": (pa.types.is_integer, "an integer class index"),
}


def _resolve_columns(spec: _Spec, kind: str, schema: pa.Schema, where: str) -> dict[str, str]:
    """Part -> column name, from the spec or the default names; each checked for its type."""
    names = schema.names
    defaults = _DEFAULTS
    out = {}
    for part in _KEYS[kind]:
        name = spec.columns.get(part) or next((c for c in defaults[part] if c in names), None)
        if name is None:
            if part == "label":
                continue  # optional: unlabelled images
            raise DataError(f"{where} has no {part} column ({' / '.join(defaults[part])}); its columns are "
                            f"{', '.join(names)}: name one with ?{part}=COLUMN")
        if name not in names:
            raise DataError(f"{where} has no column {name!r}; its columns are {', '.join(names)}")
        if names.count(name) > 1:  # pyarrow's schema.field raised, a traceback: which one was meant?
            raise DataError(f"{where} names column {name!r} {names.count(name)} times; rename or remove all but one")
        ok, wanted = _CHECKS[part]
        if not ok(schema.field(name).type):
            raise DataError(f"{where}: column {name!r} holds {schema.field(name).type}; the {part} must be {wanted}")
        out[part] = name
    return out


@dataclass(frozen=True)
class _UnitShard:
    """One parquet row group or Arrow record batch: the unit a stream reads at a time."""

    file: _Shard
    unit: int
    rows: int
    kind: str
    columns: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        return f"{self.file.path}#{self.unit}"

    def _values(self, column: str) -> list:
        try:
            return _unit(self.file, self.unit, column).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{self.name}: column {column!r} could not be read ({e})") from None

    def open(self) -> Opened:
        cols = dict(self.columns)
        if self.kind == "text":
            return Opened([t or "" for t in self._values(cols["text"])])
        refs = [ArrowImage(self.file, cols["image"], self.unit, r) for r in range(self.rows)]
        if self.kind == "pairs":
            # A missing caption becomes "", which the pipeline skips as "empty caption".
            return Opened([PairRecord(ref, c or "") for ref, c in zip(refs, self._values(cols["caption"]))])
        labels = self._values(cols["label"]) if "label" in cols else [None] * len(refs)
        return Opened([ImageRecord(ref, -1 if y is None else int(y)) for ref, y in zip(refs, labels)])


def _build(spec: _Spec, kind: str) -> Source:
    files, features = _shards(spec)
    columns: dict[str, str] | None = None
    shards: list[_UnitShard] = []
    for file in files:
        schema, unit_rows = _open(file)
        if columns is None:
            first_names = schema.names  # what the defaults were chosen among (said below)
            columns = _resolve_columns(spec, kind, schema, file.path)
            features = features or _hf_features(schema)
        else:
            # Every file must hold the columns the first one was read by.
            _resolve_columns(_Spec(spec.text, spec.path, spec.split, columns), kind, schema, file.path)
        shards += [_UnitShard(file, u, n, kind, tuple(columns.items())) for u, n in enumerate(unit_rows) if n]
    if not shards:
        raise DataError(f"{spec.text} holds no rows")
    classes = []
    if kind == "images" and columns and "label" in columns:
        names = (features.get(columns["label"]) or {}).get("names") if isinstance(features, dict) else None
        classes = [str(n) for n in names] if isinstance(names, list) else []
    source = Source(kind, name=spec.text, classes=classes, shards=shards, size=sum(s.rows for s in shards))
    source.known_bytes = sum(Path(f.path).stat().st_size for f in files)  # an edit keeping the rows (see sources)
    for part, chosen in (columns or {}).items():  # a default picked among several: which one is said
        others = [c for c in _DEFAULTS.get(part, ()) if c in first_names and c != chosen]
        if not spec.columns.get(part) and others:
            source.listing_notes.append(f"its {part}s are column {chosen!r} (also there: {', '.join(others)}); "
                                        f"to read another, name it: ?{part}=COLUMN")
    return source


def arrow_pairs(spec: str, image_column: str | None = None, caption_column: str | None = None) -> Source:
    """Image-text pairs from parquet or a `save_to_disk` directory (see the module docstring)."""
    return _build(_parse(spec, "pairs", {"image": image_column, "caption": caption_column}), "pairs")


def arrow_images(spec: str, image_column: str | None = None, label_column: str | None = None) -> Source:
    """Images (with integer labels when a label column exists; -1 where a label is null). The
    class names come from the `datasets` ClassLabel feature when the files record it."""
    return _build(_parse(spec, "images", {"image": image_column, "label": label_column}), "images")


def arrow_text(spec: str, text_column: str | None = None) -> Source:
    """Texts, one per row; null texts become "" and are skipped by the pipeline as "empty text"."""
    return _build(_parse(spec, "text", {"text": text_column}), "text")
