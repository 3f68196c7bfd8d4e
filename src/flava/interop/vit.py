"""Hugging Face ViT checkpoints (e.g. DINO ViT-B/16, as the paper uses) for the image encoder.

A transformers `ViTModel` is FLAVA's image encoder under the same weight names as transformers'
FLAVA image model. What is dropped: the ViT pooler (FLAVA never reads the image pooler, and ViT's
has its own activation and width settings; ours keeps its initialisation), the classifier of
`ViTForImageClassification` and the decoder of `ViTForMaskedImageModeling`.

A checkpoint made for another image size loads with its position table bicubically resized to
our grid: the operation `ImageEncoder.position_embeddings` applies when a model runs with
`interpolate_pos_encoding=True` (and transformers' ViT does the same), so the loaded encoder
computes exactly what the ViT computes on images of our size with `interpolate_pos_encoding`.

ViT is one of the public image towers `interop.towers` reads (with DeiT, DINOv2 and CLIP); these
are its names for the ViT alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..config import ImageEncoderConfig
from ..errors import CheckpointError
from ..io.checkpoint import CONFIG, read_config
from ..model.encoders import ImageEncoder
from .towers import (
    ARCHITECTURE_FIELDS,
    IMAGE_ARCHITECTURE_FIELDS,
    FAMILIES,
    Tower,
    check_fit,
    image_config,
    load_tower,
    read_tower,
    resize_pos_embed,
    tower_image_state,
)

__all__ = ["ARCHITECTURE_FIELDS", "IMAGE_ARCHITECTURE_FIELDS", "VitCheckpoint", "check_fit", "image_config_from_vit",
           "is_vit_config", "load_vit", "read_vit", "resize_pos_embed", "vit_image_state"]

VIT = FAMILIES[0]
VitCheckpoint = Tower


def is_vit_config(data: dict[str, Any]) -> bool:
    return data.get("model_type") == "vit"


def image_config_from_vit(hf_config: dict[str, Any]) -> ImageEncoderConfig:
    """An ImageEncoderConfig matching a transformers ViTConfig dict (its config.json).

    `use_mask_token` and `vocab_size` (the image tokens MIM predicts) are not ViT settings and
    keep ImageEncoderConfig's defaults."""
    return image_config(VIT, hf_config)


def read_vit(path: str | os.PathLike) -> Tower:
    """A transformers ViT checkpoint directory (config.json + weights), in our names."""
    path = Path(path)
    if (path / CONFIG).is_file() and not is_vit_config(data := read_config(path)):
        raise CheckpointError(f"{path} is not a Hugging Face ViT checkpoint (model_type {data.get('model_type')!r})")
    return read_tower(path)


def vit_image_state(ckpt: Tower, ours: ImageEncoderConfig, own: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """The tensors to copy into an image encoder whose state dict is `own`, and notes on what differs.

    Raises CheckpointError when the ViT does not fit `ours` (architecture, a missing or
    mis-shaped weight)."""
    return tower_image_state(ckpt, ours, own)


def load_vit(encoder: ImageEncoder, path: str | os.PathLike) -> list[str]:
    """Fill an `ImageEncoder` from a transformers ViT directory; returns notes on what differs."""
    return load_tower(encoder, path, read_vit(path))
