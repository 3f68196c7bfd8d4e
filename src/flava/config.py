"""Model configs: dataclasses with a docstring per field, presets, JSON load/save, overrides.

A config is read strictly: an unknown key is an error that names it (and the nearest known
key), and a value of the wrong type is an error that names the field. The strict reading itself
(`from_dict`, `check`, ranges, overrides, field docs) lives in `flava.typed` and is re-exported
here, where every config imports it from.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import Literal

from .errors import ConfigError
from .io.files import read_json
from .typed import (
    NonNegative,
    NonNegativeInt,
    Positive,
    PositiveInt,
    Probability,
    Range,
    Seed,
    apply_overrides,
    check,
    check_value,
    describe,
    differences,
    field_docs,
    from_dict,
    plain,
    said,
    set_value,
    settings,
    to_dict,
)

__all__ = [
    "NonNegative", "NonNegativeInt", "Positive", "PositiveInt", "Probability", "Range", "Seed", "apply_overrides",
    "check", "check_value", "describe", "differences", "field_docs", "from_dict", "plain", "said", "set_value",
    "settings", "to_dict",
    "Activation", "CLIP_MEAN", "CLIP_STD", "NormPlacement", "TransformerConfig", "ImageEncoderConfig",
    "TextEncoderConfig", "MultimodalEncoderConfig",
    "CodebookConfig", "FlavaConfig", "ObjectivesConfig", "PRESETS", "preset", "validate", "parameter_count",
    "load_config", "config_from",
]

Activation = Literal["gelu", "gelu_tanh", "relu", "silu", "quick_gelu"]
NormPlacement = Literal["pre", "post"]

# CLIP's pixel statistics, which FLAVA's image processor uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class TransformerConfig:
    """Fields shared by the three encoders (transformer blocks, pre-norm unless said otherwise)."""

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
    norm_placement: NormPlacement = "pre"
    """'pre': x + attn(LN(x)), then x + mlp(LN(x)), and a final LayerNorm (FLAVA's, ViT's); 'post':
    LN(x + attn(x)), then LN(x + mlp(x)), and no final LayerNorm (BERT's, RoBERTa's: a text encoder
    started from such a tower). Only the text encoder takes 'post'."""


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
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    """Per-channel mean pixels (in [0, 1]) are normalised with, everywhere images enter the model
    (training data, processor, embed, serve); FLAVA's are CLIP's. A public image tower brings its
    own (its preprocessor_config.json)."""
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))
    """Per-channel standard deviation pixels are normalised with (see `image_mean`)."""
    # What some public image towers have beyond FLAVA's ViT (interop.towers).
    distillation_token: bool = False
    """A second learned token after CLS with its own position (DeiT's distillation token)."""
    register_tokens: NonNegativeInt = 0
    """Learned register tokens after CLS (and the distillation token), without positions
    (DINOv2 with registers)."""
    layer_scale: bool = False
    """Each block scales its attention and MLP outputs by learned per-channel factors (DINOv2's
    LayerScale)."""
    embed_norm: bool = False
    """A LayerNorm over the embeddings before the first block (CLIP's pre_layrnorm)."""
    patch_bias: bool = True
    """Whether the patch projection has a bias (CLIP's has none)."""
    pos_antialias: bool = False
    """Resize the position table with antialiasing when the image grid changes (as DINOv2 with
    registers does in transformers)."""

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: CLS, then the distillation and register tokens."""
        return 1 + int(self.distillation_token) + self.register_tokens

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


@dataclass
class TextEncoderConfig(TransformerConfig):
    """BERT-style text encoder."""

    vocab_size: PositiveInt = 30522
    """WordPiece vocabulary size (BERT uncased: 30,522)."""
    max_position_embeddings: PositiveInt = 512
    """Rows of the position table; the longest text (including [CLS] and [SEP]) is this less
    `position_offset` tokens (`max_length`)."""
    type_vocab_size: PositiveInt = 2
    """Number of token types (segments)."""
    pad_token_id: NonNegativeInt = 0
    """Id of the padding token ([PAD]; RoBERTa's <pad> is 1)."""
    position_offset: NonNegativeInt = 0
    """Position id of a text's first token: 0 (BERT, FLAVA); RoBERTa's pad_token_id + 1 = 2, its
    positions counting on from the padding id as fairseq numbered them."""

    @property
    def max_length(self) -> int:
        """The longest text in tokens, special tokens included."""
        return self.max_position_embeddings - self.position_offset


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



def check_rgb(cfg: FlavaConfig, prefix: str = "") -> None:
    """Training reads images as RGB: a model built for other channel counts would fail at its first
    step, after its start-up."""
    for key, n in (("image.num_channels", cfg.image.num_channels), ("codebook.input_channels",
                                                                   cfg.codebook.input_channels)):
        if n != 3:
            raise ConfigError(f"{prefix}{key}={n}: training reads images as RGB, 3 channels; set it to 3")


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
    img = cfg.image
    # One value per channel of the RGB images the processor and the data make (a model of other
    # channels takes pixel_values as given).
    if len(img.image_mean) != len(img.image_std) or not img.image_mean:
        raise ConfigError(f"image.image_mean and image.image_std need one value per channel each; got "
                          f"{img.image_mean} and {img.image_std}")
    if any(s <= 0 for s in img.image_std):
        raise ConfigError(f"image.image_std must be positive; got {img.image_std}")
    for name in ("image", "multimodal"):
        if getattr(cfg, name).norm_placement != "pre":
            raise ConfigError(f"{name}.norm_placement must be 'pre'; only the text encoder takes 'post' (a BERT-family "
                              f"text tower)")
    if cfg.text.max_length < 1:
        raise ConfigError(f"text.max_position_embeddings ({cfg.text.max_position_embeddings}) less "
                          f"text.position_offset ({cfg.text.position_offset}) leaves no room for a text; raise it")
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


def config_from(spec: str | os.PathLike | FlavaConfig, what: str = "--config") -> FlavaConfig:
    """A config from a preset name, a JSON path, or a config object (copied). `what` names the
    spec in the message for a mistyped preset."""
    if isinstance(spec, FlavaConfig):
        return validate(from_dict(FlavaConfig, to_dict(spec)))
    if isinstance(spec, str) and spec in PRESETS:
        return preset(spec)
    # A bare word that is no file was meant as a preset (as `flava pretrain --config` reads it): say
    # so, rather than that a config file of that name does not exist.
    if (isinstance(spec, str) and not any(sep and sep in spec for sep in ("/", os.sep, os.altsep))
            and not spec.lower().endswith(".json") and not os.path.exists(spec)):
        close = difflib.get_close_matches(spec, PRESETS, n=1)
        raise ConfigError(f"{what} {spec} is neither a preset ({', '.join(PRESETS)}) nor a config file"
                          + (f"; did you mean {close[0]!r}?" if close else ""))
    if os.path.isdir(spec):  # a checkpoint's folder, most likely
        raise ConfigError(f"{what} {spec} is a folder: name its config file ({os.path.join(spec, 'config.json')}), "
                          "or load a checkpoint's weights too with flava.load")
    return load_config(spec)
