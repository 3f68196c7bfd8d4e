"""`flava export-hf`: write a directory that transformers' FlavaForPreTraining loads as is."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import CheckpointError
from ..model.heads import PretrainingHeads
from ..storage import read_checkpoint, replace_dir, write_json_atomic
from . import hf


def export_hf(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, seed: int = 0) -> list[str]:
    """Convert; returns notes for the user (e.g. parts that had to be initialised)."""
    ckpt = read_checkpoint(checkpoint)
    cfg = ckpt.config
    notes = []
    mm = cfg.multimodal.hidden_size
    if cfg.image.hidden_size != mm or cfg.text.hidden_size != mm:
        raise CheckpointError(
            "transformers' FlavaForPreTraining sizes its MMM heads by the unimodal encoders, so it needs "
            f"image, text and multimodal hidden sizes to be equal (here {cfg.image.hidden_size}, "
            f"{cfg.text.hidden_size}, {mm}); this model cannot be expressed in its format"
        )
    heads = ckpt.parts.get("heads") or {}
    if not heads:
        torch.manual_seed(seed)
        heads = PretrainingHeads(cfg).state_dict()
        notes.append("the checkpoint has no pretraining heads; the export carries newly initialised ones")
    codebook = ckpt.parts.get("codebook") or None
    if codebook is None:
        notes.append("the checkpoint has no image codebook; the export sets init_codebook=false")
    tensors = {k: v.contiguous() for k, v in hf.state_dict_to_hf(ckpt.parts["model"], heads, codebook).items()}
    config = hf.config_to_hf(cfg, with_codebook=codebook is not None)

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json_atomic(tmp / "config.json", config)

    replace_dir(Path(out_dir), fill)
    return notes
