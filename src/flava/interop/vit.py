"""Hugging Face ViT checkpoints (e.g. DINO ViT-B/16, as the paper uses) for the image encoder.

A transformers `ViTModel` is FLAVA's image encoder under the same weight names as transformers'
FLAVA image model, so its names are translated by `interop.transformers`' templates. What is dropped:
the ViT pooler (FLAVA never reads the image pooler, and ViT's has its own activation and width
settings; ours keeps its initialisation), the classifier of `ViTForImageClassification` and the
decoder of `ViTForMaskedImageModeling`.

A checkpoint made for another image size loads with its position table bicubically resized to
our grid: the operation `ImageEncoder.position_embeddings` applies when a model runs with
`interpolate_pos_encoding=True` (and transformers' ViT does the same), so the loaded encoder
computes exactly what the ViT computes on images of our size with `interpolate_pos_encoding`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ImageEncoderConfig, TransformerConfig
from ..errors import CheckpointError, InputError
from ..io.checkpoint import CONFIG, read_config, read_weights
from ..model.encoders import ImageEncoder, resize_position_table
from . import transformers as hf

_VIT_DEFAULTS = dict(hf._HF_TRANSFORMER_DEFAULTS, image_size=224, patch_size=16, num_channels=3)

# Fields that change what an encoder computes (dropout only changes training).
ARCHITECTURE_FIELDS = ("hidden_size", "num_layers", "num_heads", "mlp_size", "activation", "layer_norm_eps",
                       "qkv_bias")
IMAGE_ARCHITECTURE_FIELDS = ARCHITECTURE_FIELDS + ("patch_size", "num_channels")

_DROPPED = re.compile(r"(pooler|classifier|decoder)\..*")


def is_vit_config(data: dict[str, Any]) -> bool:
    return data.get("model_type") == "vit"


def image_config_from_vit(hf_config: dict[str, Any]) -> ImageEncoderConfig:
    """An ImageEncoderConfig matching a transformers ViTConfig dict (its config.json).

    `use_mask_token` and `vocab_size` (the image tokens MIM predicts) are not ViT settings and
    keep ImageEncoderConfig's defaults.
    """
    d = dict(_VIT_DEFAULTS)
    d.update({k: v for k, v in hf_config.items() if v is not None})
    try:
        fields = hf._transformer_fields(d, "config")
        head_dim = d.get("head_dim")
        if head_dim is not None and int(head_dim) * fields["num_heads"] != fields["hidden_size"]:
            raise CheckpointError(f"ViT config: head_dim {head_dim} x {fields['num_heads']} heads differs from "
                                  f"hidden_size {fields['hidden_size']}; such attention is not supported")
        return ImageEncoderConfig(
            **fields, image_size=hf._square("image_size", d["image_size"]),
            patch_size=hf._square("patch_size", d["patch_size"]), num_channels=int(d["num_channels"]),
        )
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"ViT config: not usable ({type(e).__name__}: {e})") from None


def check_fit(what: str, theirs: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
              their_cfg: TransformerConfig, our_cfg: TransformerConfig, origin: Path | str) -> None:
    """CheckpointError naming the first weight that is missing, unexpected or of another shape,
    and the first setting that differs (some, e.g. num_heads or the activation, change no shape)."""
    fields = IMAGE_ARCHITECTURE_FIELDS if isinstance(our_cfg, ImageEncoderConfig) else ARCHITECTURE_FIELDS
    setting = next(((n, getattr(their_cfg, n), getattr(our_cfg, n)) for n in fields
                    if getattr(their_cfg, n) != getattr(our_cfg, n)), None)
    hint = f"its {setting[0]} is {setting[1]!r}, this model's is {setting[2]!r}" if setting else ""
    problem = None
    for key, want in own.items():
        if key not in theirs:
            problem = f"it lacks {key}"
        elif tuple(theirs[key].shape) != tuple(want.shape):
            problem = f"{key} has shape {list(theirs[key].shape)} there and {list(want.shape)} in this model"
        if problem:
            break
    else:
        extra = [k for k in theirs if k not in own]
        if extra:
            problem = f"it holds {extra[0]}, which this model lacks"
    if problem or setting:
        fix = f"; set model.{what}.{setting[0]}={setting[1]!r} or choose a matching checkpoint" if setting else ""
        raise CheckpointError(f"cannot initialise the {what} encoder from {origin}: "
                              + (f"{problem} ({hint})" if problem and hint else problem or hint) + fix)


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """A checkpoint's position table re-gridded to grid x grid patches."""
    try:
        return resize_position_table(pos_embed, grid, grid)
    except InputError as e:
        raise CheckpointError(str(e)) from None


def state_dict_from_vit(tensors: dict[str, torch.Tensor], origin: Path | str) -> tuple[dict, list[str]]:
    """Our ImageEncoder's names for a ViT state dict (bare or `vit.`-prefixed); also the dropped keys."""
    prefixed, dropped = {}, []
    for key, value in tensors.items():
        k = key[len("vit."):] if key.startswith("vit.") else key
        if _DROPPED.fullmatch(k):
            dropped.append(key)
        else:
            prefixed["image_model." + k] = value
    model, heads, codebook, unknown = hf.state_dict_from_hf(prefixed)
    unknown += [k for k in model if not k.startswith("image_encoder.")] + list(heads) + list(codebook)
    if unknown:
        raise CheckpointError(f"{origin} holds {len(unknown)} weight(s) that are not part of a ViT, "
                              f"e.g. {unknown[0].removeprefix('image_model.')!r}")
    return {k[len("image_encoder."):]: v for k, v in model.items()}, dropped


@dataclass
class VitCheckpoint:
    path: Path
    config: ImageEncoderConfig
    state_dict: dict[str, torch.Tensor]
    """In our ImageEncoder's names; `mask_token` only when the checkpoint has one."""
    dropped: list[str] = field(default_factory=list)


def read_vit(path: str | os.PathLike) -> VitCheckpoint:
    """A transformers ViT checkpoint directory (config.json + weights), in our names."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise CheckpointError(f"{path} is not a ViT checkpoint: it has no {CONFIG}")
    data = read_config(path)
    if not is_vit_config(data):
        raise CheckpointError(f"{path} is not a Hugging Face ViT checkpoint (model_type {data.get('model_type')!r})")
    try:
        config = image_config_from_vit(data)
    except CheckpointError as e:
        raise CheckpointError(f"{path / CONFIG}: {e}") from None
    sd, dropped = state_dict_from_vit(read_weights(path), path)
    return VitCheckpoint(path, config, sd, dropped)


def vit_image_state(ckpt: VitCheckpoint, ours: ImageEncoderConfig,
                    own: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """The tensors to copy into an image encoder whose state dict is `own`, and notes on what differs.

    Raises CheckpointError when the ViT does not fit `ours` (architecture, a missing or
    mis-shaped weight)."""
    sd = dict(ckpt.state_dict)
    notes = []
    if ckpt.config.grid_size != ours.grid_size and "pos_embed" in sd and ours.patch_size == ckpt.config.patch_size:
        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], ours.grid_size)
        notes.append(f"position embeddings resized from {ckpt.config.grid_size}x{ckpt.config.grid_size} to "
                     f"{ours.grid_size}x{ours.grid_size} patches")
    if "mask_token" in sd and "mask_token" not in own:
        del sd["mask_token"]
        notes.append("its mask token is dropped (use_mask_token is false)")
    fresh = [k for k in own if k not in sd and (k == "mask_token" or k.startswith("pooler."))]
    check_fit("image", sd, {k: v for k, v in own.items() if k not in fresh}, ckpt.config, ours, ckpt.path)
    if "mask_token" in fresh:
        notes.append("the ViT has no mask token: ours keeps its fresh initialisation")
    if ckpt.dropped:
        parts = sorted({k.removeprefix("vit.").split(".")[0] for k in ckpt.dropped})
        notes.append(f"its {', '.join(parts)} not loaded")
    return sd, notes


def load_vit(encoder: ImageEncoder, path: str | os.PathLike) -> list[str]:
    """Fill an `ImageEncoder` from a transformers ViT directory; returns notes on what differs.

    The pooler is not loaded, and without a mask token in the checkpoint ours keeps its
    fresh initialisation; everything else is replaced."""
    ckpt = read_vit(path)
    own = encoder.state_dict()
    sd, notes = vit_image_state(ckpt, encoder.cfg, own)
    with torch.no_grad():
        for key, value in sd.items():
            own[key].copy_(value)
    return notes
