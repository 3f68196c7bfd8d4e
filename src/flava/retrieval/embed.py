"""Embeddings of images and texts, in batches, and `flava embed`'s resumable runs.

A run writes clip-retrieval's layout, one part per `part_size` inputs:

```
OUTPUT/
  embed.json                   model, modality, dimension, dtype, counts, failures (when done)
  img_emb/img_emb_00000.npy    [n, D] image embeddings of part 0 (pairs and images)
  text_emb/text_emb_00000.npy  [n, D] text embeddings of part 0 (pairs and texts)
  metadata/metadata_00000.parquet  one row per embedding: image_path and/or caption (a text table's text
                                   keeps its column's name), other columns, and for an image read from a
                                   local file its size and modification time (`FILE_COLUMNS`)
  parts/00000.json             written last: the part is complete (a rerun skips it)
```

Row i of a part's arrays and its metadata describe the same input; inputs that cannot be used
(an unreadable image, an empty text) are left out, counted and named in embed.json.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import stopping
from ..data.arrow import ArrowImage, is_arrow_spec, other_cells
from ..data.images import find_images
from ..data.processor import ImageInput
from ..data.members import BadSample, refuse_urls, table_image
from ..data.sources import read_caption
from ..data.tables import NOT_UTF8, is_table, kept_name, read_table
from ..errors import DataError, InputError
from ..io.files import disk_full, read_json, write_json_atomic
from ..io.locks import hold
from ..io.runs import LOCK
from ..io.fingerprint import describe_checkpoint, same_checkpoint
from ..model.flava import FlavaModel

SETTINGS = "embed_settings.json"
SUMMARY = "embed.json"
MODALITIES = ("image", "text", "pair")
# Failures named one by one in embed.json; beyond this they are only counted.
MAX_NAMED_FAILURES = 1000
FILE_COLUMNS = ("_file_size", "_file_mtime_ns")
"""Metadata columns (int64) of an image read from a local file: its size and modification time (ns) when
it was read, which tell `index --add` exactly whether it was saved over since (its vector cannot: another
device or precision moves it a little). Bookkeeping, not the input's: `read_embeddings` keeps them out of
`Embeddings.metadata`, and an index out of its hits. Null for images in shards, image bytes, older runs."""


class Embedder:
    """A model's contrastive embeddings of raw images and texts: L2-normalised float32 [N, D]."""

    def __init__(self, model: FlavaModel, batch_size: int = 32):
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1; got {batch_size}")
        self.model = model.eval()
        self.processor = model.processor
        self.batch_size = batch_size
        self.dim = model.config.projection_dim

    @property
    def device(self) -> torch.device:
        return self.model.device

    def pixels(self, pixels: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return self.model.encode_image(pixels.to(self.device)).float().cpu().numpy()

    def images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """[N, D]; a bad image raises DataError naming it."""
        out = [np.zeros((0, self.dim), np.float32)]
        for start in range(0, len(images), self.batch_size):
            out.append(self.pixels(self.processor.images(list(images[start:start + self.batch_size]))))
        return np.concatenate(out)

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """[N, D] for strings (truncated to the processor's max_length tokens)."""
        out = [np.zeros((0, self.dim), np.float32)]
        for start in range(0, len(texts), self.batch_size):
            tok = self.processor.texts(list(texts[start:start + self.batch_size]))
            with torch.inference_mode():
                out.append(self.model.encode_text(tok.input_ids.to(self.device),
                                                  tok.attention_mask.to(self.device)).float().cpu().numpy())
        return np.concatenate(out)


# --------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """What to embed: per input an image and/or a text, and its metadata row."""

    modality: str
    images: list | None = None
    texts: list | None = None
    metadata: list[dict] = field(default_factory=list)
    listing_rejected: Counter = field(default_factory=Counter)
    text_field: str = "caption"
    """The metadata column that holds each input's text: a text table's own column name."""
    left_out: Counter = field(default_factory=Counter)
    """Files in the folders named that are not images, by suffix: said, not inputs that failed."""
    listing_named: list[dict] = field(default_factory=list)
    """Inputs left out while listing them, named as embed.json's `failures` name the others."""
    lines: list[str] | None = None
    """Where each input is in the file it was read from ('FILE, line N'), for a table or a .txt: how
    embed.json names a failed input, as it names a table's bad rows."""

    def __len__(self) -> int:
        return len(self.metadata)

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.modality.encode())
        for row in self.metadata:
            h.update(json.dumps(row, sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]


def image_inputs(specs: Sequence[str]) -> Inputs:
    """Image files named by paths, folders (recursively) or globs; a file under a folder's
    sub-folder gets that sub-folder's name as its `label`."""
    rows, images, seen, twice, left_out, named = [], [], {}, Counter(), Counter(), []
    for spec in specs:
        root = Path(spec)
        for path in find_images([spec], left_out, utf8_names=True):
            # A dangling link is named as listed: its target's name would not say which file is broken.
            row = {"image_path": str(path.resolve()) if path.exists() else os.path.abspath(path)}
            if row["image_path"] in seen:  # a file and its folder both named, or a link: one vector, not two hits
                twice["image named twice"] += 1
                # Named as listed: a link and its target resolve alike.
                named.append({"image_path": os.path.abspath(path), "error": "image named twice",
                              "same_as": seen[row["image_path"]]})
                continue
            seen[row["image_path"]] = os.path.abspath(path)
            if root.is_dir() and len(path.relative_to(root).parts) > 1:
                row["label"] = path.relative_to(root).parts[0]
            rows.append(row)
            images.append(path)
    return Inputs("image", images=images, metadata=rows, listing_rejected=twice, left_out=left_out,
                  listing_named=named)


def text_inputs(path: str) -> Inputs:
    """One text per line of a .txt file, or the `text`/`caption` column of a table (CSV, TSV,
    JSONL, parquet; the text keeps its column's name in the metadata, beside the other columns)."""
    p = Path(path)
    if not p.is_file():
        if p.is_dir():
            raise DataError(f"{p} is a folder; --texts takes one file: a .txt (one text per line) or a table")
        raise DataError(f"text file {p} " + ("is not a regular file (a device or a pipe): save the texts to a file "
                                             "first" if p.exists() else "does not exist"))
    if is_table(p):
        table = read_table(p, bad_rows="skip")
        if not table.rows:
            raise DataError(_no_rows(table))
        column = table.column("text", "caption", "sentence")
        texts = [row.get(column) for row in table.rows]
        meta = [_with_others({column: t}, {k: v for k, v in row.values.items() if k != column})
                for t, row in zip(texts, table.rows)]
        return Inputs("text", texts=texts, metadata=meta, text_field=column,
                      listing_rejected=Counter(table.rejected), listing_named=_bad_rows(table),
                      lines=[row.where for row in table.rows])
    data = p.read_bytes()
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):  # Notepad's "Unicode", PowerShell's > (NULs in every ASCII letter)
        raise DataError(f"{p} is UTF-16 text: save it as UTF-8")
    if b"\0" in data[:8192]:  # what no text holds, and images, archives and the like do
        raise DataError(f"{p} holds binary data, not text (an image? name images with --images): give one text a "
                        "line in a .txt file, or a .csv, .tsv, .jsonl or parquet table with a text column")
    texts, lines, rejected, named, first_bad = [], [], Counter(), [], 0
    # Lines as text mode reads them (\n, \r\n, \r); a byte-order mark is not the first text's.
    for n, line in enumerate(data.removeprefix(b"\xef\xbb\xbf").splitlines(), 1):
        try:
            texts.append(line.decode("utf-8"))
            lines.append(f"{p}, line {n}")
        except UnicodeDecodeError:  # left out and named, as a table's undecodable row is, not embedded as "\ufffd"
            if not rejected:
                first_bad = n
                named.append({"line": f"{p}, line {n}", "error": "undecodable text line",
                              "detail": f"the line {NOT_UTF8}"})
            rejected["undecodable text line"] += 1
    if not texts:
        raise DataError(f"{p}: no line could be read (the first bad: line {first_bad}, which {NOT_UTF8})"
                        if named else f"{p} is empty")
    return Inputs("text", texts=texts, metadata=[{"caption": t} for t in texts], listing_rejected=rejected,
                  listing_named=named, lines=lines)


def _bad_rows(table) -> list[dict]:
    """A table's rows left out (not valid JSON, cells beyond the header...), each reason's first
    named, as embed.json's `failures` name inputs: a bulk input is not stopped by one bad row."""
    return [{"line": f"{table.path}, line {line}", "error": reason, "detail": message}
            for reason, (line, message) in table.first_bad.items()]


def _no_rows(table) -> str:
    if table.rejected:
        line, message = next(iter(table.first_bad.values()))
        return f"{table.path}: no row could be read (the first bad: line {line}: {message})"
    return f"{table.path} has no rows"


def _cell(value):
    """A table's other column as metadata: text (a JSONL list, object or boolean as JSON), and a
    missing value stays missing (not "None")."""
    if value is None:
        return None
    return json.dumps(value, default=str) if isinstance(value, (list, dict, bool)) else str(value)


def _sidecar(member) -> dict:
    """A WebDataset sample's `.json` member as metadata (img2dataset writes its url, sizes and
    status there; its key and caption, the same as the sample's, are left to the sample's); {} for
    none, or one that is not a JSON object (the sample is embedded all the same)."""
    if member is None:
        return {}
    try:
        value = json.loads(member.read())
    except (OSError, ValueError, BadSample):
        return {}
    return value if isinstance(value, dict) else {}


def _with_others(row: dict, others: dict) -> dict:
    """`row` with a table's other columns as metadata; one named as a column of embed's own
    (`image_path`, `caption`, `key`, `FILE_COLUMNS`) kept as `input_NAME` (input_input_NAME where that
    is taken)."""
    out = dict(row)
    for k, v in others.items():
        # Nor over embed's bookkeeping (FILE_COLUMNS): a column `_file_size` of the table's own had been
        # overwritten by the file's size without a word.
        name = kept_name(k, {*out, *FILE_COLUMNS, *others.keys() - {k}})
        out[name] = _cell(v)
    return out


def pair_inputs(spec: str) -> Inputs:
    """Image-caption pairs: a CSV, TSV or JSONL table with image and caption columns (relative image
    paths are relative to the file; other columns become metadata), or any pair source of
    `flava.data.registry` (WebDataset shards, parquet, datasets)."""
    p = Path(spec)
    # Parquet pairs may hold the images themselves, which the data sources below decode.
    if p.is_file() and is_table(p) and not is_arrow_spec(spec):
        table = read_table(p, bad_rows="skip")
        if not table.rows:
            raise DataError(_no_rows(table))
        image_col = table.column("image", "image_path", "filepath", "url")
        text_col = table.column("caption", "text")
        images, texts, meta, lines = [], [], [], []
        rejected, named = Counter(table.rejected), _bad_rows(table)
        for where, row in ((r.where, r.values) for r in table.rows):
            cell = row.get(image_col)
            if cell is None or (isinstance(cell, str) and not cell.strip()):
                # Left out and named, as training counts "table row without an image" (an empty path
                # would name the table's own folder).
                rejected["no image path"] += 1
                named.append({"line": where, "image_path": "", "caption": row.get(text_col), "error": "no image path"})
                continue
            image = table_image(p.parent, cell)
            image = image.resolve() if isinstance(image, Path) else image
            images.append(image)
            texts.append(row.get(text_col))
            meta.append(_with_others({"image_path": str(image), "caption": row.get(text_col)},
                                     {k: v for k, v in row.items() if k not in (image_col, text_col)}))
            lines.append(where)
        if not images:
            raise DataError(f"{p}: no row names an image (its {image_col!r} cells are empty)")
        refuse_urls(p, images)
        return Inputs("pair", images=images, texts=texts, metadata=meta, listing_rejected=rejected,
                      listing_named=named, lines=lines)
    from ..data.registry import open_source

    source = open_source("pairs", spec)
    images, texts, meta = [], [], []
    roles = tuple(dict(getattr(source.shards[0], "columns", ())).values()) if source.shards else ()
    for record in source.records:
        ref = record.image
        # A shard's member or a parquet cell says where it is, for serve's /items to read it again.
        name = ref.locator() if hasattr(ref, "locator") else str(ref)
        caption = record.caption
        try:  # a shard's caption member, read now for the metadata as a table's caption is
            caption = read_caption(caption)
        except BadSample:
            pass  # left as it is: embedding it fails, and is counted then
        images.append(ref)
        texts.append(caption)
        row = {"image_path": name, **({"caption": caption} if isinstance(caption, str) else {}),
               **({"key": record.key} if getattr(record, "key", None) is not None else {})}
        # A parquet or `datasets` table's other columns, and a shard sample's .json, kept as a CSV's are.
        others = other_cells(ref, roles) if isinstance(ref, ArrowImage) else _sidecar(getattr(record, "sidecar", None))
        meta.append(_with_others(row, {k: v for k, v in others.items() if row.get(k, ...) != v}))
    return Inputs("pair", images=images, texts=texts, metadata=meta, listing_rejected=Counter(source.rejected))


# --------------------------------------------------------------------------- runs


@dataclass
class EmbedSummary:
    output: Path
    modality: str
    count: int
    """Embeddings written (inputs minus failures)."""
    failed: Counter
    parts: int
    skipped_parts: int
    """Parts found complete from an earlier run."""
    changed_parts: int = 0
    """Parts an earlier run had finished whose files changed since: embedded again."""


def _check_text(text) -> str:
    if not isinstance(text, str):
        try:
            text = read_caption(text)
        except BadSample as e:
            raise DataError(e.kind) from None
    if not text or not text.strip():
        raise DataError("empty text")
    return text


def _prepare_part(embedder: Embedder, inputs: Inputs, lo: int, hi: int, files: dict[int, tuple[int, int]]
                  ) -> Iterator[tuple[list[int], dict, list]]:
    """Batches of usable rows: (row numbers, {"pixels": ..., "texts": ...}, failures); `files` gets the
    (size, mtime_ns) of each usable row's image file (`file_identity`)."""
    proc = embedder.processor
    for start in range(lo, hi, embedder.batch_size):
        rows, pixels, texts, failures = [], [], [], []
        for i in range(start, min(start + embedder.batch_size, hi)):
            try:
                text = _check_text(inputs.texts[i]) if inputs.texts is not None else None
                # Taken before the read: a file saved over meanwhile is recorded as older than its
                # vector, so the next `index --add` sees it changed rather than never.
                identity = file_identity(inputs.images[i]) if inputs.images is not None else None
                image = proc.image(inputs.images[i]) if inputs.images is not None else None
            except DataError as e:
                failures.append((i, getattr(e, "kind", str(e))))
                continue
            if identity is not None:
                files[i] = identity
            rows.append(i)
            if image is not None:
                pixels.append(image)
            if text is not None:
                texts.append(text)
        batch = {"pixels": torch.stack(pixels) if pixels else None, "texts": texts if inputs.texts is not None else None}
        yield rows, batch, failures


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
    except BaseException as e:
        full = disk_full(e, tmp)  # numpy says a full disk without its errno: "6400 requested and 2016 written"
        tmp.unlink(missing_ok=True)
        if full is not None:
            raise full from e
        raise
    os.replace(tmp, path)


def save_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = sorted({k for row in rows for k in row}, key=lambda k: (k not in ("image_path", "caption"), k))
    table = pa.table({c: pa.array([row.get(c) for row in rows], pa.int64()) if c in FILE_COLUMNS else
                      [None if row.get(c) is None else str(row.get(c)) for row in rows] for c in columns}) \
        if rows else pa.table({"image_path": pa.array([], pa.string())})
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _counts(failed: Counter) -> str:
    return ", ".join(f"{n} {why}" for why, n in failed.most_common())


def _remove_run(out: Path) -> None:
    """Take away a run that embedded nothing: no empty result for `flava index` to take, and no
    finished parts for a rerun (its inputs mended) to skip (`embed_run` removes the folder it made)."""
    import shutil

    (out / SETTINGS).unlink(missing_ok=True)
    for sub in ("img_emb", "text_emb", "metadata", "parts"):
        shutil.rmtree(out / sub, ignore_errors=True)


def part_name(i: int) -> str:
    return f"{i:05d}"


def embed_run(model: FlavaModel, model_name: str, inputs: Inputs, output: str | os.PathLike, *,
              batch_size: int = 32, part_size: int = 10_000, float16: bool = False, int8: bool = False,
              progress: Callable[[int, int], None] | None = None, checkpoint: dict | None = None) -> EmbedSummary:
    """Embed `inputs` into `output` part by part; parts a previous run finished are kept.
    `checkpoint` (`io.fingerprint.checkpoint_identity`) is recorded, and a rerun with another
    checkpoint is refused: one output never mixes the vectors of two models."""
    if len(inputs) == 0:
        rejected = inputs.listing_rejected
        raise DataError("nothing to embed: the inputs are empty" + (
            f" (left out while listing them: {_counts(rejected)})" if rejected else ""))
    if part_size < 1:
        raise InputError(f"part_size must be at least 1; got {part_size}")
    embedder = Embedder(model, batch_size)  # its settings checked before the output is made
    out = Path(output)
    settings = {"model": model_name, "modality": inputs.modality, "inputs": inputs.fingerprint(),
                "count": len(inputs), "part_size": part_size, "dtype": "float16" if float16 else "float32",
                "dim": model.config.projection_dim, "checkpoint": checkpoint}
    if inputs.text_field != "caption":  # only then: runs that name no field still resume
        settings["text_field"] = inputs.text_field
    if int8:  # likewise: int8 vectors differ from float ones, and one output never mixes them
        settings["int8"] = True
    squash = model.processor.squash_to
    if inputs.images is not None and squash is not None:  # likewise: images squashed, not cropped (flava-full's)
        settings["squash_to"] = list(squash)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file; choose a directory for the embeddings")
    existed = out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:  # one run writes an output at a time: two had both found it empty, and one called it "other files"
        with hold(out / LOCK, str(out), "wait for the other `flava embed` to end, or choose another --output",
                  remove=True):
            return _embed_into(out, embedder, inputs, settings, checkpoint, part_size, float16, progress)
    finally:
        if not existed:  # a run that wrote nothing (refused, or nothing could be embedded) leaves no folder
            with contextlib.suppress(OSError):
                out.rmdir()


def _embed_into(out: Path, embedder: "Embedder", inputs: Inputs, settings: dict, checkpoint: dict | None,
                part_size: int, float16: bool, progress: Callable[[int, int], None] | None) -> EmbedSummary:
    """`embed_run` under the output's lock."""
    if (out / SETTINGS).is_file():
        old = read_json(out / SETTINGS, "embedding settings", DataError, expect=dict)
        if checkpoint is not None and not same_checkpoint(old.get("checkpoint"), checkpoint):
            raise DataError(f"{out} holds embeddings made with {describe_checkpoint(old.get('checkpoint'))}, but this "
                            f"command's model is {describe_checkpoint(checkpoint)}; one output never mixes "
                            f"two models' vectors: choose another --output, or delete {out} to embed again")
        if checkpoint is not None:  # the same weights, however they were named
            old = {**old, "model": settings["model"], "checkpoint": checkpoint}
        if old != settings:
            # Over both runs' keys: a setting recorded only when on (int8) differs by being absent.
            absent = {"int8": False, "text_field": "caption", "squash_to": None}
            keys = [*settings, *(k for k in old if k not in settings)]
            diff = ", ".join(f"{k}: {old.get(k, absent.get(k))!r} -> {settings.get(k, absent.get(k))!r}"
                             for k in keys if old.get(k) != settings.get(k))
            raise DataError(f"{out} holds embeddings of other inputs or settings ({diff}); choose another "
                            f"output directory, or delete it to start over")
    elif any(p.name != LOCK for p in out.iterdir()):
        raise DataError(f"{out} already holds other files; choose an empty or new output directory")
    for sub in ("img_emb", "text_emb", "metadata", "parts"):
        out.joinpath(sub).mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / SETTINGS, settings)

    dtype = np.float16 if float16 else np.float32
    n_parts = -(-len(inputs) // part_size)
    failed: Counter = Counter(inputs.listing_rejected)
    named: list[dict] = inputs.listing_named[:MAX_NAMED_FAILURES]
    count = skipped = changed = done = 0
    for part in range(n_parts):
        lo, hi = part * part_size, min((part + 1) * part_size, len(inputs))
        marker = out / "parts" / f"{part_name(part)}.json"
        files = _files_digest(inputs.images[lo:hi]) if inputs.images is not None else None
        info = read_json(marker, "part record", DataError, expect=dict) if marker.is_file() else None
        if info is not None and info.get("files", files) != files:  # an image replaced under the same name
            info = None
            changed += 1
        if info is not None:
            count += info["count"]
            failed.update(info["failed"])
            named += info["named"]
            skipped += 1
            done += hi - lo
            if progress:
                progress(done, len(inputs))
            continue
        images, texts, rows, part_failed, part_named, part_files = [], [], [], Counter(), [], {}
        signum = 0
        # Decoding the next batch overlaps the model's work on this one.
        with ThreadPoolExecutor(1) as pool:
            batches = _prepare_part(embedder, inputs, lo, hi, part_files)
            pending = pool.submit(next, batches, None)
            while (item := pending.result()) is not None:
                if signum := stopping.requested():  # the part is abandoned: nothing of it is written
                    break
                pending = pool.submit(next, batches, None)
                ids, batch, failures = item
                for i, why in failures:
                    part_failed[why] += 1
                    if len(named) + len(part_named) < MAX_NAMED_FAILURES:
                        part_named.append({"row": i, **({"line": inputs.lines[i]} if inputs.lines else {}),
                                           **inputs.metadata[i], "error": why})
                if ids:
                    if batch["pixels"] is not None:
                        images.append(embedder.pixels(batch["pixels"]))
                    if batch["texts"] is not None:
                        texts.append(embedder.texts(batch["texts"]))
                    rows += ids
                done += len(ids) + len(failures)
                if progress:
                    progress(done, len(inputs))
        if signum:
            at = f"after {part} of {n_parts} parts"
            raise stopping.Stopped(signum, f"stopped by {stopping.name(signum)} {at} (kept in {out}; part {part} is "
                                           "embedded again): run the same command again to finish", at)
        name = part_name(part)
        if inputs.images is not None:
            _save_npy(out / "img_emb" / f"img_emb_{name}.npy",
                      np.concatenate([np.zeros((0, embedder.dim), np.float32)] + images).astype(dtype))
        if inputs.texts is not None:
            _save_npy(out / "text_emb" / f"text_emb_{name}.npy",
                      np.concatenate([np.zeros((0, embedder.dim), np.float32)] + texts).astype(dtype))
        save_parquet(out / "metadata" / f"metadata_{name}.parquet",
                     [{**inputs.metadata[i], **dict(zip(FILE_COLUMNS, part_files.get(i, ())))} for i in rows])
        write_json_atomic(marker, {"count": len(rows), "failed": dict(part_failed), "named": part_named,
                                   "files": files})
        count += len(rows)
        failed.update(part_failed)
        named += part_named
    if count == 0:
        _remove_run(out)
        first = next((n for n in named if "row" in n), named[0] if named else {})  # an input that failed
        where = first.get("image_path") or first.get(inputs.text_field) or f"row {first.get('row')}"
        if first.get("line"):
            where = f"{first['line']} ({where})" if first.get("image_path") else first["line"]
        raise DataError(f"none of the {len(inputs)} inputs could be embedded ({_counts(failed)}"
                        + (f"; the first: {where}: {first['error']}" if first else "") + "); nothing was written")
    # `count` is what was listed; rows left out while listing (an incomplete tar sample) are in
    # `failed` too, so `samples` = embedded + failed.
    write_json_atomic(out / SUMMARY, {**settings, "embedded": count, "failed": dict(failed),
                                      "samples": len(inputs) + sum(inputs.listing_rejected.values()),
                                      "failures": named, "parts": n_parts})
    return EmbedSummary(out, inputs.modality, count, failed, n_parts, skipped, changed)


def _files_digest(images: Sequence) -> str:
    """What the files behind a part's images are now (size and modification time of each image
    file, shard or table): a part kept from an earlier run must have been made from these."""
    h = hashlib.sha256()
    for ref in images:
        file = ref if isinstance(ref, Path) else getattr(ref, "shard", None)
        file = getattr(file, "path", file)  # an Arrow cell's file
        file = os.path.abspath(file) if file is not None else None  # the same files, named from another folder
        try:
            st = os.stat(file) if file is not None else None
            h.update(f"{file}\0{st.st_size if st else ''}\0{st.st_mtime_ns if st else ''}\n".encode())
        except OSError:
            h.update(f"{file}\0missing\n".encode())
    return h.hexdigest()[:16]


def file_identity(ref) -> tuple[int, int] | None:
    """(size, mtime_ns) of the local file an image is read from (a path, or a table's path cell); None
    for an image without one of its own (a shard's member, image bytes, a URL) or a file not there."""
    file = ref if isinstance(ref, (str, os.PathLike)) else ref.file() if isinstance(ref, ArrowImage) else None
    try:
        st = os.stat(file) if file is not None else None
    except OSError:  # reading it fails too, and says why
        return None
    return (st.st_size, st.st_mtime_ns) if st is not None else None


def _file_identities(table) -> list[tuple[int, int] | None]:
    """`FILE_COLUMNS` of a metadata table, per row: None where a row (or the whole table) has none."""
    if not all(c in table.column_names for c in FILE_COLUMNS):
        return [None] * table.num_rows
    sizes, times = (table.column(c).to_pylist() for c in FILE_COLUMNS)
    return [None if s is None or t is None else (int(s), int(t)) for s, t in zip(sizes, times)]


def without_file_columns(table):
    """A metadata table's own columns: `FILE_COLUMNS` left out."""
    return table.select([c for c in table.column_names if c not in FILE_COLUMNS])


# --------------------------------------------------------------------------- reading runs back


@dataclass
class Embeddings:
    """An embed run read back: vectors of one modality and their metadata rows."""

    vectors: np.ndarray
    metadata: list[dict]
    model: str | None
    modality: str
    """'image' or 'text': which vectors these are."""
    checkpoint: dict | None = None
    """The checkpoint that made them (`io.fingerprint`); None for runs of older versions."""
    text_field: str = "caption"
    """The metadata column holding each text (a text table's own column name)."""
    inputs: str | None = None
    """The run's fingerprint of its inputs (`Inputs.fingerprint`)."""
    files: list[tuple[int, int] | None] | None = None
    """Per row, the (size, mtime_ns) of its image file when embedded (`FILE_COLUMNS`); None for a row
    without one. For image vectors only."""
    int8: bool = False
    """Made by the int8 model (`embed --int8`): vectors that differ from the float model's."""


def read_embeddings(directory: str | os.PathLike, which: str | None = None) -> Embeddings:
    """The vectors of a finished embed run (`which`: 'image' or 'text'; default: the images of an
    image or pair run, the texts of a text run)."""
    import pyarrow.parquet as pq

    d = Path(directory)
    if not (d / SETTINGS).is_file():
        raise DataError(f"{d} is not an embedding directory (no {SETTINGS}); make one with `flava embed`")
    settings = read_json(d / SETTINGS, "embedding settings", DataError, expect=dict)
    if not (d / SUMMARY).is_file():
        raise DataError(f"the embed run in {d} has not finished; run the same `flava embed` command again to "
                        f"complete it")
    which = which or ("text" if settings["modality"] == "text" else "image")
    if which not in ("image", "text"):
        raise InputError(f"which must be 'image' or 'text'; got {which!r}")
    if (which == "image" and settings["modality"] == "text") or (which == "text" and settings["modality"] == "image"):
        raise DataError(f"{d} holds {settings['modality']} embeddings only; it has no {which} embeddings (an index holds "
                        f"one modality: index these on their own, flava index --embeddings {d} --output ANOTHER)")
    folder, prefix = ("img_emb", "img_emb") if which == "image" else ("text_emb", "text_emb")
    vectors, meta, files = [], [], []
    n_parts = -(-settings["count"] // settings["part_size"])
    for part in range(n_parts):
        name = part_name(part)
        try:
            vectors.append(np.load(d / folder / f"{prefix}_{name}.npy"))
            table = pq.read_table(d / "metadata" / f"metadata_{name}.parquet")
            files += _file_identities(table)  # parts of an older version (a run it began) have none
            meta += without_file_columns(table).to_pylist()
        except (OSError, ValueError) as e:
            raise DataError(f"{d}: part {name} is missing or damaged ({e}); delete parts/{name}.json and run "
                            f"`flava embed` again to redo it") from None
    array = np.concatenate(vectors).astype(np.float32) if vectors else np.zeros((0, settings["dim"]), np.float32)
    if len(array) != len(meta):
        raise DataError(f"{d}: {len(array)} embeddings but {len(meta)} metadata rows; the directory is damaged")
    bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if len(bad):  # a NaN vector is nobody's neighbour: searches would quietly find fewer hits, or none
        raise DataError(f"{d}: {len(bad)} of {len(array)} {which} embeddings are not finite (NaN or infinity), "
                        f"e.g. row {bad[0]}; embed again with a checkpoint whose weights are sound")
    return Embeddings(array, meta, settings.get("model"), which, settings.get("checkpoint"),
                      settings.get("text_field", "caption"), settings.get("inputs"),
                      files if which == "image" else None, bool(settings.get("int8", False)))
