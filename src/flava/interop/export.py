"""`flava export-hf`: write a directory that transformers' FlavaForPreTraining loads as is."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from ..config import ObjectivesConfig
from ..errors import CheckpointError
from ..io.checkpoint import write_checkpoint_dir
from ..io.files import write_json_atomic
from ..objectives.pretraining import PretrainingHeads
from ..objectives.registry import OBJECTIVES
from . import transformers as hf

if TYPE_CHECKING:
    from ..hub import Checkpoint


def export_hf(ckpt: Checkpoint, out_dir: str | os.PathLike, seed: int = 0) -> list[str]:
    """Write `ckpt` (read by `flava.hub.read_checkpoint`) in transformers' format; returns notes for
    the user (e.g. parts that had to be initialised or could not be expressed)."""
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
        heads = PretrainingHeads(cfg, ObjectivesConfig()).state_dict()
        notes.append("the checkpoint has no pretraining heads; the export carries newly initialised ones")
    foreign = {r.name for r in OBJECTIVES if not r.transformers_name}
    dropped = sorted({k.split(".")[0] for k in heads} & foreign)
    if dropped:
        heads = {k: v for k, v in heads.items() if k.split(".")[0] not in foreign}
        notes.append(f"transformers has no {', '.join(dropped)} objective; its parameters are not exported")
    codebook = ckpt.parts.get("codebook") or None
    if codebook is None:
        notes.append("the checkpoint has no image codebook; the export sets init_codebook=false")
    tensors = {k: v.contiguous() for k, v in hf.state_dict_to_hf(ckpt.parts["model"], heads, codebook).items()}
    config = hf.config_to_hf(cfg, with_codebook=codebook is not None)

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json_atomic(tmp / "config.json", config)

    write_checkpoint_dir(out_dir, fill)
    return notes
