"""Checkpoint directories on disk, as dicts and tensors; building models from them is `flava.loading`.

This project's format is a directory with `config.json` ({"format": "flava", "model": {...}})
and `model.safetensors`, whose keys are prefixed by part: `model.`, `heads.`, `codebook.`
(`dino.` for a DINO stage).
A directory is replaced atomically: it is written beside the target and renamed into place.
Foreign directories (transformers FLAVA, ViT) are read here too, as their config dict and
tensors under their own names.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from .files import left_by_replace, read_json, replace_dir, sha256_of, write_json_atomic

FORMAT = "flava"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CHECKSUMS = "checksums.json"
# `dino`: a DINO stage's student, teacher and loss center (train.dino).
PARTS = ("model", "heads", "codebook", "dino")

Tensors = Mapping[str, torch.Tensor]


def read_config(directory: Path) -> dict[str, Any]:
    """A checkpoint's config.json as a dict (CheckpointError when missing or damaged)."""
    return read_json(Path(directory) / CONFIG, "checkpoint config", CheckpointError, expect=dict)


# --------------------------------------------------------------------------- writing


def check_replaceable(target: Path, also_ours: tuple[str, ...] = (),
                      ours: Callable[[dict[str, Any]], bool] | None = None,
                      only: Collection[str] | None = None) -> None:
    """Refuse to overwrite a directory that holds anything but a checkpoint of ours: its
    config.json must be one `ours` accepts (by default, this project's format), and with `only`
    (the files the writer writes) it may hold no other files. A folder with another config.json
    (a public model's), or a checkpoint of another kind (a trained codebook, a training
    checkpoint), is someone's work, replaced whole otherwise."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} is a file; choose a directory to write to")
    if not target.is_dir():
        return
    names = {p.name for p in target.iterdir()
             if not any(left_by_replace(p.name, ours_) for ours_ in also_ours)}  # a killed save's leftovers
    if not names or names <= set(also_ours):
        return
    if CONFIG not in names:
        shown = sorted(names - set(also_ours))
        listed = ", ".join(shown[:3]) + (f" and {len(shown) - 3} more" if len(shown) > 3 else "")
        raise CheckpointError(f"{target} already holds other files ({listed}) and is not a checkpoint; choose another "
                              f"output directory")
    try:
        config = json.loads((target / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) or not (ours or is_ours)(config):
        raise CheckpointError(f"{target} holds another model's config.json, not what this command writes; choose "
                              f"another output directory")
    foreign = sorted(names - set(only) - set(also_ours)) if only is not None else []
    if foreign:
        raise CheckpointError(f"{target} holds files this command does not write ({', '.join(foreign[:3])}): another "
                              f"kind of checkpoint (a trained codebook, a training checkpoint); choose another output "
                              f"directory")


def write_checkpoint_dir(target: str | os.PathLike, fill: Callable[[Path], None],
                         also_ours: tuple[str, ...] = (), ours: Callable[[dict[str, Any]], bool] | None = None,
                         only: Collection[str] | None = None) -> None:
    """`fill(staging_dir)`, then the staging directory replaces `target` whole; refuses a target
    that holds anything but what this writer writes (`check_replaceable`)."""
    check_replaceable(Path(target), also_ours, ours, only)
    replace_dir(target, fill)


def _flat(parts: Mapping[str, Tensors]) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.detach().to("cpu").contiguous() for name, sd in parts.items() for k, v in sd.items()}


def write_checkpoint_files(directory: Path, model_config: dict[str, Any], parts: Mapping[str, Tensors],
                           extra: dict[str, Any] | None = None) -> None:
    """config.json and model.safetensors into an existing (staging) directory."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model_config, **(extra or {})}
    save_file(_flat(parts), str(Path(directory) / WEIGHTS), metadata={"format": FORMAT})
    write_json_atomic(Path(directory) / CONFIG, meta)


def save_checkpoint(directory: str | os.PathLike, model_config: dict[str, Any], parts: Mapping[str, Tensors],
                    extra: dict[str, Any] | None = None) -> None:
    """Write a checkpoint directory of this project's format (replacing the directory whole)."""
    write_checkpoint_dir(directory, lambda tmp: write_checkpoint_files(tmp, model_config, parts, extra))


# torch's CRC setting is process-wide: saves of our own take turns, so one cannot restore it
# under another.
_CRC_SETTING = threading.Lock()


def save_state(obj: Any, path: Path) -> None:
    """`torch.save` without the CRC-32 its zip format computes over every record: a directory
    holding it gets `write_checksums` (SHA-256 of every file), so the CRC was a second pass over
    every byte, half of torch.save's time (torch.load never checks it). The setting is the
    process's while the file is written: another thread's torch.save meanwhile writes no CRC either."""
    setting = getattr(torch.serialization, "set_crc32_options", None)  # torch >= 2.5
    if setting is None:
        torch.save(obj, path)
        return
    with _CRC_SETTING:
        before = torch.serialization.get_crc32_options()
        setting(False)
        try:
            torch.save(obj, path)
        finally:
            setting(before)


def write_checksums(directory: Path) -> None:
    """checksums.json: the SHA-256 of every other file, to tell an intact checkpoint from a damaged one."""
    directory = Path(directory)
    sums = {f.name: sha256_of(f) for f in sorted(directory.iterdir()) if f.is_file() and f.name != CHECKSUMS}
    write_json_atomic(directory / CHECKSUMS, sums)


# Digests of files already hashed in this process, by what a write changes (ctime moves with any
# write or utime): a run directory's checkpoint is checked when chosen and again when read. A file
# changed in the last second is hashed again: a coarse clock can give two writes one ctime.
_DIGESTS: dict[tuple, str] = {}


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.absolute()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    digest = sha256_of(path)
    if time.time_ns() - st.st_ctime_ns > 1_000_000_000:
        if len(_DIGESTS) > 256:
            _DIGESTS.clear()
        _DIGESTS[key] = digest
    return digest


def damage(directory: Path, skip: Collection[str] = ()) -> str | None:
    """Why a checkpoint directory is not intact (a file missing, or not what was written), or None;
    the files named in `skip` are not checked. A directory without checksums.json (written before
    checksums) is judged by reading it."""
    directory = Path(directory)
    if not (directory / CHECKSUMS).is_file():
        return None
    try:
        sums = read_json(directory / CHECKSUMS, "checksum file", CheckpointError, expect=dict)
    except CheckpointError as e:
        return str(e)
    for name, digest in sums.items():
        f = directory / name
        if name in skip:
            continue
        if not f.is_file():
            return f"{name} is missing"
        if _sha256(f) != digest:
            return f"{name} is not the file that was written (truncated or corrupted)"
    return None


def changed_but_whole(directory: Path, skip: Collection[str] = ()) -> str | None:
    """The first file of a checkpoint unlike its checksum that still reads whole (JSON that parses,
    safetensors whose header covers the file): changed on purpose, perhaps, where a cut or missing
    file is damage. None when there is none."""
    directory = Path(directory)
    try:
        sums = json.loads((directory / CHECKSUMS).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    for name, digest in sums.items() if isinstance(sums, dict) else ():
        f = directory / name
        if name in skip or not f.is_file() or _sha256(f) == digest:
            continue
        try:
            if f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix == ".safetensors":
                with safe_open(str(f), "pt"):
                    pass
            else:
                continue
        except (OSError, ValueError, SafetensorError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            continue
        return name
    return None


# --------------------------------------------------------------------------- reading


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} could not be read ({e}); the file is truncated or corrupt: copy or save it again"
        ) from None


def check_sum(path: Path) -> None:
    """Refuse a file of a checkpoint that checksums.json (written with it) says is not what was
    written: damage that leaves it readable (flipped or overwritten bytes, an edited config) would
    otherwise load and surface, if ever, as a diverging run or a shape no config builds."""
    sums_file = path.parent / CHECKSUMS
    if not sums_file.is_file():
        return
    try:
        recorded = json.loads(sums_file.read_text()).get(path.name)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, AttributeError):
        return  # a damaged checksum file says nothing about the weights; reading them checks them
    if isinstance(recorded, str) and _sha256(path) != recorded:
        raise CheckpointError(f"{path} is not the file that was written (its SHA-256 differs from the one in "
                              f"{CHECKSUMS}): the copy is damaged; copy or save it again (or, if it was changed on "
                              f"purpose, delete {CHECKSUMS})")


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: one safetensors file, a sharded set, or a .bin; each
    file checked against checksums.json where the checkpoint has one."""
    directory = Path(directory)
    single = directory / WEIGHTS
    index = directory / "model.safetensors.index.json"
    legacy = directory / "pytorch_model.bin"
    if single.is_file():
        check_sum(single)
        return _load_safetensors(single)
    if index.is_file():
        weight_map = read_json(index, "shard index", CheckpointError, expect=dict).get("weight_map", {})
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).is_file():
                raise CheckpointError(f"shard {directory / shard} listed in {index.name} is missing")
            check_sum(directory / shard)
            tensors.update(_load_safetensors(directory / shard))
        return tensors
    if legacy.is_file():
        check_sum(legacy)
        try:
            sd = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several unrelated types for damaged zip/pickle files
            raise CheckpointError(
                f"{legacy} could not be read ({type(e).__name__}: {e}); the file is truncated or corrupt"
            ) from None
        if not isinstance(sd, dict):
            raise CheckpointError(f"{legacy} does not hold a state dict")
        return sd
    raise CheckpointError(
        f"{directory} has a {CONFIG} but no weights: expected {WEIGHTS}, "
        f"model.safetensors.index.json or pytorch_model.bin"
    )


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """The directory of a checkpoint given as the directory or a file in it (e.g. its weights)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    named = path
    if path.is_file():
        path = path.parent
    if not (path / CONFIG).is_file():
        # A file elsewhere (a table named as the codebook) is named itself, not its folder.
        what = f"{named} is a file outside any checkpoint (its folder has no {CONFIG})" if named != path else \
            f"{path} is not a checkpoint: it has no {CONFIG}"
        raise CheckpointError(f"{what}; expected a checkpoint directory (written by `save_pretrained`, flava "
                              "pretrain or train-codebook, or a Hugging Face FLAVA checkpoint)")
    return path


def is_ours(meta: dict[str, Any]) -> bool:
    return meta.get("format") == FORMAT


def split_parts(tensors: Tensors, origin: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Our flat `part.name` tensors split by part."""
    parts: dict[str, dict[str, torch.Tensor]] = {p: {} for p in PARTS}
    for key, value in tensors.items():
        part, _, rest = key.partition(".")
        if part not in parts:
            raise CheckpointError(f"{origin / WEIGHTS} holds an unexpected weight {key!r}")
        parts[part][rest] = value
    return parts
