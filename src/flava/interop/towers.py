"""Public image towers from transformers checkpoints as FLAVA's image encoder: ViT, DeiT, DINOv2
(with or without registers) and CLIP vision (a `CLIPVisionModel`, or the vision half of a
`CLIPModel`).

Each is FLAVA's pre-norm ViT plus at most a few parts `ImageEncoder` carries when its config
asks (`ImageEncoderConfig`): DeiT's distillation token after CLS (its position table has two
special slots); DINOv2's LayerScale (`lambda1` of each block's two branches), a MLP sized by
`mlp_ratio`, eps 1e-6 and register tokens without positions (`Dinov2WithRegisters`); CLIP's
class embedding, bias-free patch projection, `pre_layrnorm` over the embeddings, quick_gelu and
`post_layernorm`, which CLIP applies to the pooled CLS only: it is our final `norm`, so our
`pre_norm_hidden_state` is CLIP's `last_hidden_state` and our normed CLS its `pooler_output`.
DINOv2's SwiGLU MLP (the giant size) is refused.

The tower decides the image encoder's architecture, its image size (its processor's crop size,
else its config's) and the pixel statistics (its preprocessor_config.json, else the defaults of
the image processor transformers pairs with it). What is not loaded: poolers (FLAVA never reads
the image pooler), classifiers, decoders, CLIP's text tower; CLIP's `visual_projection` is
offered to the caller (`Tower.projection`).

Position tables are re-gridded as the family's `interpolate_pos_encoding` does (bicubic; DINOv2
with registers antialiased), so a tower loaded for another image size computes what the
transformers model computes on images of that size with `interpolate_pos_encoding`.
Weights are read under the names transformers writes (`attention.attention.query`, ...) and
under the names its models use in memory (`attention.q_proj`, `layers.N`, ...).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import CLIP_MEAN, CLIP_STD, ImageEncoderConfig
from ..errors import CheckpointError, InputError
from ..io.checkpoint import CONFIG, read_config, read_weights
from ..io.files import read_json
from ..model.encoders import ImageEncoder, resize_position_table
from . import transformers as hf

PREPROCESSOR = "preprocessor_config.json"
_HALF = (0.5, 0.5, 0.5)
_VIT = dict(hf._HF_TRANSFORMER_DEFAULTS, image_size=224, patch_size=16, num_channels=3)
_DINOV2 = dict(_VIT, layer_norm_eps=1e-6, patch_size=14, mlp_ratio=4.0, use_swiglu_ffn=False, drop_path_rate=0.0)
_CLIP = dict(_VIT, hidden_act="quick_gelu", layer_norm_eps=1e-5, patch_size=32, attention_dropout=0.0)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    wrappers: tuple[str, ...]
    """Prefixes of the encoder's weights in the models that hold one (ViTForImageClassification: `vit.`)."""
    defaults: dict[str, Any]
    """transformers' config defaults, which config.json files of older versions leave out."""
    processor: str
    """The image processor transformers pairs with it: its defaults apply without a preprocessor_config.json."""
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pos_antialias: bool = False
    """Whether its `interpolate_pos_encoding` resizes with antialiasing."""


FAMILIES = (
    Family("ViT", ("vit",), ("vit.",), _VIT, "ViTImageProcessor", _HALF, _HALF),
    Family("DeiT", ("deit",), ("deit.",), _VIT, "DeiTImageProcessor", _HALF, _HALF),
    Family("DINOv2", ("dinov2",), ("dinov2.",), _DINOV2, "BitImageProcessor", CLIP_MEAN, CLIP_STD),
    Family("DINOv2 with registers", ("dinov2_with_registers",), ("dinov2_with_registers.",),
           dict(_DINOV2, patch_size=16, num_register_tokens=4), "BitImageProcessor", CLIP_MEAN, CLIP_STD,
           pos_antialias=True),
    Family("CLIP", ("clip", "clip_vision_model"), ("vision_model.",), _CLIP, "CLIPImageProcessor", CLIP_MEAN,
           CLIP_STD),
)
KINDS = "ViT, DeiT, DINOv2 (with or without registers) or CLIP vision"


def family_of(data: dict[str, Any]) -> Family | None:
    """The tower family of a transformers config.json dict, or None."""
    return next((f for f in FAMILIES if data.get("model_type") in f.model_types), None)


# --------------------------------------------------------------------------- configs


def _vision_section(data: dict[str, Any]) -> dict[str, Any]:
    """The image tower's part of a config: a CLIPModel's vision_config, else the whole."""
    if data.get("model_type") != "clip":
        return data
    return data.get("vision_config") or data.get("vision_config_dict") or {}


def image_config(family: Family, data: dict[str, Any]) -> ImageEncoderConfig:
    """The ImageEncoderConfig of a tower's config.json as it is (its position table's image size,
    FLAVA's pixel statistics: `Tower.image_config` applies the processor's)."""
    section = _vision_section(data)
    d = dict(family.defaults)
    d.update({k: v for k, v in section.items() if v is not None})
    where = f"{family.name} config"
    if d.get("use_swiglu_ffn"):
        raise CheckpointError(f"{where}: use_swiglu_ffn is true (DINOv2 giant's SwiGLU MLP), which this image "
                              "encoder does not have; choose a DINOv2 of another size")
    try:
        if "mlp_ratio" in family.defaults:
            d["intermediate_size"] = int(int(d["hidden_size"]) * float(d["mlp_ratio"]))
        if "attention_dropout" in family.defaults:  # CLIP's names
            d.update(attention_probs_dropout_prob=d["attention_dropout"], hidden_dropout_prob=0.0, qkv_bias=True)
        fields = hf._transformer_fields(d, where)
        head_dim = d.get("head_dim")
        if head_dim is not None and int(head_dim) * fields["num_heads"] != fields["hidden_size"]:
            raise CheckpointError(f"{where}: head_dim {head_dim} x {fields['num_heads']} heads differs from "
                                  f"hidden_size {fields['hidden_size']}; such attention is not supported")
        return ImageEncoderConfig(
            **fields, image_size=hf._square("image_size", d["image_size"]),
            patch_size=hf._square("patch_size", d["patch_size"]), num_channels=int(d["num_channels"]),
            distillation_token=family.name == "DeiT", register_tokens=int(d.get("num_register_tokens", 0)),
            layer_scale=family.name.startswith("DINOv2"), embed_norm=family.name == "CLIP",
            patch_bias=family.name != "CLIP", pos_antialias=family.pos_antialias)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: not usable ({type(e).__name__}: {e})") from None


@dataclass
class Preprocessing:
    """What a tower's image processor does that the model must match."""

    image_size: int | None
    """Its crop size (else its resize size); None without a preprocessor_config.json."""
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    """Where they come from, for the start-up line."""


def _side(value: Any) -> int | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, dict):
        h, w = value.get("height"), value.get("width")
        if h is not None and h == w:
            return int(h)
        if value.get("shortest_edge") is not None:
            return int(value["shortest_edge"])
    return None


def read_preprocessing(path: Path, family: Family) -> Preprocessing:
    """The tower's preprocessor_config.json, else its family's processor defaults."""
    file = path / PREPROCESSOR
    if not file.is_file():
        return Preprocessing(None, family.mean, family.std, f"{family.processor}'s defaults (no {PREPROCESSOR})")
    data = read_json(file, "image processor config", CheckpointError, expect=dict)
    mean, std = data.get("image_mean", family.mean), data.get("image_std", family.std)
    if not data.get("do_normalize", True):
        mean, std = (0.0,) * len(family.mean), (1.0,) * len(family.std)
    try:
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    except (TypeError, ValueError):
        raise CheckpointError(f"{file}: image_mean / image_std are not lists of numbers") from None
    size = _side(data.get("crop_size")) if data.get("do_center_crop", True) else None
    return Preprocessing(size or _side(data.get("size")), mean, std, f"its {PREPROCESSOR}")


# --------------------------------------------------------------------------- weight names

_LAYER = re.compile(r"(?:encoder\.layer|encoder\.layers|layers)\.(?P<i>\d+)\.(?P<rest>.+)")
_QKV = re.compile(r"(?:attention\.attention|attention|self_attn)\.(?P<w>query|key|value|q_proj|k_proj|v_proj)"
                  r"\.(?P<p>weight|bias)")
_BLOCK = [(re.compile(a + r"\.(?P<p>weight|bias)"), b) for a, b in (
    (r"(?:layernorm_before|norm1|layer_norm1)", "norm1"),
    (r"(?:layernorm_after|norm2|layer_norm2)", "norm2"),
    (r"(?:attention\.output\.dense|attention\.o_proj|self_attn\.out_proj)", "attn.proj"),
    (r"(?:intermediate\.dense|mlp\.fc1)", "mlp.fc1"),
    (r"(?:output\.dense|mlp\.fc2)", "mlp.fc2"),
)]
_LAYER_SCALE = {"layer_scale1.lambda1": "ls1", "layer_scale2.lambda1": "ls2"}
_EMBEDDINGS = {
    "embeddings.cls_token": "cls_token", "embeddings.class_embedding": "cls_token",
    "embeddings.distillation_token": "dist_token", "embeddings.register_tokens": "register_tokens",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed", "embeddings.position_embedding.weight": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.bias",
    "embeddings.patch_embedding.weight": "patch_embed.weight",
    "pre_layrnorm.weight": "embed_norm.weight", "pre_layrnorm.bias": "embed_norm.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
    "post_layernorm.weight": "norm.weight", "post_layernorm.bias": "norm.bias",
}
_IGNORED = re.compile(r"embeddings\.position_ids")  # a buffer some versions saved
_DROPPED = re.compile(r"(pooler|classifier|cls_classifier|distillation_classifier|decoder|text_model|"
                      r"text_projection)\..*|logit_scale")
PROJECTION = "visual_projection.weight"
_QKV_ORDER = {"query": 0, "q_proj": 0, "key": 1, "k_proj": 1, "value": 2, "v_proj": 2}


def _our_name(k: str, qkv: dict) -> str | None:
    m = _LAYER.fullmatch(k)
    if m is None:
        return _EMBEDDINGS.get(k)
    i, rest = m["i"], m["rest"]
    if (q := _QKV.fullmatch(rest)) is not None:
        qkv.setdefault((i, q["p"]), {})[_QKV_ORDER[q["w"]]] = k
        return ""
    if rest in _LAYER_SCALE:
        return f"transformer.blocks.{i}.{_LAYER_SCALE[rest]}"
    for pattern, ours in _BLOCK:
        if (b := pattern.fullmatch(rest)) is not None:
            return f"transformer.blocks.{i}.{ours}.{b['p']}"
    return None


def state_dict_from_tower(family: Family, tensors: dict[str, torch.Tensor], origin: Path | str
                          ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, list[str]]:
    """Our ImageEncoder's state dict from a tower's tensors; also CLIP's visual_projection (or
    None) and the keys not loaded."""
    sd, dropped, unknown, qkv, projection = {}, [], [], {}, None
    bare: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        k = next((key[len(w):] for w in family.wrappers if key.startswith(w)), key)
        if k == PROJECTION:
            projection = value
        elif _DROPPED.fullmatch(k):
            dropped.append(k)
        elif not _IGNORED.fullmatch(k):
            bare[k] = value
            ours = _our_name(k, qkv)
            if ours is None:
                unknown.append(key)
            elif ours:
                sd[ours] = value
    if unknown:
        raise CheckpointError(f"{origin} holds {len(unknown)} weight(s) that are not part of a {family.name} image "
                              f"encoder, e.g. {unknown[0]!r}")
    for (i, p), parts in qkv.items():
        if len(parts) != 3:
            raise CheckpointError(f"{origin}: layer {i} lacks one of its query/key/value {p}s")
        sd[f"transformer.blocks.{i}.attn.qkv.{p}"] = torch.cat([bare[parts[j]] for j in range(3)], dim=0)
    d = sd["cls_token"].shape[-1] if "cls_token" in sd else None
    for name in ("cls_token", "mask_token", "pos_embed"):  # CLIP's and DINOv2's are flatter than ours
        if name in sd and sd[name].dim() < 3:
            sd[name] = sd[name].reshape(1, -1, d)
    return sd, projection, dropped


# --------------------------------------------------------------------------- reading and fitting


@dataclass
class Tower:
    path: Path
    family: Family
    config: ImageEncoderConfig
    """As the checkpoint is: its position table's image size, FLAVA's pixel statistics."""
    state_dict: dict[str, torch.Tensor]
    """In our ImageEncoder's names; `mask_token` only when the checkpoint has one."""
    preprocessing: Preprocessing
    projection: torch.Tensor | None = None
    """CLIP's visual_projection weight [P, D] (no bias), when the checkpoint has one."""
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What the checkpoint's config asks that is not taken (e.g. stochastic depth)."""

    def image_config(self, base: ImageEncoderConfig, image_size: int = 0) -> ImageEncoderConfig:
        """`base` with what the tower decides taken from it: the architecture, the image size
        (`image_size`, else its processor's crop size, else its config's) and the pixel statistics.
        Dropout, the mask token and the image-token vocabulary stay `base`'s."""
        c = self.config
        return dataclasses.replace(
            c, image_size=image_size or self.preprocessing.image_size or c.image_size,
            image_mean=list(self.preprocessing.mean), image_std=list(self.preprocessing.std),
            **{k: getattr(base, k) for k in KEPT})

    def describe(self, cfg: ImageEncoderConfig) -> str:
        """What the image config took from the tower, in a few words."""
        extras = [n for n, on in (("a distillation token", cfg.distillation_token),
                                  (f"{cfg.register_tokens} register tokens", cfg.register_tokens),
                                  ("LayerScale", cfg.layer_scale), ("a LayerNorm before the blocks", cfg.embed_norm),
                                  ("no patch bias", not cfg.patch_bias)) if on]
        stats = "/".join("(" + ", ".join(f"{v:.4g}" for v in s) + ")" for s in (cfg.image_mean, cfg.image_std))
        return (f"its config taken: {cfg.num_layers} layer{'s' * (cfg.num_layers != 1)}, width {cfg.hidden_size}, {cfg.num_heads} heads, MLP "
                f"{cfg.mlp_size}, {cfg.activation}, eps {cfg.layer_norm_eps:g}, patch {cfg.patch_size}, "
                f"{cfg.image_size} px" + "".join(f", {e}" for e in extras)
                + f"; pixel mean/std {stats} from {self.preprocessing.source}")


KEPT = ("dropout", "attention_dropout", "use_mask_token", "vocab_size")
"""The image settings a model keeps of its own when its image encoder comes from a tower."""


def is_tower(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / CONFIG).is_file() and family_of(read_config(path)) is not None


def read_tower(path: str | os.PathLike, weights: bool = True) -> Tower:
    """A transformers ViT, DeiT, DINOv2 or CLIP checkpoint directory, in our names (`weights`
    false: its configs alone, the state dict empty)."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise CheckpointError(f"{path} is not an image tower checkpoint: it has no {CONFIG}")
    data = read_config(path)
    family = family_of(data)
    if family is None:
        raise CheckpointError(f"{path} is a {data.get('model_type') or 'model'} checkpoint, not an image tower: "
                              f"choose a Hugging Face {KINDS} checkpoint")
    try:
        config = image_config(family, data)
    except CheckpointError as e:
        raise CheckpointError(f"{path / CONFIG}: {e}") from None
    sd, projection, dropped = state_dict_from_tower(family, read_weights(path), path) if weights else ({}, None, [])
    section = _vision_section(data)
    notes = [f"its drop_path_rate {section['drop_path_rate']} is not taken (no stochastic depth here)"
             ] if section.get("drop_path_rate") else []
    return Tower(path, family, config, sd, read_preprocessing(path, family), projection, dropped, notes)


# Fields that change what an encoder computes (dropout only changes training).
ARCHITECTURE_FIELDS = ("hidden_size", "num_layers", "num_heads", "mlp_size", "activation", "layer_norm_eps",
                       "qkv_bias")
IMAGE_ARCHITECTURE_FIELDS = ARCHITECTURE_FIELDS + ("patch_size", "num_channels", "distillation_token",
                                                   "register_tokens", "layer_scale", "embed_norm", "patch_bias")


def check_fit(what: str, theirs: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
              their_cfg, our_cfg, origin: Path | str, tower: bool = False) -> None:
    """CheckpointError naming the first weight that is missing, unexpected or of another shape,
    and the first setting that differs (some, e.g. num_heads or the activation, change no shape).
    `tower`: the encoder was built from the source's own config.json, so weights that do not fit
    it are that config and its weights disagreeing, which no setting here can fix."""
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
    if tower and problem and not setting:
        raise CheckpointError(f"cannot initialise the {what} encoder from {origin}: its config.json does not match its "
                              f"weights ({problem}); the files come from different models or were damaged: download "
                              f"the tower again")
    if problem or setting:
        fix = f"; set model.{what}.{setting[0]}={setting[1]!r} or choose a matching checkpoint" if setting else ""
        raise CheckpointError(f"cannot initialise the {what} encoder from {origin}: "
                              + (f"{problem} ({hint})" if problem and hint else problem or hint) + fix)


def resize_pos_embed(pos_embed: torch.Tensor, grid: int, prefix: int = 1, antialias: bool = False) -> torch.Tensor:
    """A checkpoint's position table re-gridded to grid x grid patches."""
    try:
        return resize_position_table(pos_embed, grid, grid, prefix, antialias)
    except InputError as e:
        raise CheckpointError(str(e)) from None


def tower_image_state(tower: Tower, ours: ImageEncoderConfig, own: dict[str, torch.Tensor]
                      ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors to copy into an image encoder whose state dict is `own`, and notes on what
    differs. Raises CheckpointError when the tower does not fit `ours`."""
    sd = dict(tower.state_dict)
    theirs, notes = tower.config, list(tower.notes)
    if theirs.grid_size != ours.grid_size and "pos_embed" in sd and ours.patch_size == theirs.patch_size:
        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], ours.grid_size, 1 + int(theirs.distillation_token),
                                           tower.family.pos_antialias)
        notes.append(f"position embeddings resized from {theirs.grid_size}x{theirs.grid_size} to "
                     f"{ours.grid_size}x{ours.grid_size} patches")
    if "mask_token" in sd and "mask_token" not in own:
        del sd["mask_token"]
        notes.append("its mask token is dropped (use_mask_token is false)")
    fresh = [k for k in own if k not in sd and (k == "mask_token" or k.startswith("pooler."))]
    check_fit("image", sd, {k: v for k, v in own.items() if k not in fresh}, theirs, ours, tower.path, tower=True)
    if "mask_token" in fresh:
        notes.append(f"the {tower.family.name} has no mask token: ours keeps its fresh initialisation")
    if tower.dropped:
        notes.append(f"its {', '.join(sorted({k.split('.')[0] for k in tower.dropped}))} not loaded")
    return sd, notes


def load_tower(encoder: ImageEncoder, path: str | os.PathLike, tower: Tower | None = None) -> list[str]:
    """Fill an `ImageEncoder` from a public image tower directory (its config must fit); returns
    notes on what differs. The pooler is not loaded, and without a mask token in the checkpoint
    ours keeps its fresh initialisation; everything else is replaced."""
    tower = tower or read_tower(path)
    own = encoder.state_dict()
    sd, notes = tower_image_state(tower, encoder.cfg, own)
    with torch.no_grad():
        for key, value in sd.items():
            own[key].copy_(value)
    return notes
