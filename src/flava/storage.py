"""Model directories on disk: this project's format and Hugging Face FLAVA checkpoints.

This project's format is a directory with `config.json` ({"format": "flava", "model": {...}})
and `model.safetensors`, whose keys are prefixed by part: `model.`, `heads.`, `codebook.`.
A directory is replaced atomically: it is written beside the target and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import FlavaConfig, from_dict, to_dict, validate
from .errors import CheckpointError, ConfigError
from .interop import hf

FORMAT = "flava"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
PARTS = ("model", "heads", "codebook")


@dataclass
class Checkpoint:
    """A checkpoint read from disk, weights already in this project's names."""

    path: Path
    config: FlavaConfig
    parts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    source: str = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)
    """Other sections of our config.json (e.g. training settings), kept as read."""


# --------------------------------------------------------------------------- writing


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_replaceable(target: Path, also_ours: tuple[str, ...] = ()) -> None:
    """Refuse to overwrite a directory that holds anything but a checkpoint of ours."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} is a file; choose a directory to write to")
    if target.is_dir():
        names = {p.name for p in target.iterdir()}
        if names and CONFIG not in names and not names <= set(also_ours):
            raise CheckpointError(
                f"{target} already holds other files and is not a checkpoint; choose another output directory"
            )


def replace_dir(target: Path, fill, also_ours: tuple[str, ...] = ()) -> None:
    """Call fill(tmpdir) then move tmpdir to `target`; on any failure `target` is untouched."""
    target = Path(target)
    check_replaceable(target, also_ours)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        fill(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _flat(parts: dict[str, nn.Module | dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, part in parts.items():
        sd = part.state_dict() if isinstance(part, nn.Module) else part
        for k, v in sd.items():
            tensors[f"{name}.{k}"] = v.detach().to("cpu").contiguous()
    return tensors


def save_model(
    directory: str | os.PathLike,
    config: FlavaConfig,
    parts: dict[str, nn.Module | dict[str, torch.Tensor]],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint directory of this project's format (replacing the directory whole)."""
    replace_dir(Path(directory), lambda tmp: write_checkpoint_files(tmp, config, parts, extra))


def write_checkpoint_files(
    directory: Path,
    config: FlavaConfig,
    parts: dict[str, nn.Module | dict[str, torch.Tensor]],
    extra: dict[str, Any] | None = None,
) -> None:
    """config.json and model.safetensors into an existing (staging) directory."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": to_dict(config), **(extra or {})}
    save_file(_flat(parts), str(Path(directory) / WEIGHTS), metadata={"format": FORMAT})
    write_json_atomic(Path(directory) / CONFIG, meta)


# --------------------------------------------------------------------------- reading


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is damaged") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} could not be read ({e}); the file is truncated or corrupt: copy or save it again"
        ) from None


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: one safetensors file, a sharded set, or a .bin."""
    single = directory / WEIGHTS
    index = directory / "model.safetensors.index.json"
    legacy = directory / "pytorch_model.bin"
    if single.is_file():
        return _load_safetensors(single)
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).is_file():
                raise CheckpointError(f"shard {directory / shard} listed in {index.name} is missing")
            tensors.update(_load_safetensors(directory / shard))
        return tensors
    if legacy.is_file():
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


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read either format; weights come back in this project's names, split by part."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_file():
        path = path.parent
    cfg_path = path / CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{path} is not a checkpoint: it has no {CONFIG} (expected a directory written by "
            f"`save_pretrained` or a Hugging Face FLAVA checkpoint)"
        )
    data = _read_json(cfg_path)
    tensors = read_weights(path)
    if data.get("format") == FORMAT:
        version = data.get("format_version", 1)
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{path} was written by a newer flava (format {version}); upgrade flava")
        try:
            config = validate(from_dict(FlavaConfig, data.get("model", {}), "model"))
        except ConfigError as e:
            raise CheckpointError(f"{cfg_path}: {e}") from None
        parts: dict[str, dict[str, torch.Tensor]] = {p: {} for p in PARTS}
        for key, value in tensors.items():
            part, _, rest = key.partition(".")
            if part not in parts:
                raise CheckpointError(f"{path / WEIGHTS} holds an unexpected weight {key!r}")
            parts[part][rest] = value
        extra = {k: v for k, v in data.items() if k not in ("format", "format_version", "model")}
        return Checkpoint(path, config, parts, FORMAT, extra)
    if hf.is_hf_config(data):
        try:
            config = validate(hf.config_from_hf(data))
        except (ConfigError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{cfg_path}: not a usable FLAVA config ({e})") from None
        model, heads, codebook, unknown = hf.state_dict_from_hf(tensors)
        if unknown:
            raise CheckpointError(
                f"{path} holds {len(unknown)} weight(s) that are not part of FLAVA, e.g. {unknown[0]!r}"
            )
        objectives = {f"{name}_weight": float(data[f"{name}_weight"]) for name in
                      ("mim", "mlm", "itm", "global_contrastive", "mmm_image", "mmm_text") if f"{name}_weight" in data}
        if "global_backprop_contrastive" in data:
            objectives["gather_with_grad"] = bool(data["global_backprop_contrastive"])
        return Checkpoint(path, config, {"model": model, "heads": heads, "codebook": codebook}, "transformers",
                          {"objectives": objectives})
    raise CheckpointError(f"{cfg_path} is neither a flava nor a Hugging Face FLAVA config")


def load_weights(module: nn.Module, sd: dict[str, torch.Tensor], what: str, origin: Path) -> None:
    """Strict load with one readable message for missing, unexpected or mis-shaped weights."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own if k in sd and sd[k].shape != own[k].shape]
    problems = []
    if wrong:
        k, got, want = wrong[0]
        problems.append(
            f"{len(wrong)} weight(s) have the wrong shape, e.g. {k}: checkpoint {list(got)}, config needs "
            f"{list(want)}"
        )
    if missing:
        problems.append(f"{len(missing)} weight(s) are missing, e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} weight(s) are not expected, e.g. {unexpected[0]}")
    if problems:
        raise CheckpointError(
            f"{origin}: the {what} weights do not match the config: " + "; ".join(problems)
            + ". The weights and config.json come from different models, or the file is damaged."
        )
    with torch.no_grad():
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


def build_loaded(factory, sd: dict[str, torch.Tensor], what: str, origin: Path) -> nn.Module:
    """`factory()` built on the meta device (no initialisation to throw away), then filled."""
    with torch.device("meta"):
        module = factory()
    module = module.to_empty(device="cpu")
    load_weights(module, sd, what, origin)
    return module


def load(
    path: str | os.PathLike,
    quantize: str | None = None,
    device: str | torch.device | None = None,
    pretraining: bool = False,
    codebook: str | os.PathLike | None = None,
):
    """A `FlavaModel` from a checkpoint directory (this project's or Hugging Face's), in eval mode.

    quantize="int8" swaps every linear layer for a dynamically quantized one (CPU inference).
    pretraining=True returns a `PretrainingModel` (model, heads, frozen image codebook, losses);
    `codebook` names a directory to take the image codebook from instead of the checkpoint.
    """
    from .model.flava import FlavaModel

    if quantize not in (None, "int8"):
        raise ConfigError(f"quantize={quantize!r} is not supported; use None or 'int8'")
    ckpt = read_checkpoint(path)
    if pretraining:
        import warnings

        from .pretraining import pretraining_from_checkpoint

        if quantize is not None:
            raise ConfigError("quantize is for inference; it cannot be combined with pretraining=True")
        pm, notes = pretraining_from_checkpoint(ckpt, codebook=load_codebook(codebook) if codebook else None)
        for note in notes:
            warnings.warn(f"{ckpt.path}: {note}", stacklevel=2)
        return pm.to(device) if device is not None else pm
    model = build_loaded(lambda: FlavaModel(ckpt.config), ckpt.parts["model"], "model", ckpt.path)
    model.eval()
    if quantize == "int8":
        from .quantize import quantize_int8

        model = quantize_int8(model)
    elif device is not None:
        model = model.to(device)
    return model


def load_codebook(path: str | os.PathLike):
    """The dVAE image tokenizer from a checkpoint directory: this project's, a transformers
    FlavaForPreTraining (its `image_codebook.*`), or a standalone transformers FlavaImageCodebook."""
    from .codebook import FlavaImageCodebook

    path = Path(path)
    cfg_path = path / CONFIG
    if cfg_path.is_file() and _read_json(cfg_path).get("model_type") == "flava_image_codebook":
        data = _read_json(cfg_path)
        try:
            cfg = hf.codebook_config_from_hf(data)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{cfg_path}: not a usable codebook config ({e})") from None
        sd = {hf.codebook_key_from_hf(k): v for k, v in read_weights(path).items()}
    else:
        ckpt = read_checkpoint(path)
        cfg, sd = ckpt.config.codebook, ckpt.parts.get("codebook") or {}
        if not sd:
            raise CheckpointError(f"{path} holds no image codebook weights")
    codebook = build_loaded(lambda: FlavaImageCodebook(cfg), sd, "codebook", path)
    return codebook.eval().requires_grad_(False)
