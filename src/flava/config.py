"""Model configs: dataclasses with a docstring per field, presets, JSON load/save, overrides.

A config is read strictly: an unknown key is an error that names it (and the nearest known
key), and a value of the wrong type is an error that names the field.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import math
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from .errors import ConfigError, did_you_mean
from .io.files import read_json


@dataclass(frozen=True)
class Range:
    """Bounds of a number field, checked when a config is read: `Annotated[float, Range(0, 1)]`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    """The low bound itself is not allowed."""
    high_open: bool = False

    def check(self, path: str, value: float) -> None:
        ok = not (isinstance(value, float) and math.isnan(value))
        if ok and self.low is not None:
            ok = value > self.low if self.low_open else value >= self.low
        if ok and self.high is not None:
            ok = value < self.high if self.high_open else value <= self.high
        if not ok:
            raise ConfigError(f"{path} must lie in {self}; got {value!r}")

    def __str__(self) -> str:
        low = "(-inf" if self.low is None else f"{'(' if self.low_open else '['}{self.low:g}"
        high = "inf)" if self.high is None else f"{self.high:g}{')' if self.high_open else ']'}"
        return f"{low}, {high}"


PositiveInt = Annotated[int, Range(1)]
NonNegativeInt = Annotated[int, Range(0)]
NonNegative = Annotated[float, Range(0)]
Positive = Annotated[float, Range(0, low_open=True)]
Probability = Annotated[float, Range(0, 1)]
Activation = Literal["gelu", "gelu_tanh", "relu", "silu", "quick_gelu"]


@dataclass
class TransformerConfig:
    """Fields shared by the three encoders (pre-norm transformer blocks)."""

    hidden_size: PositiveInt = 768
    """Width of the residual stream."""
    num_layers: NonNegativeInt = 12
    """Number of transformer blocks."""
    num_heads: PositiveInt = 12
    """Attention heads; must divide `hidden_size`."""
    mlp_size: PositiveInt = 3072
    """Hidden width of each block's MLP."""
    activation: Activation = "gelu"
    """MLP activation: gelu (exact), gelu_tanh, relu, silu or quick_gelu."""
    layer_norm_eps: Positive = 1e-12
    """Epsilon of every LayerNorm in the encoder."""
    qkv_bias: bool = True
    """Whether the query/key/value projections have a bias."""
    dropout: Probability = 0.0
    """Dropout after the attention output and MLP projections (and on embeddings)."""
    attention_dropout: Probability = 0.0
    """Dropout on attention probabilities."""


@dataclass
class ImageEncoderConfig(TransformerConfig):
    """ViT image encoder."""

    image_size: PositiveInt = 224
    """Side of the square input image, in pixels."""
    patch_size: PositiveInt = 16
    """Side of a square patch, in pixels; a remainder of `image_size` is cropped away."""
    num_channels: PositiveInt = 3
    """Input channels."""
    use_mask_token: bool = True
    """Learn a mask token that replaces masked patch embeddings (needed for MIM/MMM)."""
    vocab_size: PositiveInt = 8192
    """Number of image tokens (the dVAE codebook size) the masked-image heads predict."""

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


@dataclass
class TextEncoderConfig(TransformerConfig):
    """BERT-style text encoder."""

    vocab_size: PositiveInt = 30522
    """WordPiece vocabulary size (BERT uncased: 30,522)."""
    max_position_embeddings: PositiveInt = 512
    """Longest text, in tokens, including [CLS] and [SEP]."""
    type_vocab_size: PositiveInt = 2
    """Number of token types (segments)."""
    pad_token_id: NonNegativeInt = 0
    """Id of the [PAD] token."""


@dataclass
class MultimodalEncoderConfig(TransformerConfig):
    """Multimodal encoder over [CLS_M | image tokens | text tokens]."""

    num_layers: NonNegativeInt = 6
    """Number of transformer blocks."""
    use_cls_token: bool = True
    """Prepend a learned CLS_M token (its output feeds ITM and multimodal tasks)."""


@dataclass
class CodebookConfig:
    """DALL-E dVAE encoder that turns an image into a grid of discrete tokens (8x downsampling)."""

    hidden_size: PositiveInt = 256
    """Width of the first group; the groups are 1x, 2x, 4x and 8x this."""
    num_blocks_per_group: PositiveInt = 2
    """Residual blocks in each of the four groups."""
    num_groups: PositiveInt = 4
    """Counted into the residual gain 1/(num_groups * num_blocks_per_group)^2; the network always
    has DALL-E's four groups."""
    vocab_size: PositiveInt = 8192
    """Number of discrete image tokens."""
    input_channels: PositiveInt = 3
    """Input channels."""


@dataclass
class FlavaConfig:
    """The whole FLAVA model."""

    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    """Image encoder."""
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    """Text encoder."""
    multimodal: MultimodalEncoderConfig = field(default_factory=MultimodalEncoderConfig)
    """Multimodal encoder."""
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    """Image codebook (dVAE) giving MIM/MMM targets."""
    projection_dim: PositiveInt = 768
    """Size of the contrastive embeddings."""
    logit_scale_init: float = 2.6592
    """Initial contrastive logit scale, ln(1/0.07)."""
    init_std: NonNegative = 0.02
    """Standard deviation of the (truncated) normal weight initialisation."""

    @property
    def codebook_image_size(self) -> int:
        """Input side of the codebook so its 8x-downsampled grid matches the patch grid."""
        return self.image.grid_size * 8


@dataclass
class ObjectivesConfig:
    """Which pretraining losses run, how much each counts, and how their inputs are made."""

    global_contrastive_weight: NonNegative = 1.0
    """Image-text InfoNCE over the global batch (pairs). 0 skips it."""
    itm_weight: NonNegative = 1.0
    """Image-text matching on CLS_M (pairs). 0 skips it."""
    mmm_image_weight: NonNegative = 1.0
    """Masked image tokens predicted from the multimodal encoder (pairs). 0 skips it."""
    mmm_text_weight: NonNegative = 1.0
    """Masked text tokens predicted from the multimodal encoder (pairs). 0 skips it."""
    mim_weight: NonNegative = 1.0
    """Masked image tokens predicted from the image encoder (images). 0 skips it."""
    mlm_weight: NonNegative = 1.0
    """Masked text tokens predicted from the text encoder (text). 0 skips it."""
    contrastive: Literal["softmax", "sigmoid"] = "softmax"
    """The image-text loss: 'softmax', FLAVA's (and CLIP's) InfoNCE with a learned temperature;
    'sigmoid', SigLIP's pairwise sigmoid loss with its own learned temperature and bias. Either
    is weighted by `global_contrastive_weight` and runs over the global batch."""
    gather_with_grad: bool = True
    """Contrastive features are gathered from every process with gradient (FLAVA's global
    contrastive loss); false: gathered without, so each process's loss back-propagates to its own
    features only (the 'local' contrastive loss of OpenCLIP, the paper's Table C.1 column 3)."""
    itm_negatives: Literal["swap", "hard"] = "swap"
    """'swap': the original recipe, a pair's caption replaced by another one with probability
    `itm_negative_probability`; 'hard': ALBEF-style, one negative text per image and one
    negative image per text drawn by contrastive similarity over the global batch."""
    itm_negative_probability: Probability = 0.1
    """Share of pairs turned into negatives by the 'swap' recipe."""
    image_mask_ratio: Probability = 75 / 196
    """Share of patches block-masked for MIM/MMM (the paper: 75 of 196)."""
    text_mask_probability: Probability = 0.15
    """Share of text tokens chosen for MLM/MMM."""
    whole_word_masking: bool = False
    """Choose whole words (all their WordPieces) rather than single pieces."""
    # Balancing the objectives (train/balancing/; README "Balancing the objectives").
    balancing: Literal["fixed", "uncertainty", "dwa", "pcgrad"] = "fixed"
    """How the weighted losses combine: 'fixed' (their sum, the paper's); 'uncertainty' (each
    scaled by exp(-s) with a learned log-variance s, Kendall et al. 2018); 'dwa' (dynamic weight
    average by each loss's rate of descent, Liu et al. 2019); 'pcgrad' (the sum, with each
    objective's gradient on the shared encoders projected off those it conflicts with, Yu et al.
    2020). A step trains one data kind, so a step's objectives are that kind's."""
    dwa_temperature: Positive = 2.0
    """DWA's temperature T: larger evens the weights out (the paper's 2)."""
    dwa_window: PositiveInt = 50
    """Steps over which DWA averages each loss (the paper's "epoch"); weights change at each
    window's end and stay 1 for the first two windows."""
    uncertainty_lr: Positive = 0.01
    """Adam's learning rate for the log-variances of 'uncertainty' (their own, constant)."""


# --------------------------------------------------------------------------- presets


def _preset_tiny() -> FlavaConfig:
    enc = dict(hidden_size=128, num_heads=4, mlp_size=512)
    return FlavaConfig(
        image=ImageEncoderConfig(**enc, num_layers=2, image_size=64, patch_size=8, vocab_size=512),
        text=TextEncoderConfig(**enc, num_layers=2, max_position_embeddings=64),
        multimodal=MultimodalEncoderConfig(**enc, num_layers=1),
        codebook=CodebookConfig(hidden_size=32, num_blocks_per_group=1, vocab_size=512),
        projection_dim=128,
    )


def _preset_small() -> FlavaConfig:
    enc = dict(hidden_size=384, num_heads=6, mlp_size=1536)
    return FlavaConfig(
        image=ImageEncoderConfig(**enc, num_layers=6),
        text=TextEncoderConfig(**enc, num_layers=6),
        multimodal=MultimodalEncoderConfig(**enc, num_layers=3),
        codebook=CodebookConfig(hidden_size=64),
        projection_dim=384,
    )


def _preset_base() -> FlavaConfig:
    # Paper Table A.1: ViT-B/16 image and text encoders, 6-layer multimodal encoder.
    return FlavaConfig()


PRESETS = {"tiny": _preset_tiny, "small": _preset_small, "base": _preset_base}


def preset(name: str) -> FlavaConfig:
    """A fresh copy of a named preset: tiny (tests, CPU demo), small, base (the paper's)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


# --------------------------------------------------------------------------- (de)serialisation


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _describe(typing.get_args(tp)[0])
    if origin is list:
        return f"a list of {_describe((typing.get_args(tp) or (Any,))[0])}s"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def check_value(path: str, value: Any, tp: Any) -> Any:
    """`value` checked against the field type `tp` (and converted where JSON is looser: an integer
    for a float); a ConfigError naming `path` when it does not fit."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *extras = typing.get_args(tp)
        value = check_value(path, value, base)
        for extra in extras:
            if isinstance(extra, Range):
                extra.check(path, value)
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            raise ConfigError(f"{path} {value!r} is not valid; choose one of {', '.join(map(repr, choices))}"
                              + (f" (did you mean {close[0]!r}?)" if close else ""))
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        rest = [o for o in options if o is not type(None)]
        if len(rest) == 1:
            return check_value(path, value, rest[0])
        for option in rest:
            try:
                return check_value(path, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: {value!r} fits none of {', '.join(_describe(o) for o in rest)}")
    if origin is list or tp is list:
        if isinstance(value, (str, dict)) and typing.get_args(tp):
            value = [value]  # one plain path (or source) where a list of them is taken
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        return [check_value(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else value
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return check(value, path)
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def check(cfg: Any, path: str = "") -> Any:
    """Check every field of a config object (and its sections) against its type, in place; for
    configs built in Python rather than read from a file. Returns `cfg`."""
    types_ = _field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        where = f"{path}.{f.name}" if path else f.name
        setattr(cfg, f.name, check_value(where, getattr(cfg, f.name), types_[f.name]))
    return cfg


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong values by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected an object, got {data!r}")
    types_ = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key not in names:
            raise ConfigError(f"unknown config key {where!r}{did_you_mean(key, names)}")
        kwargs[key] = check_value(where, value, types_[key])
    return check(cls(**kwargs), path)


def set_value(cfg: Any, dotted: str, raw: str) -> None:
    """Apply one `key.sub=value` override in place; the value is parsed as JSON, else a string."""
    parts = dotted.split(".")
    target = cfg
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(target)]
        if part not in names:
            raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])!r}{did_you_mean(part, names)}")
        if i < len(parts) - 1:
            target = getattr(target, part)
            if not dataclasses.is_dataclass(target):
                raise ConfigError(f"{'.'.join(parts[: i + 1])} is a value, not a section")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    setattr(target, parts[-1], check_value(dotted, value, _field_types(type(target))[parts[-1]]))


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        set_value(cfg, key.strip().lstrip("-"), raw)
    return cfg


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body), base classes included."""
    docs: dict[str, str] = {}
    for klass in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):
            continue
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def settings(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of every setting, sections expanded: what `--set` accepts."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(settings(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def describe(cfg: Any) -> list[tuple[str, Any, str]]:
    """(dotted key, value, docstring) of every setting."""
    docs: dict[str, str] = {}

    def collect(obj: Any, prefix: str) -> None:
        docs.update({prefix + k: v for k, v in field_docs(type(obj)).items()})
        for f in dataclasses.fields(obj):
            if dataclasses.is_dataclass(getattr(obj, f.name)):
                collect(getattr(obj, f.name), f"{prefix}{f.name}.")

    collect(cfg, "")
    return [(key, value, docs.get(key, "")) for key, value in settings(cfg).items()]


def validate(cfg: FlavaConfig) -> FlavaConfig:
    """Check every field, then the relations between fields that a single type cannot express."""
    check(cfg)
    for name in ("image", "text", "multimodal"):
        enc = getattr(cfg, name)
        if enc.hidden_size % enc.num_heads:
            raise ConfigError(
                f"{name}.hidden_size ({enc.hidden_size}) must be divisible by "
                f"{name}.num_heads ({enc.num_heads})"
            )
    if cfg.image.patch_size > cfg.image.image_size:
        raise ConfigError(
            f"image.patch_size ({cfg.image.patch_size}) must be at most image.image_size ({cfg.image.image_size})"
        )
    need, have = 4 * parameter_count(cfg), _memory_bytes()
    if have and need > have:
        raise ConfigError(
            f"this model would need {need / 2**30:,.0f} GiB for its float32 weights alone, more than this machine's "
            f"{have / 2**30:,.0f} GiB of memory (hidden sizes {cfg.image.hidden_size}/{cfg.text.hidden_size}/"
            f"{cfg.multimodal.hidden_size}, layers {cfg.image.num_layers}/{cfg.text.num_layers}/"
            f"{cfg.multimodal.num_layers}); check the model sizes (presets: {', '.join(PRESETS)})")
    return cfg


def parameter_count(cfg: FlavaConfig) -> int:
    """About how many parameters a FlavaModel of this config has (the pretraining heads and codebook
    included), from the sizes alone: to refuse impossible configs before allocating anything."""
    def blocks(e: TransformerConfig) -> int:
        d, m = e.hidden_size, e.mlp_size
        return e.num_layers * (4 * d * d + 2 * d * m + 9 * d + m) + 4 * d + d * d

    i, t, mm = cfg.image, cfg.text, cfg.multimodal
    image = blocks(i) + i.num_channels * i.patch_size**2 * i.hidden_size + (i.num_patches + 3) * i.hidden_size
    text = blocks(t) + (t.vocab_size + t.max_position_embeddings + t.type_vocab_size) * t.hidden_size
    projections = (i.hidden_size + t.hidden_size) * (cfg.projection_dim + mm.hidden_size)
    heads = (i.hidden_size + mm.hidden_size) * i.vocab_size + (t.hidden_size + mm.hidden_size) * t.vocab_size
    return image + text + blocks(mm) + projections + heads


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def load_config(path: str | os.PathLike) -> FlavaConfig:
    """Read a FlavaConfig from JSON; a checkpoint's config.json is accepted too."""
    data = read_json(path)
    if isinstance(data, dict) and data.get("format") == "flava":
        data = data.get("model", {})
    return validate(from_dict(FlavaConfig, data))


def config_from(spec: str | os.PathLike | FlavaConfig) -> FlavaConfig:
    """A config from a preset name, a JSON path, or a config object (copied)."""
    if isinstance(spec, FlavaConfig):
        return validate(from_dict(FlavaConfig, to_dict(spec)))
    if isinstance(spec, str) and spec in PRESETS:
        return preset(spec)
    return load_config(spec)
