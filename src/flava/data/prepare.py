"""`flava prepare`: training shards made once.

Any pair or image source (folders, CSV/TSV, parquet, Hugging Face datasets on disk, WebDataset
shards) is written as WebDataset shards: images re-encoded as JPEG with the shorter side resized,
captions cleaned, unusable samples dropped and counted, and — given an image tokenizer — the token
ids of `crops` crop boxes per image. Training then picks one of those boxes per sample and epoch,
crops the stored image with it and reads the stored ids as the MIM/MMM targets: the targets
describe exactly the pixels the model sees, and the frozen codebook never runs in a step.

The work is split into units (an input shard, or a slice of an in-memory source), one output
shard each, done by a pool of processes. A unit's shard and its sidecar (`NNNNN.json`, its counts)
are renamed into place when complete, so an interrupted run resumes where it stopped; the shard
index (`index.json`) and the report are written last.
"""

from __future__ import annotations

import collections
import html
import io
import json
import math
import os
import queue
import re
import tarfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import stopping
from ..config import Seed, differences, said
from ..errors import DataError
from ..io.files import atomic_path, write_json_atomic
from ..io.locks import hold
from ..io.runs import LOCK
from .decode import DECODED, dct_scale, decode
from .members import BadSample
from .sources import ImageRecord, PairRecord, RecordShard, Source, open_shard, read_caption
from .shards import is_remote
from .tars import INDEX, PREPARE_SETTINGS

REPORT = "prepare_report.json"
TOKENIZE_BATCH = 256
"""Crops per codebook call."""
STOP_GRACE_S = 10.0
"""How long a stop lets the units being written finish before it gives them up."""


@dataclass(frozen=True)
class PrepareSettings:
    size: int = 256
    """Shorter image side after resizing (images already smaller are kept as they are)."""
    shard_size: int = 1000
    """Samples per output shard for sources held in memory (tables, folders); input shards map one to one."""
    crops: int = 4
    """Crop boxes tokenized per image (training picks one per epoch)."""
    crop_scale_min: float = 0.9
    """Each box keeps at least this share of the image (as training's `data.crop_scale_min`)."""
    codebook_image_size: int = 112
    """The image tokenizer's input size."""
    image_size: int = 224
    """The model's input size: a box's tokens are the codebook's of the model's view of it, as
    pretraining makes that view from the stored image."""
    quality: int = 95
    """JPEG quality of the stored images."""
    max_caption_chars: int = 2000
    seed: Seed = 0


_SPACE = re.compile(r"\s+")


def clean_caption(text: str) -> str:
    """HTML entities decoded, whitespace runs collapsed to one space, ends stripped."""
    return _SPACE.sub(" ", html.unescape(text)).strip()


def _named(spec: str) -> str:
    """An input as the manifest records it: a local path absolute, so that a rerun from another
    folder names the same file, and a file of the same name there is not taken for it."""
    return spec if is_remote(spec) or spec.startswith("file://") else os.path.abspath(os.path.expanduser(spec))


def _bytes(n: int | None) -> str:
    return "bytes unknown" if n is None else f"{n:,} bytes"


def _units(sources: list[Source], shard_size: int) -> list:
    """Work units: each input shard, with in-memory ones cut into slices of `shard_size`."""
    units = []
    for src in sources:
        for shard in src.shards:
            if isinstance(shard, RecordShard):
                units += [RecordShard(f"{shard.name}[{a}:]", shard.records[a:a + shard_size])
                          for a in range(0, len(shard.records), shard_size)]
            else:
                units.append(shard)
    return units


def _crop_boxes(w: int, h: int, n: int, scale_min: float, rng: np.random.Generator) -> np.ndarray:
    """[n, 4] boxes (left, top, right, bottom as fractions): random area share in [scale_min, 1] at
    the image's aspect ratio, the first one the whole image."""
    from .transforms import random_resized_crop_box

    boxes = [(0.0, 0.0, 1.0, 1.0)]
    for _ in range(n - 1):
        left, top, cw, ch = random_resized_crop_box(w, h, rng, (scale_min, 1.0))
        boxes.append((left / w, top / h, (left + cw) / w, (top + ch) / h))
    return np.asarray(boxes, dtype=np.float32)


REDUCING_GAP = 2.0


def _resized(ref, size: int):
    """The image `ref` with `size` pixels on its shorter side (smaller ones as they are). A large
    JPEG is decoded at the smallest of its fast DCT scales that still leaves twice that (a
    12-megapixel photograph decoded whole took most of a record's time); the output's size is the
    stored image's scaled, whatever scale it was decoded at."""
    from PIL import Image

    stored: list[int] = []

    def least(width: int, height: int) -> tuple[int, int]:
        stored[:] = [width, height]
        # Twice the size asked, as Pillow's thumbnail (its reducing_gap): the resize then still
        # filters, and the result stays within a level or two of resizing the whole decode.
        f = min(1.0, REDUCING_GAP * size / max(1, min(width, height)))
        return max(1, math.ceil(width * f)), max(1, math.ceil(height * f))

    image = decode(ref, draft=least)
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    width, height = stored or image.size
    short = min(width, height)
    if short <= size:
        return image
    f = size / short
    # The stored image's extent in the pixels decoded: a scaled decode's last pixel is part of one.
    sx, sy = dct_scale(width, height, *image.size)
    return image.resize((max(1, round(width * f)), max(1, round(height * f))), Image.BICUBIC,
                        box=(0, 0, min(image.width, width * sx), min(image.height, height * sy)))


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


class Unread(Exception):
    """A unit whose input could not be read for a reason that may pass (`Opened.passing`)."""


@dataclass
class ReadUnit:
    """A unit read and resized by a pool process, its crops not yet tokenised: the process that
    holds the device tokenises every unit's crops (one device context, full batches) and writes."""

    kept: list[tuple[str, dict[str, bytes]]]
    dropped: Counter
    name: str
    boxes: list[np.ndarray]
    pixels: np.ndarray | None
    """[kept x crops, 3, size, size] uint8: an array, which pickles through the pool's pipe (a
    tensor would go through /dev/shm, which containers often keep small)."""
    first: dict[str, str] = field(default_factory=dict)
    """The first sample dropped for each reason, by where it is (a file, a shard's member)."""


def prepare_unit(number: int, unit, kind: str, out: str, settings: PrepareSettings,
                 tokenizer: Callable | None, skip_unreadable: bool = False, crops: bool = False) -> dict | ReadUnit:
    """Write unit `number` as NNNNN.tar + NNNNN.json; returns its counts. Runs in a pool process.
    An input that could not be read for a reason that may pass is left for the next run (`Unread`),
    or with `skip_unreadable` counted and written without its samples. With `crops` (and no
    tokenizer), the unit is returned read, for `write_unit` with its tokens."""
    import torch

    from .decode import decode_crop
    from .members import Blob
    from .transforms import codebook_view

    torch.set_num_threads(1)
    opened = open_shard(unit)
    if opened.passing and not skip_unreadable:  # a store or disk that failed: left for the next run to read
        raise Unread(opened.failure)
    dropped: Counter = Counter(opened.rejected)
    first: dict[str, str] = {}
    kept: list[tuple[str, dict, object]] = []
    for i, record in enumerate(opened.records):
        try:
            parts: dict[str, bytes] = {}
            if kind == "pairs":
                assert isinstance(record, PairRecord)
                caption = read_caption(record.caption)
                caption = clean_caption(caption) if isinstance(caption, str) else ""
                if not caption:
                    raise BadSample("empty caption")
                if len(caption) > settings.max_caption_chars:
                    raise BadSample("over-long caption")
                parts["txt"] = caption.encode()
                ref = record.image
            else:
                ref = record.image if isinstance(record, ImageRecord) else record
                if isinstance(record, ImageRecord) and record.label >= 0:
                    parts["cls"] = str(record.label).encode()
            image = _resized(ref, settings.size)
        except BadSample as e:
            dropped[e.kind] += 1
            if e.kind not in first:
                ref = getattr(record, "image", record)
                first[e.kind] = ref.locator() if hasattr(ref, "locator") else str(ref)
            continue
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=settings.quality)
        parts["jpg"] = buf.getvalue()
        kept.append((f"{number:05d}{i:06d}", parts, image))

    boxes, pixels = [], []
    if (tokenizer is not None or crops) and kept:
        s, cs = settings.image_size, settings.codebook_image_size
        for key, parts, image in kept:
            rng = np.random.default_rng([settings.seed, number, int(key[5:])])
            b = _crop_boxes(image.width, image.height, settings.crops, settings.crop_scale_min, rng)
            boxes.append(b)
            # What a training step sees of the box (the stored JPEG decoded as it decodes it, at a
            # reduced DCT scale where the box allows), and the codebook's view of that, as
            # `SampleMaker` and `collate` make it: the targets describe the model's very pixels.
            stored, decoded = Blob(parts["jpg"], "jpg"), {}  # boxes needing one DCT scale share its decode
            for box in b:
                def choose(width: int, height: int, box=box) -> tuple[float, ...]:
                    return tuple(float(v) for v in box * np.array([width, height] * 2))
                if cs > s:  # patches under 8 px: from the crop itself
                    pixels.append(decode_crop(stored, choose, s, cs, memo=decoded)[1])
                else:
                    pixels.append(codebook_view(decode_crop(stored, choose, s, memo=decoded)[0][None], cs)[0])
    read = ReadUnit([(key, parts) for key, parts, _ in kept], dropped, unit.name, boxes,
                    torch.stack(pixels).numpy() if pixels else None, first)
    if crops and tokenizer is None:
        return read
    return write_unit(number, out, read, tokenizer)


def write_unit(number: int, out: str, read: ReadUnit, tokenizer: Callable | None) -> dict:
    """Unit `number`'s shard and sidecar, its crops tokenised by `tokenizer` (if any)."""
    import torch

    out_dir = Path(out)
    if tokenizer is not None and read.kept:
        ids = [tokenizer(torch.from_numpy(read.pixels[a:a + TOKENIZE_BATCH]))  # uint8: the device converts them
               for a in range(0, len(read.pixels), TOKENIZE_BATCH)]
        tokens = torch.cat(ids).cpu().numpy().astype(np.uint16).reshape(len(read.kept), len(read.boxes[0]), -1)
        for (key, parts), b, t in zip(read.kept, read.boxes, tokens):
            parts["crops.npy"], parts["tokens.npy"] = _npy(b), _npy(t)
    with atomic_path(out_dir / f"{number:05d}.tar") as tmp, tarfile.open(tmp, "w") as tar:
        for key, parts in read.kept:
            for ext, data in parts.items():
                _add(tar, f"{key}.{ext}", data)
    stats = {"url": f"{number:05d}.tar", "nsamples": len(read.kept), "dropped": dict(read.dropped),
             "first_dropped": read.first, "input": read.name, "bytes": (out_dir / f"{number:05d}.tar").stat().st_size}
    write_json_atomic(out_dir / f"{number:05d}.json", stats)
    return stats


def prepare(kind: str, sources: list[Source], output: Path, settings: PrepareSettings,
            tokenizer_factory: Callable[[], Callable] | None = None, fingerprint: str | None = None,
            grid: int | None = None, image_size: int | None = None, workers: int = 1,
            progress: Callable[[int, int, int], None] | None = None, vocab_size: int | None = None,
            skip_unreadable: bool = False, tokenize_here: bool = False,
            say: Callable[[str], None] | None = None) -> dict:
    """Write `sources` as prepared shards in `output` (see the module docstring); returns the report.
    `progress(units handled, units, of them left unread for a rerun)`; `say(line)` tells the user
    of units made again (their shard gone or cut). With `tokenize_here` (a
    tokenizer on a GPU), this process tokenises what the pool processes read: one device context
    and full batches, where one per process could exhaust a small GPU's memory."""
    if kind not in ("pairs", "images"):
        raise DataError(f"flava prepare makes pair or image shards, not {kind}")
    output.mkdir(parents=True, exist_ok=True)
    if not (output / PREPARE_SETTINGS).is_file() and any(not f.name.startswith(".") for f in output.iterdir()):
        raise DataError(f"{output} already holds other files; prepare into a new or empty directory (its shards "
                        "and index are written beside nothing else)")
    # Two prepares in one folder would write its units from two settings (or take it from each other).
    with hold(output / LOCK, str(output), "wait for the other `flava prepare` into it to end, or prepare into "
              "another directory"):
        return _prepare(kind, sources, output, settings, tokenizer_factory, fingerprint, grid, image_size, workers,
                        progress, vocab_size, skip_unreadable, tokenize_here, say)


def _prepare(kind: str, sources: list[Source], output: Path, settings: PrepareSettings,
             tokenizer_factory: Callable[[], Callable] | None, fingerprint: str | None, grid: int | None,
             image_size: int | None, workers: int, progress: Callable[[int, int, int], None] | None,
             vocab_size: int | None, skip_unreadable: bool, tokenize_here: bool,
             say: Callable[[str], None] | None) -> dict:
    manifest = {"kind": kind, "settings": asdict(settings), "codebook": fingerprint,
                "inputs": [_named(s.name) for s in sources], "decoded": DECODED}
    # What each input held (its files, and its samples where the listing knows them): a table or
    # folder grown since the first run would else pass for the same and be reported finished.
    # Bytes and names too: a table edited in place, or a folder's files renamed, keep their counts.
    held = [[len(s.shards), s.known_size, s.known_bytes, s.known_names, s.known_digest] for s in sources]
    mark = output / PREPARE_SETTINGS
    # A start that failed before its first unit (a bad setting, an unreadable codebook) left its
    # settings and nothing else: a corrected command takes the folder over.
    started = mark.is_file() and any(output.glob("[0-9]*.json"))
    if started:
        before = json.loads(mark.read_text())
        before["inputs"] = [_named(x) for x in before.get("inputs", [])]  # earlier releases: as typed
        was = before.pop("held", None)
        recorded = before.get("settings")
        if isinstance(recorded, dict) and "image_size" not in recorded:  # begun before tokens followed training's view
            if fingerprint is not None and not (output / INDEX).is_file():
                raise DataError(f"{output} holds shards an earlier flava began preparing, whose image tokens describe "
                                "the image before it was stored rather than what training shows the model: prepare "
                                "into a new directory (or remove this one to prepare it again)")
            recorded["image_size"] = settings.image_size  # without tokens it changes nothing
        if before.get("decoded") != DECODED:  # begun before crops were decoded at the fast scales alone
            if fingerprint is not None and not (output / INDEX).is_file():
                raise DataError(f"{output} holds shards an earlier flava began preparing, whose image tokens were made "
                                "of some crops decoded otherwise than training now decodes them: prepare into a new "
                                "directory (or remove this one to prepare it again)")
            before["decoded"] = DECODED  # finished, or without tokens: training says what it means (open_data)
        # An earlier release recorded counts alone: what it recorded is compared.
        if before == manifest and was is not None and any(list(a) != b[:len(a)] for a, b in zip(was, held)):
            changed = next(i for i, (a, b) in enumerate(zip(was, held)) if list(a) != b[:len(a)])
            then, now = was[changed], held[changed]
            listed = not isinstance(sources[changed].shards[0], RecordShard)
            counts = [(f"{n:,} shard(s)" if listed else "") + (", " if listed and k is not None else "")
                      + ("" if k is None else f"{k:,} samples") for n, k, *_ in (then, now)]
            how = f"then {counts[0]}; now {counts[1]}" if list(then[:2]) != now[:2] else \
                f"then {_bytes(then[2])}; now {_bytes(now[2])}, as many samples" if then[2] != now[2] else \
                "its files renamed, added or removed, as many as before" if then[3] != now[3] else \
                f"edited, {_bytes(now[2])} as before"
            raise DataError(f"{sources[changed].name} changed since {output} was prepared from it ({how}): prepare "
                            "into a new directory (or remove this one to prepare it again)")
        if before == manifest and was is None and not (output / INDEX).is_file():
            _check_units_of_an_earlier_release(output, _units(sources, settings.shard_size))
        if before != manifest:
            what = f"other inputs or settings ({said(differences(before, manifest))})"
            if (output / INDEX).is_file():  # finished: there is nothing to finish
                raise DataError(f"{output} holds finished shards prepared from {what}; prepare into a new "
                                "directory (or remove this one to prepare it again)")
            raise DataError(f"{output} holds unfinished shards prepared from {what}; finish it with the command "
                            "that started it, or prepare into a new directory")
    else:
        for stray in output.glob("[0-9]*.tar"):  # a unit a failed start left unfinished, maybe beyond these
            stray.unlink()
        write_json_atomic(mark, {**manifest, "held": held})
    _remove_strays(output)
    units = _units(sources, settings.shard_size)
    why = {n: _unfinished(output, n) for n in range(len(units))}
    todo = [n for n, w in why.items() if w is not None]
    if broken := [w for w in why.values() if w]:
        # A unit counts as done by its sidecar alone (stops, progress): one whose shard is gone is
        # made again (it is made the same), not called finished with its samples left out of training.
        for n in [n for n, w in why.items() if w]:
            (output / f"{n:05d}.json").unlink(missing_ok=True)
        if say:
            say(f"note: {len(broken)} unit{'s' if len(broken) > 1 else ''} made again: {'; '.join(broken[:3])}"
                + (f" and {len(broken) - 3} more" if len(broken) > 3 else ""))
    start = time.perf_counter()
    done = len(units) - len(todo)
    if progress:
        progress(done, len(units), 0)
    here = tokenizer_factory is not None and (workers <= 1 or tokenize_here)
    tokenizer = tokenizer_factory() if here else None

    def stopped(signum: int) -> stopping.Stopped:
        finished = sum((output / f"{n:05d}.json").is_file() for n in range(len(units)))
        at = f"after {finished} of {len(units)} units"
        return stopping.Stopped(signum, f"stopped by {stopping.name(signum)} {at} (kept in {output}): run the same "
                                        "command again to finish", at)

    unread: list[str] = []  # units whose input failed to be read: left for the next run

    def finished(f, number: int) -> None:
        nonlocal done
        try:
            if isinstance(read := f.result(), ReadUnit):
                write_unit(number, str(output), read, tokenizer)
        except Unread as e:
            unread.append(str(e))
        done += 1
        if progress:
            progress(done, len(units), len(unread))

    if workers <= 1:
        for n in todo:
            try:  # a stop ends a unit at once (a stalled read would hold it for minutes); it is written whole or not
                with stopping.abandonable(), stopping.interruptible():
                    prepare_unit(n, units[n], kind, str(output), settings, tokenizer, skip_unreadable)
            except Unread as e:
                unread.append(str(e))
            except stopping.Abandoned as e:
                raise stopped(e.signum) from None
            done += 1
            if progress:
                progress(done, len(units), len(unread))
            if (signum := stopping.requested()) and done < len(units):
                raise stopped(signum)
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                 initargs=(None if here else tokenizer_factory,)) as pool:
            ended: queue.Queue = queue.Queue()  # as they finish, in any order (as a stop counts them)
            waiting = collections.deque(todo)
            pending: dict = {}  # future -> its unit; a future ended is dropped, with what it read

            def submit() -> None:
                # Two units beyond those being made: units read for this process to tokenise hold
                # their crops' pixels (150 MB for 1,000 images at the base preset) until it does.
                while waiting and len(pending) < workers + 2:
                    n = waiting.popleft()
                    f = pool.submit(_pooled_unit, n, units[n], kind, str(output), settings, skip_unreadable, here)
                    pending[f] = n
                    f.add_done_callback(ended.put)
            submit()

            def next_ended(timeout: float):
                try:
                    f = ended.get(timeout=timeout)
                except queue.Empty:
                    return None
                return f, pending.pop(f)

            try:
                while pending:
                    if (unit := next_ended(0.5)) is not None:
                        finished(*unit)
                        if not stopping.requested():
                            submit()
                    if (signum := stopping.requested()) and (pending or waiting):
                        # Units being written have STOP_GRACE_S to finish (each is renamed into place
                        # whole); then they are given up, as a stalled read would hold them for minutes.
                        for f in list(pending):
                            f.cancel()
                        deadline = time.monotonic() + STOP_GRACE_S
                        while pending and (unit := next_ended(max(0.0, deadline - time.monotonic()))) is not None:
                            if not unit[0].cancelled():
                                finished(*unit)
                        _kill(pool)
                        pool.shutdown(wait=True)
                        _remove_strays(output)
                        raise stopped(signum)
            except KeyboardInterrupt:  # a second signal: the workers ignore signals, so end them here
                _kill(pool)
                raise
    if unread:
        raise DataError(f"{len(unread)} of {len(units)} inputs could not be read (e.g. {unread[0]}); what could is "
                        f"prepared in {output}: run the same command again to finish once they can be read (with "
                        "--skip-unreadable, to finish without those that cannot, counted)")
    stats = [json.loads((output / f"{n:05d}.json").read_text()) for n in range(len(units))]
    shardlist = [{"url": s["url"], "nsamples": s["nsamples"]} for s in stats if s["nsamples"]]
    info = {"kind": kind, "codebook": fingerprint, "grid": grid, "image_size": image_size,
            "crops": settings.crops if tokenizer_factory else 0, "size": settings.size, "vocab_size": vocab_size,
            "crop_scale_min": settings.crop_scale_min}
    # As the manifest says it was begun: a finished prepare of before, run again, keeps its tokens of
    # crops decoded otherwise, and training's note about them.
    decoded = json.loads(mark.read_text()).get("decoded")
    if decoded is not None:
        info["decoded"] = decoded
    write_json_atomic(output / INDEX, {"shardlist": shardlist, "flava": info if tokenizer_factory else None})
    dropped: Counter = Counter()
    first: dict[str, str] = {}  # each reason's first dropped sample, by where it is
    for src in sources:  # rows of a table refused while it was listed (undecodable, no image)
        dropped.update(src.listing_rejected)
        for reason, (line, what) in sorted(src.listing_first.items(), key=lambda kv: kv[1][0]):
            first.setdefault(reason, f"{src.name}, line {line:,}: {what}")
    for s in stats:
        dropped.update(s["dropped"])
        for reason, where in s.get("first_dropped", {}).items():  # units of an earlier release have none
            first.setdefault(reason, where)
    written = sum(s["nsamples"] for s in stats)
    report = {"kind": kind, "samples": written, "shards": len(shardlist), "dropped": dict(dropped),
              "first_dropped": first, "units": len(units),
              "bytes": sum(s["bytes"] for s in stats), "bytes_per_sample": sum(s["bytes"] for s in stats) / max(1, written),
              "seconds_this_run": time.perf_counter() - start, "units_done_before": len(units) - len(todo),
              "image_tokens": bool(tokenizer_factory)}
    write_json_atomic(output / REPORT, report)
    return report


def _unfinished(output: Path, n: int) -> str | None:
    """Why unit `n` is to be made: None when its sidecar and shard are in place (the shard of the
    size the sidecar records), '' when it never was, else what is wrong."""
    sidecar, shard = output / f"{n:05d}.json", output / f"{n:05d}.tar"
    if not sidecar.is_file():
        return ""
    try:
        recorded = json.loads(sidecar.read_text())["bytes"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{sidecar.name} is damaged"
    if not shard.is_file():
        return f"{shard.name} is missing"
    if isinstance(recorded, int) and shard.stat().st_size != recorded:
        return f"{shard.name} holds {shard.stat().st_size:,} bytes where {recorded:,} were written"
    return None


def _check_units_of_an_earlier_release(output: Path, units: list) -> None:
    """An unfinished prepare an earlier release started recorded no `held`: its units must be
    this listing's, or the shards it finishes would mix two listings (folders now pass over
    hidden files and find more image suffixes; a table's captions that are not text are left
    out). A shard's unit is checked by name; a slice of a folder or table cannot be, and is refused."""
    for sidecar in sorted(output.glob("[0-9]*.json")):
        n = int(sidecar.stem)
        try:
            named = json.loads(sidecar.read_text()).get("input")
        except (OSError, ValueError):
            continue  # a damaged sidecar: the unit is written again
        if n >= len(units) or isinstance(units[n], RecordShard) or named != units[n].name:
            raise DataError(f"{output} is an unfinished prepare started by an earlier flava, which listed its inputs "
                            "otherwise (folders now pass over hidden files and find more image suffixes): prepare "
                            "into a new directory (or remove this one to prepare it again)")


def _remove_strays(output: Path) -> None:
    """What units given up or killed amid their writing left (`atomic_path`'s temporaries)."""
    for stray in output.glob(".[0-9][0-9][0-9][0-9][0-9].*.tmp.*"):
        stray.unlink(missing_ok=True)


def _kill(pool: ProcessPoolExecutor) -> None:
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.kill()


_worker_tokenizer = None


def _init_worker(factory) -> None:
    global _worker_tokenizer
    import torch

    stopping.ignore_in_worker()  # the parent finishes or cancels this worker's units on a stop
    torch.set_num_threads(1)
    _worker_tokenizer = factory() if factory is not None else None


def _pooled_unit(n, unit, kind, out, settings, skip_unreadable, crops) -> dict | ReadUnit:
    return prepare_unit(n, unit, kind, out, settings, _worker_tokenizer, skip_unreadable, crops)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
