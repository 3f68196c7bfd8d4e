"""Vector indexes over `flava embed` runs, with FAISS.

An index directory:

```
IDX/
  index-00001.faiss               the FAISS index (inner product over L2-normalised vectors = cosine);
                                  one file per `add`, named by index.json
  index.json                      model, checkpoint, modality, dimension, size, FAISS factory string,
                                  nprobe, sources (and the fingerprint of each one's inputs:
                                  source_inputs), the index file and the metadata files (for texts,
                                  the column holding each file's texts: text_fields)
  metadata/metadata_00000.parquet one row per vector, in index order; one file per `add` (an image
                                  read from a local file: its size and time, `embed.FILE_COLUMNS`)
  .lock                           held by `flava index --add`
```

An `add` writes its new files beside the old ones and commits by renaming index.json over the
old one, so a kill at any point leaves the index as it was before or after, never between.

Small collections get an exact index; above `EXACT_MAX` vectors an inverted-file index whose
lists hold the vectors themselves when they fit the memory budget, else product-quantized codes
sized to fit it. `add` extends an index with new embeddings without rebuilding it; `add_embeddings`
skips a run's items the index holds already (`item_key`, found by `VectorIndex.holding`) unless they
changed since (by their file's size and time, else by their vector: `VectorIndex.changed`).
"""

from __future__ import annotations

import bisect
import json
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError, InputError
from ..io.files import building, check_not_current, fsync_file, read_json, replace_dir, write_json_atomic
from ..io.fingerprint import describe_checkpoint, same_checkpoint
from ..io.locks import hold
from .embed import FILE_COLUMNS, SETTINGS, read_embeddings, without_file_columns

INDEX_FILE = "index.faiss"
"""The FAISS file of indexes written before index.json named it."""
INFO_FILE = "index.json"
LOCK = ".lock"
EXACT_MAX = 100_000
"""Up to this many vectors the index is exact (a flat scan of 100k x 768 takes ~10 ms)."""
DEFAULT_MEMORY = 16 * 2**30
TRAIN_PER_LIST = 64
"""Training vectors per inverted list (FAISS warns below 39)."""
SAME_VECTOR = 0.9999
"""Cosine from which a run's vector of an item the index holds is the vector held: the same image
embedded again by the same checkpoint differs by float noise only (~1e-6); another picture saved
over it, even a near copy (two noisy squares of one colour to the tiny test model: 0.9994), by more."""


def parse_memory(text: str | int | None) -> int:
    """'4GB', '512MiB', '2e9' or bytes -> bytes."""
    if text is None:
        return DEFAULT_MEMORY
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*((?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*([kmgt]?i?b?)?\s*", str(text).lower())
    size = float(m.group(1)) if m else math.nan
    if not math.isfinite(size):  # 1.2.3GB; 1e400
        raise InputError(f"memory budget {text!r} is not a size; write e.g. 4GB or 512MB")
    unit = (m.group(2) or "b").rstrip("b").rstrip("i")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[unit]
    return int(size * scale)


def not_an_index(p: Path, embeddings: str | os.PathLike | None = None) -> DataError:
    """Why `p` cannot be searched or added to, with the command that builds an index (into a folder
    that command takes: not an embed folder, nor one holding other files)."""
    if (p / SETTINGS).is_file():
        return DataError(f"{p} holds `flava embed` output, not a vector index; build one from it with "
                         f"`flava index --embeddings {p} --output NEW_DIR` and use that")
    into = p if not p.exists() or (p.is_dir() and not any(p.iterdir())) else "NEW_DIR"
    return DataError(f"{p} is not a vector index (no {INFO_FILE}); build one with `flava index --embeddings "
                     f"{embeddings or 'DIR'} --output {into}`" + (" (without --add)" if embeddings else ""))


def _size(n: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.0f} {unit}" if n >= 100 * scale else f"{n / scale:.3g} {unit}"
    return f"{n:,} bytes"


RERANKED = 4
"""A product-quantized index's shortlist per hit asked for, ranked again by cosine (`VectorIndex._cosines`)."""


def choose_factory(n: int, dim: int, memory: int) -> tuple[str, int]:
    """(FAISS factory string, nprobe) for `n` vectors of `dim` floats within `memory` bytes."""
    flat_bytes = n * dim * 4
    if n <= EXACT_MAX:
        if flat_bytes > memory:
            raise InputError(f"{n} vectors of {dim} floats need {_size(flat_bytes)} exactly, over the memory budget "
                             f"of {_size(memory)}; raise --memory")
        return "Flat", 1
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    nprobe = max(1, min(nlist, nlist // 16))
    if flat_bytes * 1.1 <= memory:
        return f"IVF{nlist},Flat", nprobe
    for m in sorted((d for d in range(1, dim + 1) if dim % d == 0 and d <= 256), reverse=True):
        if n * (m + 8) * 1.1 <= memory:
            return f"IVF{nlist},PQ{m}", nprobe
    raise InputError(f"{n} vectors cannot be indexed in {memory / 2**20:.0f} MiB (the smallest codes take "
                     f"{n * 9 / 2**20:.0f} MiB); raise --memory")


@dataclass
class Hit:
    position: int
    """The vector's row in the index (`VectorIndex.metadata(position)`)."""
    score: float
    """Cosine similarity to the query."""
    item: str
    """The image path or the text ("" where the row has none)."""
    metadata: dict
    field: str = "image_path"
    """The metadata column `item` comes from."""


class VectorIndex:
    """A FAISS index and one metadata row per vector."""

    def __init__(self, path: Path, index, info: dict, table, starts: list[int] | None = None):
        self.path = Path(path)
        self.faiss_index = index
        self.info = info
        self._table, self._files = (without_file_columns(table), _file_columns(table)) if table is not None \
            else (None, None)
        """The rows' own metadata, and apart from it each row's image file identity (`FILE_COLUMNS`)."""
        self._lock = threading.RLock()  # serialises `add`
        self._starts = list(starts) if starts is not None else [0] * len(info.get("metadata_files", []))
        """The first position of each metadata file."""
        _direct_map(index)

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | os.PathLike) -> VectorIndex:
        import faiss
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = Path(path)
        if not (p / INFO_FILE).is_file():
            raise not_an_index(p)
        info = read_json(p / INFO_FILE, "index description", DataError, expect=dict)
        try:
            index = faiss.read_index(str(p / info.get("index_file", INDEX_FILE)))
            tables = [pq.read_table(p / "metadata" / name) for name in info["metadata_files"]]
        except (RuntimeError, OSError, KeyError, pa.ArrowException) as e:
            raise DataError(f"the index in {p} is damaged ({type(e).__name__}: {e}); build it again") from None
        table = pa.concat_tables(tables, promote_options="default") if tables else None
        if index.ntotal != info["size"] or (table is not None and table.num_rows != index.ntotal):
            raise DataError(f"the index in {p} holds {index.ntotal} vectors but its description says {info['size']}; "
                            f"build it again")
        if hasattr(index, "nprobe"):
            index.nprobe = info.get("nprobe", 1)
        starts = [0]
        for t in tables[:-1]:
            starts.append(starts[-1] + t.num_rows)
        return cls(p, index, info, table, starts[:len(tables)])

    # ------------------------------------------------------------------ facts

    @property
    def model(self) -> str | None:
        return self.info.get("model")

    @property
    def source_inputs(self) -> list[str | None]:
        """The inputs fingerprint of each source (None for those an earlier release added)."""
        known = self.info.get("source_inputs", [])
        return known + [None] * (len(self.info["sources"]) - len(known))

    @property
    def checkpoint(self) -> dict | None:
        """The checkpoint that made the vectors (`io.fingerprint`); None for older indexes."""
        return self.info.get("checkpoint")

    @property
    def modality(self) -> str:
        return self.info["modality"]

    @property
    def int8(self) -> bool | None:
        """Whether the vectors are the int8 model's (`embed --int8`); for an index older than this
        record, what the run it was built from says while it is there; None: not known."""
        if "int8" in self.info:
            return bool(self.info["int8"])
        for source in self.info.get("sources", [])[:1]:
            try:
                return bool(read_json(Path(source) / SETTINGS, "embedding settings", DataError, expect=dict)
                            .get("int8", False))
            except DataError:  # moved or deleted since: unknown
                pass
        return None

    @property
    def dim(self) -> int:
        return self.info["dim"]

    @property
    def factory(self) -> str:
        return self.info["factory"]

    def __len__(self) -> int:
        return self.faiss_index.ntotal

    def metadata(self, position: int) -> dict:
        if not 0 <= position < len(self):
            raise InputError(f"position {position} is outside the index (0..{len(self) - 1})")
        return self._table.slice(position, 1).to_pylist()[0]

    def field(self, position: int) -> str:
        """The metadata column that holds the item at `position`: image_path, or the text's column
        in the embed run it came from (`caption` in indexes older than text_fields)."""
        if self.modality == "image":
            return "image_path"
        fields = self.info.get("text_fields") or []
        file = bisect.bisect_right(self._starts, position) - 1
        return fields[file] if 0 <= file < len(fields) else "caption"

    def _item(self, row: dict, position: int) -> str:
        value = row.get(self.field(position))
        return "" if value is None else str(value)  # a missing value is no text, not "None"

    def item(self, position: int) -> str:
        return self._item(self.metadata(position), position)

    def holding(self, rows: list[dict], text_field: str = "caption", keys: list[str | None] | None = None
                ) -> dict[int, list[int]]:
        """The positions holding the item (`item_key`) of each of `rows` (another run's metadata, its
        texts in `text_field`), by row number; a row the index does not hold is absent. One
        vectorised pass over the index's key column (`pyarrow.compute.is_in`: the image path, or
        each file's text column) finds the candidates, and only their rows are read whole: the cost
        grows with the run, not with the index. `keys`: the rows' `item_key`s, when the caller has them."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if self._table is None or not rows:
            return {}
        wanted: dict[str, list[int]] = {}
        keys = [item_key(row, self.modality, text_field) for row in rows] if keys is None else keys
        for i, key in enumerate(keys):
            if key is not None:
                wanted.setdefault(key, []).append(i)
        if self.modality == "image":
            segments = [(0, len(self), "image_path")]
            values = [row.get("image_path") for row in rows]
        else:  # each metadata file holds its texts in its own run's column
            segments = list(zip(self._starts, self._starts[1:] + [len(self)], map(self.field, self._starts)))
            values = [row.get(text_field) for row in rows]
        value_set = pa.array(list(dict.fromkeys(None if v is None else str(v) for v in values)), pa.string())
        held: dict[int, list[int]] = {}
        for start, end, field in segments:
            if field not in self._table.column_names or end <= start:
                continue
            column = self._table.column(field).slice(start, end - start)
            found = np.flatnonzero(pc.is_in(column, value_set=value_set).to_numpy(zero_copy_only=False))
            if not len(found):
                continue
            positions = found + start
            candidates = ([{"image_path": v} for v in column.take(found).to_pylist()] if self.modality == "image"
                          else self._table.take(positions).to_pylist())
            for position, row in zip(positions.tolist(), candidates):
                if (key := item_key(row, self.modality, field)) is not None:
                    for i in wanted.get(key, ()):
                        held.setdefault(i, []).append(position)
        return held

    def files(self, positions: list[int]) -> list[tuple[int, int] | None]:
        """The (size, mtime_ns) of the image file each position's vector was made from (`FILE_COLUMNS`);
        None where it is not known (an image in a shard, image bytes, a vector an older version added)."""
        if self._files is None or not positions:
            return [None] * len(positions)
        rows = self._files.take(positions)
        sizes, times = (rows.column(c).to_pylist() for c in FILE_COLUMNS)
        return [None if s is None or t is None else (s, t) for s, t in zip(sizes, times)]

    def changed(self, held: dict[int, list[int]], vectors: np.ndarray, chunk: int = 8192) -> list[int]:
        """The rows of `held` (`holding`) whose vector in `vectors` (an embed run of the index's own
        checkpoint) is at none of the positions holding the item: its image changed since it was
        indexed (a file saved over, a shard rewritten in place). The run's vectors are compared as the
        index stores them (encoded and decoded: a quantized index holds approximate vectors)."""
        pairs = np.array([(row, p) for row, positions in held.items() for p in positions], np.int64).reshape(-1, 2)
        same = np.zeros(len(pairs), bool)
        for lo in range(0, len(pairs), chunk):  # in chunks: a whole folder embedded again may be millions of rows
            rows, positions = pairs[lo:lo + chunk, 0], pairs[lo:lo + chunk, 1]
            stored = self.faiss_index.reconstruct_batch(positions)
            new = self.faiss_index.sa_decode(self.faiss_index.sa_encode(np.ascontiguousarray(vectors[rows],
                                                                                             np.float32)))
            norms = np.linalg.norm(stored, axis=1) * np.linalg.norm(new, axis=1)
            same[lo:lo + chunk] = (stored * new).sum(axis=1) >= SAME_VECTOR * np.maximum(norms, 1e-12)
        unchanged = set(pairs[same, 0].tolist())
        return sorted(set(held) - unchanged)

    def vector(self, position: int) -> np.ndarray:
        """The stored vector (decoded: approximate for quantized indexes)."""
        if not 0 <= position < len(self):
            raise InputError(f"position {position} is outside the index (0..{len(self) - 1})")
        return self.faiss_index.reconstruct(int(position))

    # ------------------------------------------------------------------ searching

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """The `k` nearest vectors of each query row, best first."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise InputError(f"queries have {q.shape[1]} dimensions but the index holds {self.dim}; embed them with "
                             f"the index's model ({self.model})")
        if k < 1:
            raise InputError(f"k must be at least 1; got {k}")
        if len(self) == 0:
            return [[] for _ in q]
        quantized = ",PQ" in self.factory
        # FAISS searches run concurrently; only `add` changes the index (no server adds).
        scores, ids = self.faiss_index.search(q, min(k * RERANKED if quantized else k, len(self)))
        if quantized:
            scores, ids = self._cosines(q, ids, k)
        out = []
        for row_scores, row_ids in zip(scores, ids):
            valid = [(int(i), float(s)) for i, s in zip(row_ids, row_scores) if i >= 0]
            rows = self._table.take([i for i, _ in valid]).to_pylist() if valid else []
            out.append([Hit(i, s, self._item(row, i), row, self.field(i)) for (i, s), row in zip(valid, rows)])
        return out

    def _cosines(self, q: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """A product-quantized index's shortlist ranked by cosine with the decoded vectors, best `k`:
        their inner products, which FAISS ranks by, are of vectors the codes shortened or lengthened,
        and scored past 1 (1.003), with an indexed image's own vector not first."""
        scores = np.full(ids.shape, -np.inf, dtype=np.float32)
        for row, (query, found) in enumerate(zip(q, ids)):
            valid = found >= 0
            decoded = self.faiss_index.reconstruct_batch(found[valid].astype(np.int64))
            norms = np.linalg.norm(decoded, axis=1)
            scores[row, valid] = decoded @ query / np.maximum(norms, 1e-12) / max(float(np.linalg.norm(query)), 1e-12)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        ids = np.where(np.isfinite(np.take_along_axis(scores, order, 1)), np.take_along_axis(ids, order, 1), -1)
        return np.take_along_axis(scores, order, 1), ids

    # ------------------------------------------------------------------ growing

    def add(self, vectors: np.ndarray, metadata: list[dict], source: str | None = None,
            text_field: str = "caption", inputs: str | None = None,
            files: list[tuple[int, int] | None] | None = None) -> int:
        """Append vectors and their metadata rows (one parquet file per call; `text_field`: the
        column of the rows that holds a text index's texts; `inputs`: the embed run's fingerprint
        of what it embedded; `files`: each image's file identity, `Embeddings.files`); returns the
        new size."""
        import faiss

        from .embed import save_parquet

        v = np.ascontiguousarray(vectors, dtype=np.float32)
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise DataError(f"the new embeddings have shape {list(v.shape)}; the index holds {self.dim}-dimensional "
                            f"vectors")
        if len(v) != len(metadata):
            raise DataError(f"{len(v)} vectors but {len(metadata)} metadata rows")
        if files is not None and self.modality == "image":  # a text index's items are no files
            metadata = [{**row, **dict(zip(FILE_COLUMNS, f or ()))} for row, f in zip(metadata, files, strict=True)]
        with self._lock:
            n = len(self.info["metadata_files"])
            name, index_file = f"metadata_{n:05d}.parquet", f"index-{n + 1:05d}.faiss"
            # New files beside the old: nothing index.json names is touched until it is replaced.
            save_parquet(self.path / "metadata" / name, metadata)
            before = self.faiss_index.ntotal
            try:
                self.faiss_index.add(v)
                tmp = self.path / f".{index_file}.tmp"
                faiss.write_index(self.faiss_index, str(tmp))
                fsync_file(tmp)
                os.replace(tmp, self.path / index_file)
                info = {**self.info, "index_file": index_file, "metadata_files": self.info["metadata_files"] + [name],
                        "size": int(self.faiss_index.ntotal),
                        "sources": self.info["sources"] + ([source] if source else [])}
                if source:  # what each source embedded, which a copy of it elsewhere shares
                    info["source_inputs"] = self.source_inputs + [inputs]
                if self.modality == "text":  # runs differ: a text table keeps its own column's name
                    old = self.info.get("text_fields") or ["caption"] * n
                    info["text_fields"] = old + [text_field]
                write_json_atomic(self.path / INFO_FILE, info)  # the commit
            except BaseException:
                if self.faiss_index.ntotal != before:  # back to what the directory still holds
                    self.faiss_index = faiss.read_index(str(self.path / self.info.get("index_file", INDEX_FILE)))
                    _direct_map(self.faiss_index)
                raise
            self.info = info
            self._starts.append(before)
            remove_leftovers(self.path, keep=index_file)
            import pyarrow as pa
            import pyarrow.parquet as pq

            added = pq.read_table(self.path / "metadata" / name)
            rows, files = without_file_columns(added), _file_columns(added)
            self._table, self._files = (rows, files) if self._table is None else (
                pa.concat_tables([self._table, rows], promote_options="default"),
                pa.concat_tables([self._files, files]))
        return len(self)


def item_key(row: dict, modality: str, text_field: str = "caption") -> str | None:
    """What makes two metadata rows one item to an index of one model: an image by its path (or its
    shard#offset, its table cell) alone, as a label beside it depends on the folder named; a text
    with the rest of its row (the same caption of another image, or a row of another id, is another
    item), whichever column held it. None for a row that names no image: the same as no other."""
    if modality == "image":
        return None if row.get("image_path") is None else str(row["image_path"])
    rest = {k: v for k, v in row.items() if k != text_field and v is not None}  # None: a column another run had
    return json.dumps([row.get(text_field), rest], sort_keys=True, default=str)


@dataclass
class Added:
    """What `add_embeddings` did."""

    index: VectorIndex
    added: int
    skipped: int
    """The run's items already in the index, or named by an earlier row of the run (`item_key`), left out."""
    changed: int = 0
    """The run's images the index holds another vector of (changed since they were indexed): added
    again, among `added`; the old vectors stay until the index is rebuilt."""
    by_file: int = 0
    """Of the run's images the index holds, those judged changed or not by their file's size and time."""
    by_vector: int = 0
    """...and those judged by their vector: no file identity on one side (a shard's member, image bytes,
    a run or an index of an older version)."""


def _file_columns(table):
    """A metadata table's `FILE_COLUMNS`, null where it has none (the files of earlier adds, shards)."""
    import pyarrow as pa

    return pa.table({c: table.column(c).cast(pa.int64()) if c in table.column_names
                     else pa.nulls(table.num_rows, pa.int64()) for c in FILE_COLUMNS})


def remove_leftovers(directory: Path, keep: str) -> None:
    """Delete FAISS files index.json does not name (replaced ones, and those of killed adds)."""
    for p in directory.iterdir():
        if p.name != keep and p.is_file() and (p.name.endswith(".faiss") or p.name.endswith(".faiss.tmp")):
            p.unlink(missing_ok=True)


def _direct_map(index) -> None:
    """Inverted-file indexes find a stored vector by position only through a direct map, which
    FAISS keeps up to date on `add` once made."""
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # not an inverted-file index
        return
    if ivf.direct_map.type == faiss.DirectMap.NoMap:
        ivf.make_direct_map()


def _train_sample(vectors: np.ndarray, nlist: int, seed: int = 0) -> np.ndarray:
    n = min(len(vectors), nlist * TRAIN_PER_LIST)
    if n == len(vectors):
        return vectors
    return vectors[np.sort(np.random.default_rng(seed).choice(len(vectors), n, replace=False))]


def index_from_arrays(vectors: np.ndarray, items: list[str] | None, output: str | os.PathLike, *,
                      model: str | None = None, modality: str = "image", metadata: list[dict] | None = None,
                      memory: str | int | None = None, source: str | None = None,
                      checkpoint: dict | None = None, text_field: str = "caption",
                      inputs: str | None = None, files: list | None = None, int8: bool | None = None
                      ) -> VectorIndex:
    """Build an index directory from vectors in memory (`items` become image_path or caption;
    `text_field`: the column of `metadata` that holds a text index's texts; `files` and `int8` as
    `Embeddings` has them, int8 None: not recorded, not known)."""
    import faiss


    if modality not in ("image", "text"):
        raise InputError(f"modality must be 'image' or 'text'; got {modality!r}")
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    if v.ndim != 2 or len(v) == 0:
        raise DataError(f"no vectors to index (shape {list(v.shape)})")
    if metadata is None:
        field, text_field = ("image_path" if modality == "image" else "caption"), "caption"
        metadata = [{field: item} for item in (items or [str(i) for i in range(len(v))])]
    if len(metadata) != len(v):
        raise DataError(f"{len(v)} vectors but {len(metadata)} metadata rows")
    check_not_current(output)  # the index is moved into place whole
    out = Path(output).absolute()
    with building(out, "--output"):  # held from the check to the move: one build of `out` at a time
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            add = ", or add to it with `flava index --add`" if (out / INFO_FILE).is_file() else ""
            raise DataError(f"{out} already exists; choose a new directory{add}")
        factory, nprobe = choose_factory(len(v), v.shape[1], parse_memory(memory))
        index = faiss.index_factory(v.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            nlist = int(factory.split(",")[0][3:])
            index.train(_train_sample(v, nlist))
        info = {"model": model, "checkpoint": checkpoint, "modality": modality, "dim": int(v.shape[1]), "size": 0,
                "factory": factory, "nprobe": nprobe, "metric": "inner product (cosine)", "index_file": INDEX_FILE,
                "metadata_files": [], "sources": []}
        if int8 is not None:  # what `add` compares a run with: int8 and float vectors are never mixed
            info["int8"] = bool(int8)
        if hasattr(index, "nprobe"):
            index.nprobe = nprobe
        built: list[VectorIndex] = []

        def fill(staging: Path) -> None:
            (staging / "metadata").mkdir()
            faiss.write_index(index, str(staging / INDEX_FILE))
            write_json_atomic(staging / INFO_FILE, info)
            built.append(VectorIndex(staging, index, info, None))
            built[0].add(v, metadata, source, text_field, inputs, files)

        # Built beside the output and moved there whole: a stop while adding leaves no index that
        # looks finished with a part of its vectors, and nothing its rerun would refuse.
        replace_dir(out, fill)
        built[0].path = out
        return built[0]


def _repeats(keys: list[str | None]) -> set[int]:
    """The rows whose item (`item_key`) an earlier row of the same run names: an image of several
    captions (COCO's five), whose vector would otherwise come back once a caption."""
    seen: set[str] = set()
    out = set()
    for i, key in enumerate(keys):
        if key is not None:
            if key in seen:
                out.add(i)
            seen.add(key)
    return out


def build_index(embeddings: str | os.PathLike, output: str | os.PathLike, memory: str | int | None = None,
                which: str | None = None) -> Added:
    """An index of a finished `flava embed` directory (its image vectors, or its texts for a text
    run), one vector an item: `skipped` counts the rows naming an item an earlier row named."""
    e = read_embeddings(embeddings, which)
    repeats = _repeats([item_key(row, e.modality, e.text_field) for row in e.metadata])
    keep = [i for i in range(len(e.metadata)) if i not in repeats]
    index = index_from_arrays(e.vectors[keep], None, output, model=e.model, modality=e.modality,
                              metadata=[e.metadata[i] for i in keep], memory=memory,
                              source=str(Path(embeddings).resolve()), checkpoint=e.checkpoint,
                              text_field=e.text_field, inputs=e.inputs,
                              files=[e.files[i] for i in keep] if e.files else None, int8=e.int8)
    return Added(index, len(keep), len(repeats))


def add_embeddings(index_dir: str | os.PathLike, embeddings: str | os.PathLike, which: str | None = None
                   ) -> Added:
    """Extend an index with another embed run of the same model and modality (one writer at a
    time: the index directory's lock). The run's items the index holds already (`item_key`: a
    folder embedded again once it grew) are skipped, so no hit comes back twice; an image that
    changed since it was indexed (`VectorIndex.changed`) is added again, and counted."""
    if not (Path(index_dir) / INFO_FILE).is_file():  # checked first: the lock would be left in any folder
        raise not_an_index(Path(index_dir), embeddings)
    with hold(Path(index_dir) / LOCK, str(index_dir), "wait for the other `flava index --add` to end"):
        index = VectorIndex.open(index_dir)
        if which is not None and which != index.modality:  # one index never holds two modalities
            kind = f"{'an' if which == 'image' else 'a'} {which} index"
            raise DataError(f"the index {index_dir} holds {index.modality} vectors, not {which} ones: leave out "
                            f"--which {which} to add {embeddings}'s {index.modality} vectors, or build {kind}: "
                            f"flava index --embeddings {embeddings} --which {which} --output NEW_DIR")
        e = read_embeddings(embeddings, which or index.modality)
        if e.checkpoint and index.checkpoint:
            if not same_checkpoint(e.checkpoint, index.checkpoint):
                raise DataError(f"{embeddings} was embedded with {describe_checkpoint(e.checkpoint)} but the index "
                                f"holds vectors of {describe_checkpoint(index.checkpoint)}; embed with the same "
                                f"checkpoint")
        elif e.model != index.model:
            raise DataError(f"{embeddings} was embedded with {e.model} but the index holds {index.model}'s vectors; "
                            f"embed with the same model")
        if index.int8 is not None and e.int8 != index.int8:  # the same weights, but other vectors: never mixed
            kind = {True: "int8 embeddings (embed --int8)", False: "float embeddings (embed without --int8)"}
            raise DataError(f"{embeddings} holds {kind[e.int8]} but the index {index_dir} holds {kind[index.int8]}; "
                            f"one index never mixes the two, whose vectors differ: embed again "
                            f"{'with' if index.int8 else 'without'} --int8, or build a new index from {embeddings}")
        if e.vectors.shape[1] != index.dim:  # an older run or index, which records no checkpoint
            raise DataError(f"{embeddings} holds {e.vectors.shape[1]}-dimensional embeddings but the index "
                            f"{index_dir} holds {index.dim}-dimensional ones: embed with the index's model "
                            f"({index.model}), or build a new index from {embeddings}")
        source = str(Path(embeddings).resolve())
        keys = [item_key(row, index.modality, e.text_field) for row in e.metadata]
        held = index.holding(e.metadata, e.text_field, keys)
        # An image at a path the index holds may have changed since (a text's key is the text itself).
        # Its vector is added again rather than replaced: positions and the metadata files of earlier
        # adds stay as they are (a flat index renumbers on removal), and the count is said.
        changed, by_file, by_vector = [], {}, {}
        if index.modality == "image" and held:
            # Exactly, by the file's size and time where both sides know them, against the newest
            # vector held for it (what the index last saw of the file); else by the vector, which
            # another device or precision moves a little.
            rows = list(held)
            stored = index.files([max(held[i]) for i in rows])
            by_file = {i: f for i, f in zip(rows, stored) if f is not None and e.files and e.files[i] is not None}
            changed = [i for i, f in by_file.items() if f != e.files[i]]
            by_vector = {i: p for i, p in held.items() if i not in by_file}
            if by_vector:
                changed = sorted(changed + index.changed(by_vector, e.vectors))
        for i in changed:
            del held[i]
        repeats = _repeats(keys)
        keep = [i for i in range(len(e.metadata)) if i not in held and i not in repeats]
        if not keep:  # why, the most telling first
            # The same run (or the same inputs embedded elsewhere) is refused only when nothing in it
            # changed: images saved over in place keep the inputs' fingerprint (paths and captions).
            if any(s == source and (inputs is None or e.inputs is None or inputs == e.inputs)
                   for s, inputs in zip(index.info["sources"], index.source_inputs)):
                raise DataError(f"{embeddings} is already in the index {index_dir}")
            if e.inputs is not None and e.inputs in index.source_inputs:
                same = index.info["sources"][index.source_inputs.index(e.inputs)]
                raise DataError(f"{embeddings} embedded the same inputs as {same}, already in the index "
                                f"{index_dir}; adding them again would return every hit twice")
            raise DataError(f"all {len(e.metadata)} items of {embeddings} are already in the index {index_dir}; "
                            "nothing to add")
        # Vectors and metadata rows are taken by the same row numbers: position i stays row i's item.
        index.add(e.vectors[keep], [e.metadata[i] for i in keep], source, e.text_field, e.inputs,
                  [e.files[i] for i in keep] if e.files else None)
        return Added(index, len(keep), len(e.metadata) - len(keep), len(changed), len(by_file), len(by_vector))


def query_model(index: VectorIndex, name: str | None = None, allow_other: bool = False) -> tuple[str, str | None]:
    """(what to load, a warning or None): the model that embeds queries against `index`. Without
    `name`, the very checkpoint that made the vectors while it is there unchanged; a named model
    (or a run directory whose newest checkpoint has moved on) must have the same weights, or is
    refused unless `allow_other`, which returns the loud warning to show."""
    from ..errors import CheckpointError, ConfigError
    from ..io.checkpoint import checkpoint_dir
    from ..io.fingerprint import checkpoint_identity
    from ..io.runs import resolve

    recorded = index.checkpoint
    if recorded is None:  # an index of an older version: nothing to compare with
        if not (name or index.model):
            raise ConfigError(f"the index {index.path} does not record its model; name one with --model")
        return str(name or index.model), None
    gone = ""
    given = name is not None
    if name is None:
        own = Path(recorded["path"])
        if (own / "config.json").is_file() and same_checkpoint(checkpoint_identity(own, recorded), recorded):
            return str(own), None
        gone = f" ({own} is gone or changed)"
        name = index.model or str(own)
    try:
        path = checkpoint_dir(name) if Path(name).is_file() else resolve(name)
    except CheckpointError:
        if given:
            raise
        raise DataError(f"the index {index.path} was made with {describe_checkpoint(recorded)}, which is gone (moved "
                        "or deleted): name where it is now with --model") from None
    identity = checkpoint_identity(path)
    if same_checkpoint(identity, recorded):
        return str(path), None
    message = (f"the index {index.path} holds vectors of {describe_checkpoint(recorded)}{gone}, but {name} is "
               f"{describe_checkpoint(identity)}, another weights file (the same model saved in another format, "
               f"an export, is one too): queries it embeds may rank meaninglessly against them")
    if not allow_other:
        raise DataError(f"{message}; search with the index's own checkpoint, rebuild the index with this model, "
                        f"or pass --allow-other-model")
    return str(path), f"WARNING: {message} (--allow-other-model)"
