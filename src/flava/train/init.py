"""Start encoders from other checkpoints: an earlier unimodal stage, a transformers FLAVA, a public
image tower, a BERT-family text tower.

The paper starts the image encoder from DINO ViT-B/16; a staged run starts the joint stage
from the `text-mlm` and `image-mim` stages; ALBEF and BLIP start from BERT. Each encoder comes with
the projections that feed from it, so every FlavaModel weight belongs to one group (the logit
scale to none):

- image: `image_encoder.*` and `image_projection` (contrastive);
- text: `text_encoder.*` and `text_projection` (contrastive);
- multimodal: `multimodal_encoder.*`, `image_to_mm_projection` and `text_to_mm_projection`.

A public image tower (a transformers ViT, DeiT, DINOv2 or CLIP directory, see `interop.towers`)
gives the image encoder alone, and decides it: the model's image config follows the tower
(architecture, image size unless `image_size` is given, pixel statistics), and when the width
changes, image_projection, image_to_mm_projection and the MIM head start fresh at the new width.
CLIP's visual_projection becomes image_projection when its sizes fit. An `image-dino` stage also
gives the image encoder alone: its teacher's encoder (DINO releases the teacher; there is no
image_projection to take). A BERT-family checkpoint (BERT, MiniLM, RoBERTa, DistilBERT...; see
`interop.text_towers`) gives the text encoder, and its MLM head to FLAVA's MLM head where that
fits; its tokenizer becomes the model's (`text_source`). Other heads are not taken: a stage's MLM,
MIM or DINO head belongs to that stage's objective.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import FlavaConfig, ImageEncoderConfig, TextEncoderConfig, from_dict, validate
from ..data.tokenizer import TOKENIZER_FILE
from ..errors import CheckpointError, ConfigError
from ..interop import text_towers, towers
from ..interop import transformers as hf
from ..io.checkpoint import checkpoint_dir, is_ours, read_config
from ..io.hubcache import snapshot
from ..io.runs import resolve
from ..loading import Checkpoint, read_checkpoint
from ..model.encoders import ImageEncoder
from ..model.flava import init_weights
from ..objectives.registry import OBJECTIVES

GROUPS = {
    "image": ("image_encoder.", "image_projection."),
    "text": ("text_encoder.", "text_projection."),
    "multimodal": ("multimodal_encoder.", "image_to_mm_projection.", "text_to_mm_projection."),
}
# The encoder each unimodal stage trains (the others stay as the stage started them).
_STAGE_TRAINS = {"text-mlm": "text", "image-mim": "image", "image-dino": "image"}


def stage_trains(stage: str | None) -> str | None:
    """The one encoder a unimodal stage trains (None: a joint stage trains every one)."""
    return _STAGE_TRAINS.get(stage)


# Where a DINO stage's checkpoint (its `dino` part) keeps the teacher's image encoder.
DINO_TEACHER = "teacher.backbone."


# A hub id without an owner: the hub's oldest towers keep such names (bert-base-uncased, roberta-base).
_OWNERLESS_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}$")


def resolve_source(src: str) -> Path:
    """A checkpoint, run or tower directory (or a file in a checkpoint), a hub id (with or without
    its owner), or a packaged tower's name (`minilm`)."""
    if src in text_towers.SHORTCUTS and not Path(src).exists():
        return text_towers.SHORTCUTS[src]()
    if Path(src).is_file():
        return checkpoint_dir(src)
    try:
        return resolve(src)
    except CheckpointError as e:
        # `resolve` takes owner/name alone for a hub id; a bare name that is no path may be one too.
        if Path(src).exists() or ".." in str(src) or not _OWNERLESS_HUB_ID.match(str(src)):
            raise
        local = e
    try:
        return snapshot(str(src))
    except CheckpointError as hub:
        raise CheckpointError(f"{local}; as a hub id: {hub}") from None


INIT_KEYS = ("init", "init_image", "init_text", "init_multimodal")
"""The settings that name a checkpoint a run starts from."""


def find_sources(cfg) -> None:
    """Each checkpoint a new run starts from (`init`, `init_*`) found, not read: a mistyped one is
    named before any work (a demo codebook trained first, then the run refused)."""
    if cfg.init_image_size and not cfg.init_image:  # it sizes init_image's tower; alone it would do nothing
        raise ConfigError(f"init_image_size={cfg.init_image_size} applies to init_image (the public image tower it "
                          "runs at that size); set init_image, or drop init_image_size")
    for key in INIT_KEYS:
        if getattr(cfg, key):
            try:
                path = resolve_source(getattr(cfg, key))
            except CheckpointError as e:  # the setting named: a run may name four checkpoints
                raise CheckpointError(f"{key}={getattr(cfg, key)}: {e}") from None
            if key != "init":  # a tower for another encoder, by its config alone (a BERT as init_image)
                _check_role(path, key.removeprefix("init_"))
    # What the sources' configs alone refuse, refused before the work a start does first (a demo codebook).
    if cfg.init_image:
        path = resolve_source(cfg.init_image)
        if towers.family_of(read_config(path)) is not None:
            check_channels(towers.read_tower(path, weights=False).image_config(cfg.model.image), path)
    if cfg.init_text:
        check_text_length(cfg.data.max_text_length, text_source(cfg.init_text).config.max_length, cfg.init_text)


def check_channels(image: ImageEncoderConfig, tower: Path) -> None:
    """Training and inference read images as RGB: a tower of other channels would be taken and fail
    at the first step, as the images' fault ("convert them to RGB")."""
    if image.num_channels != 3:
        raise ConfigError(f"the image tower {tower} takes {image.num_channels}-channel images (num_channels="
                          f"{image.num_channels} in its config.json), and flava reads images as RGB, 3 channels: "
                          "start from a 3-channel tower")


def check_text_length(asked: int, takes: int, init_text: str = "") -> None:
    """data.max_text_length must fit the text encoder's positions (fewer than 64 in a small tower)."""
    if takes < asked:
        whose = f"init_text={init_text}'s text encoder" if init_text else \
            "text encoder (model.text.max_position_embeddings less position_offset)"
        raise ConfigError(f"data.max_text_length ({asked}) exceeds the {takes} tokens the {whose} takes: add "
                          f"--set data.max_text_length={takes}")


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
        elif towers.family_of(data) is not None:
            raise CheckpointError(_image_tower_only(data))
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
            prefix = 1 + int(their_cfg.distillation_token)
            theirs[key] = towers.resize_pos_embed(theirs[key], ours_cfg.grid_size, prefix, their_cfg.pos_antialias)
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
        towers.check_fit(name, theirs, own, their_cfg, ours_cfg, ckpt.path)
    stage = (ckpt.extra.get("train") or {}).get("stage")
    if _STAGE_TRAINS.get(stage, name) != name:
        notes.append(f"beware: it was written by a {stage} stage, which does not train the {name} encoder")
    return theirs, notes


def _image_tower_only(data: dict) -> str:
    """Why a public image tower gives no other encoder than the image one."""
    if data.get("model_type") == "clip":  # a whole CLIPModel holds a text encoder too, which is no BERT
        return ("a CLIP model holds an image encoder and a causal text transformer, not one of the text towers "
                f"({', '.join(text_towers.FAMILIES)}); init_image takes its image encoder")
    return f"a {towers.family_of(data).name} checkpoint holds an image encoder only"


def _check_role(path: Path, name: str) -> None:
    """A public tower holds one encoder: refused for another by its config alone, before its
    weights (or a text tower's tokenizer) are read."""
    data = read_config(path)
    if towers.family_of(data) is not None and name != "image":
        raise CheckpointError(f"cannot initialise the {name} encoder from {path}: {_image_tower_only(data)}")
    if text_towers.is_text_tower_config(data) and name != "text":
        raise CheckpointError(f"cannot initialise the {name} encoder from {path}: a {data['model_type']} checkpoint "
                              f"holds a text encoder only")


def read_source(path: Path) -> Checkpoint | towers.Tower | text_towers.TowerCheckpoint:
    """One of our checkpoints, a transformers FLAVA, a public image tower or a BERT-family text
    tower; anything else is refused in one line naming what is taken."""
    data = read_config(path)
    if towers.family_of(data) is not None:
        return towers.read_tower(path)
    if text_towers.is_text_tower_config(data):
        return text_towers.read_tower(path)
    if data.get("format") != "flava" and not hf.is_hf_config(data):
        kind = f"a Hugging Face {data['model_type']} checkpoint" if data.get("model_type") else "no FLAVA checkpoint"
        raise CheckpointError(f"{path} is {kind}, which holds no encoder to take: give one of our checkpoints or run "
                              f"directories, a transformers FLAVA directory, for the image encoder a Hugging Face "
                              f"{towers.KINDS} checkpoint, or for the text encoder a BERT-family one "
                              f"({', '.join(text_towers.FAMILIES)})")
    return read_checkpoint(path)


def follow_image_tower(config: FlavaConfig, src: str, image_size: int = 0) -> FlavaConfig:
    """`config` with its image encoder following the public image tower `src` names (read without
    its weights); `config` itself when `src` names none. `image_size` (0: the tower's) is the side
    to run the tower at."""
    path = resolve_source(src)
    data = read_config(path)
    if towers.family_of(data) is None:
        if image_size:
            raise ConfigError(f"init_image_size applies to public image towers ({towers.KINDS}), and {src} is none; "
                              "drop init_image_size, or set model.image.image_size")
        return _follow_checkpoint(config, path, data)
    tower = towers.read_tower(path, weights=False)
    return _followed(config, tower, image_size)


def tower_image_model(config: FlavaConfig, src: str, image_size: int = 0) -> FlavaConfig:
    """`config` as `follow_image_tower` makes it (a public tower's image size sizes a codebook), or
    `config` itself where `src` is not there yet (a recipe's earlier stage, trained before this one)."""
    try:
        resolve_source(src)
    except CheckpointError:
        return config
    return follow_image_tower(config, src, image_size)


def _follow_checkpoint(config: FlavaConfig, path: Path, data: dict) -> FlavaConfig:
    """`config` reading images as the image encoder of one of our checkpoints (or a transformers
    FLAVA) was trained to: its pixel statistics, and the antialiased position resize of a DINOv2
    tower it came from. No weight shows these; the same weights under other statistics compute
    other features."""
    from ..data.processor import Processor

    if not (is_ours(data) or hf.is_hf_config(data)):
        return config  # not an image encoder's checkpoint: read_source refuses it by name
    processor = Processor.from_directory(path)
    image = dataclasses.replace(config.image, image_mean=list(processor.image_mean),
                                image_std=list(processor.image_std))
    antialias = ((data.get("model") or {}).get("image") or {}).get("pos_antialias")
    if isinstance(antialias, bool):
        image = dataclasses.replace(image, pos_antialias=antialias)
    return validate(dataclasses.replace(config, image=image))


def _followed(config: FlavaConfig, tower: towers.Tower, image_size: int) -> FlavaConfig:
    image = tower.image_config(config.image, image_size)
    check_channels(image, tower.path)
    try:
        return validate(dataclasses.replace(config, image=image))
    except ConfigError as e:
        raise ConfigError(f"the image tower {tower.path} does not fit this model: {e}") from None


def _tower_state(model, tower: towers.Tower, image_size: int) -> tuple[ImageEncoderConfig, dict, list[str]]:
    """The image config the tower asks for, the weights to copy (in the model's names, CLIP's
    visual_projection as image_projection when it fits) and notes; checked against an encoder of
    that config before anything changes."""
    image = _followed(model.config, tower, image_size).image
    with torch.device("meta"):  # shapes only
        shapes = ImageEncoder(image).state_dict()
    sd, notes = towers.tower_image_state(tower, image, shapes)
    updates = {"image_encoder." + k: v for k, v in sd.items()}
    if tower.projection is not None:
        want = (model.config.projection_dim, image.hidden_size)
        if tuple(tower.projection.shape) == want:
            updates["image_projection.weight"] = tower.projection
            updates["image_projection.bias"] = torch.zeros(want[0], dtype=tower.projection.dtype)
            notes.append("image_projection from its visual_projection (with a zero bias)")
        else:
            notes.append(f"its visual_projection ({' x '.join(map(str, tower.projection.shape))}) does not fit "
                         f"projection_dim {want[0]}: image_projection is not taken from it")
    return image, updates, [tower.describe(image)] + notes


def _refit_image(pretraining_model, image: ImageEncoderConfig) -> list[str]:
    """Make the model's image encoder one of config `image` (see FlavaModel.replace_image_encoder),
    the MIM head too when it reads another width; returns what starts fresh."""
    model = pretraining_model.model
    old = model.config.image
    fresh = [n for n in model.replace_image_encoder(image) if n != "image_encoder"]
    pretraining_model.config = model.config
    heads = getattr(pretraining_model, "heads", None)
    reads = ("hidden_size", "activation", "layer_norm_eps")
    if heads is not None and hasattr(heads, "mim") and any(getattr(old, f) != getattr(image, f) for f in reads):
        mim = next(r for r in OBJECTIVES if r.name == "mim")
        head = mim.head(model.config).to(model.device)
        init_weights(head, model.config.init_std)
        heads.mim = head
        fresh.append("the MIM head")
    return fresh


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


def initialise_encoders(pretraining_model, image: str = "", text: str = "", multimodal: str = "",
                        image_size: int = 0) -> dict[str, str]:
    """Replace the named encoders' weights (in place) by those of the given checkpoints.

    Each source is one of our checkpoints (checkpoints/step_N, or a run directory whose
    checkpoints/latest.json points to one), a transformers FLAVA directory, or a hub id; for the
    image encoder also a public image tower (a transformers ViT, DeiT, DINOv2 or CLIP directory),
    which the model's image config then follows (`image_size`: the side to run it at; 0, the
    tower's own); for the text encoder also a BERT-family one (`minilm`: the packaged MiniLM),
    whose settings the model must have (`text_source`; the pretraining stage builds its model so).
    Every source is read and checked before any weight changes. Returns, per initialised encoder,
    what was loaded from where (for the log).
    """
    model = pretraining_model.model
    wanted = {name: src for name, src in (("image", image), ("text", text), ("multimodal", multimodal)) if src}
    read: dict[Path, Checkpoint | towers.Tower | text_towers.TowerCheckpoint] = {}
    updates: dict[str, torch.Tensor] = {}
    head_updates: dict[str, torch.Tensor] = {}
    described, tower_image = {}, None
    for name, src in wanted.items():
        path = resolve_source(src)
        _check_role(path, name)
        if path not in read:
            read[path] = read_source(path)
        ckpt = read[path]
        if isinstance(ckpt, towers.Tower):
            tower_image, sd, notes = _tower_state(model, ckpt, image_size)
            updates.update(sd)
            what = f"image encoder from the {ckpt.family.name} checkpoint {path}"
        elif isinstance(ckpt, text_towers.TowerCheckpoint):
            sd, head_sd, what = _tower_text(pretraining_model, ckpt)
            updates.update(sd)
            head_updates.update(head_sd)
            notes = []
        else:
            if name == "image" and image_size:
                raise ConfigError(f"init_image_size applies to public image towers ({towers.KINDS}), and {path} is "
                                  "none; drop init_image_size, or set model.image.image_size")
            sd, notes = _group_state(model.state_dict(), model.config, ckpt, name)
            updates.update(sd)
            kind = "flava checkpoint" if ckpt.source == "flava" else "transformers FLAVA checkpoint"
            what = f"{name} encoder and {', '.join(p.rstrip('.') for p in GROUPS[name][1:])} from the {kind} {path}"
        described[name] = (what, notes)
    if tower_image is not None:
        fresh = _refit_image(pretraining_model, tower_image)
        mm_proj = [k for k in updates if k.startswith("image_to_mm_projection.")]
        if "image_to_mm_projection" in fresh and mm_proj:  # the multimodal source's is for the old width
            for k in mm_proj:
                del updates[k]
            described["multimodal"][1].append("its image_to_mm_projection is not taken: the image tower's width "
                                              "differs")
        taken = "image_projection.weight" in updates  # CLIP's visual_projection
        described["image"][1].append("not from it: the pooler" + ("" if taken else ", image_projection"))
        fresh = [n for n in fresh if not (n == "image_projection" and taken)]
        if fresh:
            described["image"][1].append(f"made fresh for its width {tower_image.hidden_size}: {', '.join(fresh)}")
    own = model.state_dict()
    heads = pretraining_model.heads.state_dict() if head_updates else {}
    with torch.no_grad():
        for key, value in updates.items():
            own[key].copy_(value)
        for key, value in head_updates.items():
            heads[key].copy_(value)
    return {name: what + (f" ({'; '.join(notes)})" if notes else "") for name, (what, notes) in described.items()}


def initialise_image_encoder(encoder: ImageEncoder, model_config, src: str) -> str:
    """Replace a bare image encoder's weights (in place) by those of `src`: a public image tower
    (e.g. facebook/dino-vitb16; the encoder's config must follow it already: `follow_image_tower`)
    or one of our checkpoints (its image encoder; a DINO stage's teacher encoder). `model_config`
    is the FlavaConfig the encoder belongs to. Returns what was loaded from where (for the log)."""
    path = resolve_source(src)
    own = encoder.state_dict()
    source = read_source(path)
    if isinstance(source, towers.Tower):
        sd, notes = towers.tower_image_state(source, encoder.cfg, own)
        notes = [source.describe(encoder.cfg)] + notes
        what = f"image encoder from the {source.family.name} checkpoint {path}"
    else:
        prefixed, notes = _group_state({"image_encoder." + k: v for k, v in own.items()}, model_config, source,
                                       "image", ("image_encoder.",))
        sd = {k.removeprefix("image_encoder."): v for k, v in prefixed.items()}
        kind = "flava" if source.source == "flava" else "transformers FLAVA"
        what = f"image encoder from the {kind} checkpoint {path}"
    with torch.no_grad():
        for key, value in sd.items():
            own[key].copy_(value)
    return what + (f" ({'; '.join(notes)})" if notes else "")
