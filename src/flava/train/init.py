"""Start encoders from other checkpoints: an earlier unimodal stage, a transformers FLAVA, a ViT,
a BERT-family text tower.

The paper starts the image encoder from DINO ViT-B/16; a staged run starts the joint stage
from the `text-mlm` and `image-mim` stages; ALBEF and BLIP start from BERT. Each encoder comes with
the projections that feed from it, so every FlavaModel weight belongs to one group (the logit
scale to none):

- image: `image_encoder.*` and `image_projection` (contrastive);
- text: `text_encoder.*` and `text_projection` (contrastive);
- multimodal: `multimodal_encoder.*`, `image_to_mm_projection` and `text_to_mm_projection`.

A ViT checkpoint gives the image encoder alone (see `interop.vit` for what it leaves fresh), and so
does an `image-dino` stage: its teacher's encoder (DINO releases the teacher; there is no
image_projection to take). A BERT-family checkpoint (BERT, MiniLM, RoBERTa, DistilBERT...; see
`interop.text_towers`) gives the text encoder, and its MLM head to FLAVA's MLM head where that
fits; its tokenizer becomes the model's (`text_source`). Other heads are not taken: a stage's MLM,
MIM or DINO head belongs to that stage's objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import FlavaConfig, TextEncoderConfig, from_dict, validate
from ..data.tokenizer import TOKENIZER_FILE
from ..errors import CheckpointError, ConfigError
from ..loading import Checkpoint, read_checkpoint
from ..interop import text_towers, vit
from ..interop import transformers as hf
from ..io.checkpoint import is_ours, read_config
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


def resolve_source(src: str) -> Path:
    """A checkpoint, run or tower directory, a hub id, or a packaged tower's name (`minilm`)."""
    if src in text_towers.SHORTCUTS and not Path(src).exists():
        return text_towers.SHORTCUTS[src]()
    return resolve(src)


def checkpoint_tokenizer(directory: Path) -> str | None:
    """The tokenizer a checkpoint directory records (its tokenizer.json), or None: BERT uncased."""
    own = Path(directory) / TOKENIZER_FILE
    return str(own) if own.is_file() else None


@dataclass
class TextSource:
    """What `init_text` brings besides weights: its text encoder's settings and its tokenizer."""

    path: Path
    config: TextEncoderConfig
    tokenizer: str | None
    """A tokenizer.json or a directory holding the tokenizer; None: BERT uncased."""
    tower: str = ""
    """The model_type of a BERT-family tower; '' for a FLAVA checkpoint."""


def text_source(src: str) -> TextSource:
    """Read the settings (not the weights) of an `init_text` source."""
    path = resolve_source(src)
    data = read_config(path)
    try:
        if text_towers.is_text_tower_config(data):
            return TextSource(path, text_towers.text_config_from_tower(data), str(path), data["model_type"])
        if is_ours(data):
            config = validate(from_dict(FlavaConfig, data.get("model", {}), "model"))
        elif hf.is_hf_config(data):
            config = validate(hf.config_from_hf(data))
        elif vit.is_vit_config(data):
            raise CheckpointError("a ViT checkpoint holds an image encoder only")
        else:
            raise CheckpointError(f"it is neither a FLAVA checkpoint nor a text tower (model_type "
                                  f"{data.get('model_type')!r}; text towers: {', '.join(text_towers.FAMILIES)})")
    except (CheckpointError, ConfigError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"cannot initialise the text encoder from {path}: {e}") from None
    return TextSource(path, config.text, checkpoint_tokenizer(path))


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
    if name == "multimodal":
        # A projection from an encoder of another width (a text tower's) cannot be taken.
        for key in [k for k in own if k.startswith(prefixes[1:]) and k in theirs and k.endswith(".weight")
                    and theirs[k].shape[1] != own[k].shape[1]]:
            stem = key.removesuffix(".weight")
            notes.append(f"{stem} keeps its initialisation (it reads {theirs[key].shape[1]} features there, "
                         f"{own[key].shape[1]} here)")
            for k in (key, stem + ".bias"):
                own.pop(k, None)
                theirs.pop(k, None)
    if name == "text":
        text_towers.check_text_fit(theirs, own, their_cfg, ours_cfg, ckpt.path)
    else:
        vit.check_fit(name, theirs, own, their_cfg, ours_cfg, ckpt.path)
    stage = (ckpt.extra.get("train") or {}).get("stage")
    if _STAGE_TRAINS.get(stage, name) != name:
        notes.append(f"beware: it was written by a {stage} stage, which does not train the {name} encoder")
    return theirs, notes


def _tower_text(pretraining_model, tower: text_towers.TowerCheckpoint) -> tuple[dict, dict, str]:
    """(model updates, MLM head updates, one line on what was taken and what stays fresh)."""
    model, c = pretraining_model.model, tower.config
    own = {k.removeprefix("text_encoder."): v for k, v in model.state_dict().items() if k.startswith("text_encoder.")}
    sd, fresh = text_towers.tower_text_state(tower, model.config.text, own)
    taken = ["embeddings", f"{c.num_layers} post-norm blocks ({c.hidden_size} wide, {c.num_heads} heads, vocabulary "
                           f"{c.vocab_size})"] + ([] if fresh else ["pooler"])
    fresh.insert(0, "text_projection")
    head = getattr(getattr(pretraining_model, "heads", None), "mlm", None)
    head_sd = {}
    if head is not None:
        head_sd, why = text_towers.tower_mlm_head(tower, model.config.text, head.state_dict())
        if head_sd:
            taken.append("MLM head")
        else:
            fresh.append(f"MLM head ({why})")
    what = (f"text encoder from the {tower.kind} checkpoint {tower.path}: {', '.join(taken[:-1])} and {taken[-1]} "
            f"taken, with its tokenizer; fresh: {', '.join(fresh)}")
    if tower.dropped:
        what += f"; not loaded: its {', '.join(sorted({_head_name(k) for k in tower.dropped}))}"
    return ({"text_encoder." + k: v for k, v in sd.items()}, {"mlm." + k: v for k, v in head_sd.items()}, what)


def _head_name(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] == "cls" else parts[0]


def initialise_encoders(pretraining_model, image: str = "", text: str = "", multimodal: str = "") -> dict[str, str]:
    """Replace the named encoders' weights (in place) by those of the given checkpoints.

    Each source is one of our checkpoints (checkpoints/step_N, or a run directory whose
    checkpoints/latest.json points to one), a transformers FLAVA directory, or a hub id; for the
    image encoder also a transformers ViT directory, for the text encoder also a BERT-family one
    (`minilm`: the packaged MiniLM), whose settings the model must have (`text_source`; the
    pretraining stage builds its model so). Every source is read and checked before any weight
    changes. Returns, per initialised encoder, what was loaded from where (for the log).
    """
    model = pretraining_model.model
    wanted = {name: src for name, src in (("image", image), ("text", text), ("multimodal", multimodal)) if src}
    read: dict[Path, Checkpoint | vit.VitCheckpoint | text_towers.TowerCheckpoint] = {}
    updates: dict[str, torch.Tensor] = {}
    head_updates: dict[str, torch.Tensor] = {}
    described = {}
    for name, src in wanted.items():
        path = resolve_source(src)
        if path not in read:
            data = read_config(path)
            if vit.is_vit_config(data):
                read[path] = vit.read_vit(path)
            elif text_towers.is_text_tower_config(data):
                read[path] = text_towers.read_tower(path)
            else:
                read[path] = read_checkpoint(path)
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
        elif isinstance(ckpt, text_towers.TowerCheckpoint):
            if name != "text":
                raise CheckpointError(f"cannot initialise the {name} encoder from {path}: a {ckpt.kind} checkpoint "
                                      f"holds a text encoder only")
            sd, head_sd, described[name] = _tower_text(pretraining_model, ckpt)
            updates.update(sd)
            head_updates.update(head_sd)
            continue
        else:
            sd, notes = _group_state(model.state_dict(), model.config, ckpt, name)
            updates.update(sd)
            kind = "flava checkpoint" if ckpt.source == "flava" else "transformers FLAVA checkpoint"
            what = f"{name} encoder and {', '.join(p.rstrip('.') for p in GROUPS[name][1:])} from the {kind} {path}"
        described[name] = what + (f" ({'; '.join(notes)})" if notes else "")
    own = model.state_dict()
    heads = pretraining_model.heads.state_dict() if head_updates else {}
    with torch.no_grad():
        for key, value in updates.items():
            own[key].copy_(value)
        for key, value in head_updates.items():
            heads[key].copy_(value)
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
