"""From a checkpoint on disk to models: the factories.

`read_checkpoint` reads this project's format or a transformers FLAVA directory into one
`Checkpoint` (weights in this project's names, split by part); `load`, `load_codebook` and
`pretraining_from_checkpoint` build models from it, on the meta device first so no weight is
initialised only to be overwritten.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import FlavaConfig, ObjectivesConfig, from_dict, validate
from .data.processor import Processor
from .errors import CheckpointError, ConfigError, first_line
from .interop import text_towers, towers
from .interop import transformers as hf
from .io.checkpoint import (FORMAT, FORMAT_VERSION, check_sum, checkpoint_dir, is_ours, read_config, read_weights,
                            split_parts)
from .io.runs import resolve
from .model.codebook import FlavaImageCodebook
from .model.flava import FlavaModel
from .objectives.pretraining import PretrainingHeads, PretrainingModel
from .objectives.registry import OBJECTIVES


@dataclass
class Checkpoint:
    """A checkpoint read from disk, weights already in this project's names."""

    path: Path
    config: FlavaConfig
    parts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    source: str = FORMAT
    """'flava' or 'transformers'."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other sections of our config.json (e.g. training settings), kept as read."""

    @property
    def model_weights(self) -> dict[str, torch.Tensor]:
        """The model's weights. A codebook (`flava train-codebook`) or an image-dino stage holds
        none, and is said to be what it is rather than a model missing its every weight."""
        if self.parts.get("model"):
            return self.parts["model"]
        if self.parts.get("codebook"):
            raise CheckpointError(f"{self.path} is an image codebook (flava train-codebook), not a model: name a "
                                  "pretrained model, or give the codebook to pretraining as --set "
                                  f"codebook={self.path}")
        if self.parts.get("dino"):
            raise CheckpointError(f"{self.path} is an image-dino stage: it holds DINO's image encoder alone, not a "
                                  f"model; start a run from it with --set init_image={self.path}")
        raise CheckpointError(f"{self.path} holds no model weights")


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read either format; weights come back in this project's names, split by part."""
    path = checkpoint_dir(path)
    check_sum(path / "config.json")  # an edited config would describe other weights, or read them otherwise
    data = read_config(path)
    # The config first: an impossible one is refused before any weight is read.
    if is_ours(data):
        version = data.get("format_version", 1)
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{path} was written by a newer flava (format {version}); upgrade flava")
        try:
            config = validate(from_dict(FlavaConfig, data.get("model", {}), "model"))
        except ConfigError as e:
            raise CheckpointError(f"{path / 'config.json'}: {e}") from None
        extra = {k: v for k, v in data.items() if k not in ("format", "format_version", "model")}
        return Checkpoint(path, config, split_parts(read_weights(path), path), FORMAT, extra)
    if hf.is_hf_config(data):
        try:
            config = validate(hf.config_from_hf(data))
        except (ConfigError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path / 'config.json'}: not a usable FLAVA config ({e})") from None
        model, heads, codebook, unknown = hf.state_dict_from_hf(read_weights(path))
        if unknown:
            raise CheckpointError(
                f"{path} holds {len(unknown)} weight(s) that are not part of FLAVA, e.g. {unknown[0]!r}"
            )
        objectives = {r.weight: float(data[f"{r.transformers_name}_weight"]) for r in OBJECTIVES
                      if r.transformers_name and f"{r.transformers_name}_weight" in data}
        if "global_backprop_contrastive" in data:
            objectives["gather_with_grad"] = bool(data["global_backprop_contrastive"])
        return Checkpoint(path, config, {"model": model, "heads": heads, "codebook": codebook}, "transformers",
                          {"objectives": objectives})
    raise CheckpointError(_not_flava(path, data))


def _not_flava(path: Path, data: dict) -> str:
    """Why a directory whose config.json is not FLAVA's cannot be read as a model. A public tower
    is named as one: pretraining starts an encoder from it, nothing loads it as a model."""
    family = towers.family_of(data)
    if family is not None:
        return (f"{path} is a {family.name} image tower (a ViT-like image encoder alone), not a FLAVA model: "
                f"pretraining starts its image encoder from it with --set init_image={path}")
    if text_towers.is_text_tower_config(data):
        return (f"{path} is a {data['model_type']} text tower (a BERT-like text encoder alone), not a FLAVA model: "
                f"pretraining starts its text encoder from it with --set init_text={path}")
    return f"{path / 'config.json'} is neither a flava nor a Hugging Face FLAVA config"


def weight_mismatch(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], what: str, origin: Path) -> str | None:
    """Why weights `sd` cannot fill a module whose state dict is `own` (on any device, meta
    included), or None when every name and shape matches."""
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
    if not problems:
        return None
    return (f"{origin}: the {what} weights do not match the config: " + "; ".join(problems)
            + ". The weights and config.json come from different models, or the file is damaged.")


def refuse_non_finite(sd: dict[str, torch.Tensor], what: str, origin: Path) -> None:
    """One line naming weights that hold NaN or infinity (a model would give NaN for everything)."""
    # The extremes carry a NaN or an infinity when any value does, without a sum's overflow (0.08 s for
    # the base model's weights).
    bad = [k for k, v in sd.items()
           if v.is_floating_point() and v.numel() and not all(map(torch.isfinite, torch.aminmax(v)))]
    if bad:
        raise CheckpointError(f"{origin}: {len(bad)} {what} weight(s) hold NaN or infinite values, e.g. {bad[0]}: the "
                              "checkpoint is damaged or was saved after training diverged; use an earlier one")


def load_weights(module: nn.Module, sd: dict[str, torch.Tensor], what: str, origin: Path) -> None:
    """Strict load with one readable message for missing, unexpected or mis-shaped weights."""
    own = module.state_dict()
    problem = weight_mismatch(own, sd, what, origin)
    if problem:
        raise CheckpointError(problem)
    refuse_non_finite(sd, what, origin)
    with torch.no_grad():
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


def build_loaded(factory: Callable[[], nn.Module], sd: dict[str, torch.Tensor], what: str, origin: Path) -> nn.Module:
    """`factory()` built on the meta device (no initialisation to throw away), then filled."""
    with torch.device("meta"):
        module = factory()
    module = module.to_empty(device="cpu")
    load_weights(module, sd, what, origin)
    return module


def pretraining_from_checkpoint(ckpt: Checkpoint, objectives: ObjectivesConfig | None = None,
                                codebook: FlavaImageCodebook | None = None) -> tuple[PretrainingModel, list[str]]:
    """Build from a read checkpoint; returns the model and notes on parts that were initialised."""
    notes = []
    if objectives is None:
        objectives = from_dict(ObjectivesConfig, ckpt.extra.get("objectives", {}), "objectives")
    cfg, parts = ckpt.config, ckpt.parts
    model = build_loaded(lambda: FlavaModel(cfg), ckpt.model_weights, "model", ckpt.path)
    heads = PretrainingHeads(cfg, objectives)
    saved = parts.get("heads") or {}
    if not saved:
        notes.append("the checkpoint has no pretraining heads; they are newly initialised")
    else:  # heads of objectives this config did not choose are dropped; missing ones start fresh
        for name, head in heads.named_children():
            own = _head_weights(saved, name)
            if own:
                load_weights(head, own, f"{name} head", ckpt.path)
            else:
                notes.append(f"the checkpoint has no {name} head; it is newly initialised")
        dropped = sorted({k.split(".")[0] for k in saved} - {n for n, _ in heads.named_children()})
        if dropped:
            notes.append(f"the checkpoint's {', '.join(dropped)} head(s) are not used by these objectives")
    if codebook is None and parts.get("codebook"):
        codebook = build_loaded(lambda: FlavaImageCodebook(cfg.codebook), parts["codebook"], "codebook", ckpt.path)
    if codebook is None:
        notes.append("the checkpoint has no image codebook; MIM/MMM need one (flava train-codebook)")
    try:
        pm = PretrainingModel(ckpt.config, objectives, model, heads, codebook)
    except ConfigError as e:
        raise CheckpointError(f"{ckpt.path}: {e}") from None
    return pm, notes


def _head_weights(saved: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    return {k[len(name) + 1:]: v for k, v in saved.items() if k.startswith(name + ".")}


def checkpoint_mismatches(ckpt: Checkpoint) -> list[tuple[str, str]]:
    """(part, why) for each of the checkpoint's model, heads and codebook that a loader would
    refuse (weights whose names or shapes its config does not build), in that order. Built on the
    meta device: nothing is allocated."""
    cfg, parts = ckpt.config, ckpt.parts
    found = []
    with torch.device("meta"):
        if parts.get("model"):
            found.append(("model", weight_mismatch(FlavaModel(cfg).state_dict(), parts["model"], "model", ckpt.path)))
        if parts.get("heads"):
            objectives = from_dict(ObjectivesConfig, ckpt.extra.get("objectives", {}), "objectives")
            heads = [weight_mismatch(head.state_dict(), own, f"{name} head", ckpt.path)
                     for name, head in PretrainingHeads(cfg, objectives).named_children()
                     if (own := _head_weights(parts["heads"], name))]
            found.append(("heads", next((h for h in heads if h), None)))
        if parts.get("codebook"):
            found.append(("codebook", weight_mismatch(FlavaImageCodebook(cfg.codebook).state_dict(), parts["codebook"],
                                                      "codebook", ckpt.path)))
    return [(part, why) for part, why in found if why]


def load(
    path: str | os.PathLike,
    quantize: str | None = None,
    device: str | torch.device | None = None,
    pretraining: bool = False,
    codebook: str | os.PathLike | None = None,
):
    """A `FlavaModel` in eval mode from a checkpoint directory (this project's or Hugging Face's), a
    run directory (its newest checkpoint) or a Hugging Face hub id ("facebook/flava-full", through
    huggingface_hub's cache; HF_HUB_OFFLINE=1 reads the cache only). `model.processor` turns raw
    images and strings into its inputs.

    quantize="int8" swaps every linear layer for a dynamically quantized one (CPU inference).
    pretraining=True returns a `PretrainingModel` (model, heads, frozen image codebook, losses) in
    train mode, to train on; `codebook` names a directory to take the image codebook from instead
    of the checkpoint.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"flava.load takes a checkpoint or run directory, or a hub id; got {type(path).__name__}")
    if quantize not in (None, "int8"):
        raise ConfigError(f"quantize={quantize!r} is not supported; use None or 'int8'")
    check_device(device)
    if quantize == "int8" and device is not None and torch.device(device).type != "cpu":
        raise ConfigError(f"quantize='int8' is for CPU inference; it cannot run on {device}: leave out quantize, "
                          "or device")
    if codebook is not None and not pretraining:
        raise ConfigError("codebook= names the image codebook of a model to pretrain: it needs pretraining=True")
    ckpt = read_checkpoint(resolve(path) if not Path(path).is_file() else path)
    if pretraining:
        if quantize is not None:
            raise ConfigError("quantize is for inference; it cannot be combined with pretraining=True")
        pm, notes = pretraining_from_checkpoint(ckpt, codebook=load_codebook(codebook) if codebook else None)
        pm.model.processor = Processor.from_directory(ckpt.path)
        for note in notes:
            warnings.warn(f"{ckpt.path}: {note}", stacklevel=2)
        return pm.to(device) if device is not None else pm
    model = build_loaded(lambda: FlavaModel(ckpt.config), ckpt.model_weights, "model", ckpt.path)
    model.eval()
    model.processor = Processor.from_directory(ckpt.path)
    if quantize == "int8":
        from .model.quantize import quantize_int8

        model = quantize_int8(model)
    elif device is not None:
        model = model.to(device)
    return model


def check_device(device: str | torch.device | None) -> None:
    """One line for a device this machine lacks, before any weight is read (torch says it with an
    AssertionError from deep inside `.to`); the CLI's `--device` check says the same."""
    if device is None:
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):  # torch's message lists every device type it was built to name
        raise ConfigError(f"device={device!r} is no device: 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} was asked for but CUDA is not available; use device='cpu'")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # torch's first sentence; the rest lists its backends
        why = first_line(e).split(". ")[0]
        raise ConfigError(f"device {str(device)!r} is not usable here ({why}); use device='cpu'") from None


def load_codebook(path: str | os.PathLike) -> FlavaImageCodebook:
    """The dVAE image codebook from a checkpoint directory: this project's, a transformers
    FlavaForPreTraining (its `image_codebook.*`), or a standalone transformers FlavaImageCodebook;
    a run or recipe directory means its latest checkpoint, as for models."""
    path = checkpoint_dir(path) if Path(path).is_file() else resolve(path)
    data = read_config(path)
    if data.get("model_type") == "flava_image_codebook":
        try:
            cfg = hf.codebook_config_from_hf(data)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path / 'config.json'}: not a usable codebook config ({e})") from None
        return _frozen_codebook(cfg, {hf.codebook_key_from_hf(k): v for k, v in read_weights(path).items()}, path, None)
    ckpt = read_checkpoint(path)
    if not ckpt.parts.get("codebook"):
        raise CheckpointError(f"{path} holds no image codebook weights")
    # What train-codebook records; a codebook checkpoint's config says it too, but a codebook
    # beside a model has the model's config, not its training's.
    trained = (ckpt.extra.get("codebook_training") or {}).get("image_size")
    if not isinstance(trained, int):
        trained = None if ckpt.parts.get("model") else ckpt.config.codebook_image_size
    return codebook_of(ckpt, trained)


def codebook_scale_note(codebook, trained: int | None, model: FlavaConfig, whose: str) -> str | None:
    """A note when a codebook was trained at another image size than `model`'s grid gives it: it
    reads any size (it is convolutional), but its tokens then describe another scale."""
    wanted = model.codebook_image_size
    if trained is None or trained == wanted:
        return None
    grid = model.image.grid_size
    return (f"note: the codebook {codebook} was trained on {trained}-px images ({trained // 8}x{trained // 8} tokens), "
            f"but {whose} {grid}x{grid} patch grid gives it {wanted}-px ones: its tokens describe another scale; "
            "flava train-codebook with this model's settings makes a fitting one")


def codebook_of(ckpt: Checkpoint, trained: int | None = None) -> FlavaImageCodebook | None:
    """The frozen image codebook a read checkpoint holds beside its model (or alone), or None."""
    sd = ckpt.parts.get("codebook")
    return _frozen_codebook(ckpt.config.codebook, sd, ckpt.path, trained) if sd else None


def _frozen_codebook(cfg, sd: dict[str, torch.Tensor], path: Path, trained: int | None) -> FlavaImageCodebook:
    codebook = build_loaded(lambda: FlavaImageCodebook(cfg), sd, "codebook", path)
    codebook.trained_size = trained
    return codebook.eval().requires_grad_(False)


@dataclass(frozen=True)
class CodebookTokenizer:
    """Makes (in any process; it pickles as a path) a function from uint8 pixels [B, C, H, W] to
    image-token ids [B, (H/8)*(W/8)] on the CPU, computed on `device`, for `flava prepare`."""

    path: str
    device: str = "cpu"

    def __call__(self):
        from .data.transforms import map_uint8

        device = torch.device(self.device)
        codebook = load_codebook(self.path).eval().to(device)

        def tokenize(pixels: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return codebook.token_ids(map_uint8(pixels.to(device))).cpu()
        return tokenize

    def identity(self) -> tuple[str, int, int | None]:
        """The codebook's fingerprint, vocabulary size and the image size it was trained at, if
        recorded (one read of its weights)."""
        codebook = load_codebook(self.path)
        return codebook.fingerprint(), codebook.cfg.vocab_size, codebook.trained_size
