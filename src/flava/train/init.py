"""Start encoders from other checkpoints: an earlier unimodal stage, a transformers FLAVA, a ViT.

The paper starts the image encoder from DINO ViT-B/16; a staged run starts the joint stage
from the `text-mlm` and `image-mim` stages. Each encoder comes with the projections that feed
from it, so every FlavaModel weight belongs to one group (the logit scale to none):

- image: `image_encoder.*` and `image_projection` (contrastive);
- text: `text_encoder.*` and `text_projection` (contrastive);
- multimodal: `multimodal_encoder.*`, `image_to_mm_projection` and `text_to_mm_projection`.

A ViT checkpoint gives the image encoder alone (see `interop.vit` for what it leaves fresh), and so
does an `image-dino` stage: its teacher's encoder (DINO releases the teacher; there is no
image_projection to take). Heads are not taken: a stage's MLM, MIM or DINO head belongs to that
stage's objective.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from ..loading import Checkpoint, read_checkpoint
from ..interop import vit
from ..io.checkpoint import read_config
from ..io.runs import resolve
from ..model.encoders import ImageEncoder

GROUPS = {
    "image": ("image_encoder.", "image_projection."),
    "text": ("text_encoder.", "text_projection."),
    "multimodal": ("multimodal_encoder.", "image_to_mm_projection.", "text_to_mm_projection."),
}
# The encoder each unimodal stage trains (the others stay as the stage started them).
_STAGE_TRAINS = {"text-mlm": "text", "image-mim": "image", "image-dino": "image"}
# Where a DINO stage's checkpoint (its `dino` part) keeps the teacher's image encoder.
DINO_TEACHER = "teacher.backbone."


def _their_group(ckpt: Checkpoint, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    if ckpt.parts.get("dino"):
        if prefixes[0] != "image_encoder.":
            return {}
        return {"image_encoder." + k.removeprefix(DINO_TEACHER): v for k, v in ckpt.parts["dino"].items()
                if k.startswith(DINO_TEACHER)}
    return {k: v for k, v in ckpt.parts.get("model", {}).items() if k.startswith(prefixes)}


def _group_state(own_state: dict[str, torch.Tensor], ours, ckpt: Checkpoint, name: str,
                 prefixes: tuple[str, ...] | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The weights of group `name` (or of `prefixes` alone) to copy from `ckpt` into a model whose
    state dict is `own_state` and FlavaConfig `ours`, and notes on what differs."""
    prefixes = prefixes or GROUPS[name]
    own = {k: v for k, v in own_state.items() if k.startswith(prefixes)}
    theirs = _their_group(ckpt, prefixes)
    if not any(k.startswith(prefixes[0]) for k in theirs):
        raise CheckpointError(f"cannot initialise the {name} encoder from {ckpt.path}: it holds no {name} encoder")
    notes = []
    if ckpt.parts.get("dino") and len(prefixes) > 1:
        own = {k: v for k, v in own.items() if k.startswith(prefixes[0])}
        notes.append("the image encoder of its DINO teacher; image_projection keeps its initialisation (a DINO "
                     "stage trains none)")
    ours_cfg, their_cfg = getattr(ours, name), getattr(ckpt.config, name)
    if name == "image" and their_cfg.grid_size != ours_cfg.grid_size and their_cfg.patch_size == ours_cfg.patch_size:
        key = "image_encoder.pos_embed"
        if key in theirs:
            theirs[key] = vit.resize_pos_embed(theirs[key], ours_cfg.grid_size)
            notes.append(f"position embeddings resized from {their_cfg.grid_size}x{their_cfg.grid_size} to "
                         f"{ours_cfg.grid_size}x{ours_cfg.grid_size} patches")
    vit.check_fit(name, theirs, own, their_cfg, ours_cfg, ckpt.path)
    stage = (ckpt.extra.get("train") or {}).get("stage")
    if _STAGE_TRAINS.get(stage, name) != name:
        notes.append(f"beware: it was written by a {stage} stage, which does not train the {name} encoder")
    return theirs, notes


def initialise_encoders(pretraining_model, image: str = "", text: str = "", multimodal: str = "") -> dict[str, str]:
    """Replace the named encoders' weights (in place) by those of the given checkpoints.

    Each source is one of our checkpoints (checkpoints/step_N, or a run directory whose
    checkpoints/latest.json points to one), a transformers FLAVA directory, or, for the image
    encoder only, a transformers ViT directory. Every source is read and checked before any
    weight changes. Returns, per initialised encoder, what was loaded from where (for the log).
    """
    model = pretraining_model.model
    wanted = {name: src for name, src in (("image", image), ("text", text), ("multimodal", multimodal)) if src}
    read: dict[Path, Checkpoint | vit.VitCheckpoint] = {}
    updates: dict[str, torch.Tensor] = {}
    described = {}
    for name, src in wanted.items():
        path = resolve(src)
        if path not in read:
            is_vit = vit.is_vit_config(read_config(path))
            read[path] = vit.read_vit(path) if is_vit else read_checkpoint(path)
        ckpt = read[path]
        if isinstance(ckpt, vit.VitCheckpoint):
            if name != "image":
                raise CheckpointError(f"cannot initialise the {name} encoder from {path}: a ViT checkpoint holds "
                                      f"an image encoder only")
            own = {k.removeprefix("image_encoder."): v for k, v in model.state_dict().items()
                   if k.startswith("image_encoder.")}
            sd, notes = vit.vit_image_state(ckpt, model.config.image, own)
            updates.update({"image_encoder." + k: v for k, v in sd.items()})
            what = f"image encoder from the ViT {path}"
        else:
            sd, notes = _group_state(model.state_dict(), model.config, ckpt, name)
            updates.update(sd)
            kind = "flava checkpoint" if ckpt.source == "flava" else "transformers FLAVA checkpoint"
            what = f"{name} encoder and {', '.join(p.rstrip('.') for p in GROUPS[name][1:])} from the {kind} {path}"
        described[name] = what + (f" ({'; '.join(notes)})" if notes else "")
    own = model.state_dict()
    with torch.no_grad():
        for key, value in updates.items():
            own[key].copy_(value)
    return described


def initialise_image_encoder(encoder: ImageEncoder, model_config, src: str) -> str:
    """Replace a bare image encoder's weights (in place) by those of `src`: a transformers ViT
    directory (e.g. facebook/dino-vitb16) or one of our checkpoints (its image encoder; a DINO
    stage's teacher encoder). `model_config` is the FlavaConfig the encoder belongs to. Returns what
    was loaded from where (for the log)."""
    path = resolve(src)
    own = encoder.state_dict()
    if vit.is_vit_config(read_config(path)):
        sd, notes = vit.vit_image_state(vit.read_vit(path), encoder.cfg, own)
        what = f"image encoder from the ViT {path}"
    else:
        ckpt = read_checkpoint(path)
        prefixed, notes = _group_state({"image_encoder." + k: v for k, v in own.items()}, model_config, ckpt,
                                       "image", ("image_encoder.",))
        sd = {k.removeprefix("image_encoder."): v for k, v in prefixed.items()}
        what = f"image encoder from the {'flava' if ckpt.source == 'flava' else 'transformers FLAVA'} checkpoint {path}"
    with torch.no_grad():
        for key, value in sd.items():
            own[key].copy_(value)
    return what + (f" ({'; '.join(notes)})" if notes else "")
