"""FlavaModel: three encoders, the contrastive projections and the multimodal fusion."""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import PRESETS, FlavaConfig, ImageEncoderConfig, config_from, to_dict, validate
from ..data.processor import PROCESSOR_FILE, Processor
from ..data.tokenizer import SPECIAL_MAP, TOKENIZER_FILE
from ..errors import ConfigError, InputError
from ..io.checkpoint import CHECKSUMS, CONFIG, WEIGHTS, write_checkpoint_dir, write_checkpoint_files

SAVED_FILES = (CONFIG, WEIGHTS, CHECKSUMS, PROCESSOR_FILE, TOKENIZER_FILE, SPECIAL_MAP)
"""What `save_pretrained` writes: a directory holding other files (a trained codebook's decoder,
a training checkpoint's state) is not replaced by it."""
from .encoders import EncoderOutput, ImageEncoder, MultimodalEncoder, MultimodalOutput, TextEncoder
from .layers import Transformer

LOGIT_SCALE_MAX = math.log(100.0)


@dataclass
class FlavaOutput:
    """What `FlavaModel.forward` computed; a field is None when its input was not given."""

    image: EncoderOutput | None = None
    text: EncoderOutput | None = None
    multimodal: MultimodalOutput | None = None
    image_embeddings: torch.Tensor | None = None
    """[B, projection_dim] L2-normalised contrastive image embeddings."""
    text_embeddings: torch.Tensor | None = None
    """[B, projection_dim] L2-normalised contrastive text embeddings."""


# The standard normal's mass within ±2: erf(2 / sqrt(2)).
_WITHIN_2_STD = math.erf(math.sqrt(2.0))


def trunc_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Fill with Normal(0, std) truncated to ±2 std (FLAVA's and BERT's initialisation) by the
    inverse CDF in one pass. torch's `nn.init.trunc_normal_` samples the same distribution by
    rejection, drawing a whole tensor of candidates each round while any value lies outside:
    about 10x slower on a CPU (17 s to build the `base` model, against 2.4 s)."""
    with torch.no_grad():
        # Uniform over the CDF's range within the bounds, mapped through erfinv: values in (-2, 2) std.
        tensor.uniform_(-_WITHIN_2_STD, _WITHIN_2_STD).erfinv_().mul_(std * math.sqrt(2.0))
        return tensor.clamp_(-2 * std, 2 * std)


def init_weights(module: nn.Module, std: float) -> None:
    """Truncated-normal linear/conv/embedding weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            trunc_normal_(m.weight, std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class FlavaModel(nn.Module):
    """FLAVA's encoders. Heads and losses live elsewhere (`flava.model.heads`, `flava.objectives`)."""

    def __init__(self, config: FlavaConfig | str | os.PathLike):
        """`config`: a FlavaConfig, a preset's name (tiny, small, base) or the path of a JSON config
        (as `flava.load_config` reads it)."""
        super().__init__()
        if isinstance(config, (str, os.PathLike, FlavaConfig)):
            # A copy of a config object: resize_image changes this model's, never the caller's or
            # another model's built from the same object.
            config = config_from(config, "config")
        else:
            raise ConfigError(f"FlavaModel takes a FlavaConfig, a preset name ({', '.join(PRESETS)}) or the path of a "
                              f"JSON config; got {type(config).__name__}")
        self.config = validate(config)
        ic, tc, mc = config.image, config.text, config.multimodal
        self.image_encoder = ImageEncoder(ic)
        self.text_encoder = TextEncoder(tc)
        self.multimodal_encoder = MultimodalEncoder(mc)
        self.image_projection = nn.Linear(ic.hidden_size, config.projection_dim)
        self.text_projection = nn.Linear(tc.hidden_size, config.projection_dim)
        self.image_to_mm_projection = nn.Linear(ic.hidden_size, mc.hidden_size)
        self.text_to_mm_projection = nn.Linear(tc.hidden_size, mc.hidden_size)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        init_weights(self, std)
        tokens = [*self.image_encoder.token_parameters(), self.multimodal_encoder.cls_token]
        for p in tokens:
            if p is not None:
                trunc_normal_(p, std)
        with torch.no_grad():
            self.logit_scale.fill_(self.config.logit_scale_init)

    # ------------------------------------------------------------------ unimodal

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def encode_image_tokens(
        self,
        pixel_values: torch.Tensor,
        patch_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        cls_only: bool = False,
    ) -> EncoderOutput:
        """Per-token image states (see `EncoderOutput`). `patch_mask` [B, num_patches] marks patches
        replaced by the mask token; `cls_only` returns the CLS state alone and skips the work only
        the other tokens need."""
        return self.image_encoder(pixel_values, patch_mask, interpolate_pos_encoding, output_hidden_states, cls_only)

    def encode_text_tokens(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        cls_only: bool = False,
        skip_padding: bool = False,
        real_tokens: int | None = None,
    ) -> EncoderOutput:
        """Per-token text states (see `EncoderOutput`). `cls_only` returns the CLS state alone;
        `skip_padding` leaves zeros at padding (for losses and fusion, which never read them);
        `real_tokens` (the count of 1s in `attention_mask`) lets it do so under `sync_free()`."""
        return self.text_encoder(input_ids, attention_mask, token_type_ids, output_hidden_states, cls_only,
                                 skip_padding, real_tokens)

    def image_embedding(self, image: EncoderOutput) -> torch.Tensor:
        """normalize(image_projection(LN(H_I)[:, 0])): one [D] vector per image."""
        return F.normalize(self.image_projection(image.last_hidden_state[:, 0]), dim=-1)

    def text_embedding(self, text: EncoderOutput) -> torch.Tensor:
        """normalize(text_projection(LN(H_T)[:, 0])): one [D] vector per text."""
        return F.normalize(self.text_projection(text.last_hidden_state[:, 0]), dim=-1)

    def encode_image(self, pixel_values, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """[B, projection_dim] L2-normalised contrastive image embeddings. `pixel_values` is a tensor
        [B, 3, H, W], or raw images (PIL images, arrays, paths, or a list of them), which go
        through `self.processor` and run without autograd."""
        if not isinstance(pixel_values, torch.Tensor):
            if interpolate_pos_encoding:  # it would change nothing: the processor makes every image this size
                raise InputError(f"interpolate_pos_encoding applies to a pixel tensor of another size; raw images are "
                                 f"resized to the model's {self.config.image.image_size} px by its processor")
            with torch.no_grad():
                return self.encode_image(self.processor.images(pixel_values).to(self.device))
        return self.image_embedding(
            self.encode_image_tokens(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, cls_only=True)
        )

    def encode_text(
        self,
        input_ids,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, projection_dim] L2-normalised contrastive text embeddings. `input_ids` is a tensor
        [B, L], or a string or list of strings, which go through `self.processor` and run without
        autograd."""
        if isinstance(input_ids, np.ndarray) and input_ids.dtype.kind in "UO":  # an array of strings
            input_ids = input_ids.tolist()
        if isinstance(input_ids, (str, list, tuple)):
            if attention_mask is not None or token_type_ids is not None:
                raise InputError("attention_mask and token_type_ids go with input_ids given as a tensor; raw texts "
                                 "are tokenised with their own (model.processor.texts(...) gives both)")
            tok = self.processor.texts(input_ids)
            with torch.no_grad():
                return self.encode_text(tok.input_ids.to(self.device), tok.attention_mask.to(self.device))
        return self.text_embedding(self.encode_text_tokens(input_ids, attention_mask, token_type_ids, cls_only=True))

    @property
    def processor(self) -> Processor:
        """Turns raw images and strings into this model's inputs: the checkpoint's own processor
        files when `flava.load` found them, else one made from the config."""
        if getattr(self, "_processor", None) is None:
            self._processor = Processor.from_config(self.config)
        return self._processor

    @processor.setter
    def processor(self, value: Processor) -> None:
        # One set of pixel statistics per model: every path that normalises images (the processor,
        # training data, evaluation's features, task models) reads them, so the config takes the processor's.
        stats = {"image_mean": list(value.image_mean), "image_std": list(value.image_std)}
        if any(getattr(self.config.image, k) != v for k, v in stats.items()):
            image = dataclasses.replace(self.config.image, **stats)
            self.config = dataclasses.replace(self.config, image=image)
            self.image_encoder.cfg = image
        self._processor = value

    # ------------------------------------------------------------------ multimodal

    def image_to_multimodal(self, image: EncoderOutput) -> torch.Tensor:
        """[B, 1 + P, D_mm] the CLS and patch states (before the final LayerNorm) projected to the
        multimodal width. A tower's distillation and register tokens serve inside the image encoder
        only: the multimodal sequence keeps FLAVA's layout (`MultimodalLayout`)."""
        h = image.pre_norm_hidden_state
        if image.prefix_tokens > 1:
            h = torch.cat([h[:, :1], h[:, image.prefix_tokens:]], dim=1)
        return self.image_to_mm_projection(h)

    def text_to_multimodal(self, text: EncoderOutput) -> torch.Tensor:
        """[B, L, D_mm] text states (before the final LayerNorm) projected to the multimodal width."""
        return self.text_to_mm_projection(text.pre_norm_hidden_state)

    def fuse_tokens(
        self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False, skip_padding: bool = False,
    ) -> MultimodalOutput:
        """The multimodal encoder over already projected tokens (`image_to_multimodal`,
        `text_to_multimodal`), row i of each forming pair i; rows may be selected or repeated
        between projection and fusion (ITM negatives, several questions per image)."""
        return self.multimodal_encoder(image_tokens, text_tokens, text_attention_mask, output_hidden_states,
                                       skip_padding)

    def fuse(
        self, image: EncoderOutput, text: EncoderOutput, output_hidden_states: bool = False,
        skip_padding: bool = False,
    ) -> MultimodalOutput:
        """Run the multimodal encoder on already computed unimodal states (pre-final-norm).
        `skip_padding`: for losses, which never read the states at text padding."""
        return self.fuse_tokens(self.image_to_multimodal(image), self.text_to_multimodal(text), text.attention_mask,
                                output_hidden_states, skip_padding)

    def encode_multimodal(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        patch_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> MultimodalOutput:
        """Both unimodal encoders, then the multimodal encoder; `.cls` is CLS_M."""
        image = self.encode_image_tokens(pixel_values, patch_mask, interpolate_pos_encoding)
        text = self.encode_text_tokens(input_ids, attention_mask, token_type_ids)
        return self.fuse(image, text)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        patch_mask: torch.Tensor | None = None,
        multimodal: bool = True,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
    ) -> FlavaOutput:
        """Every output the given inputs allow; the multimodal encoder runs only if asked and possible."""
        if pixel_values is None and input_ids is None:
            raise InputError("give pixel_values, input_ids, or both")
        out = FlavaOutput()
        if pixel_values is not None:
            out.image = self.encode_image_tokens(pixel_values, patch_mask, interpolate_pos_encoding,
                                                 output_hidden_states)
            out.image_embeddings = self.image_embedding(out.image)
        if input_ids is not None:
            out.text = self.encode_text_tokens(input_ids, attention_mask, token_type_ids, output_hidden_states)
            out.text_embeddings = self.text_embedding(out.text)
        if multimodal and out.image is not None and out.text is not None:
            out.multimodal = self.fuse(out.image, out.text, output_hidden_states)
        return out

    def clamp_logit_scale(self) -> None:
        """Keep the temperature in [1, 100] (logit scale in [0, ln 100]), as CLIP and FLAVA do."""
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)

    def unused_by_fusion(self) -> list[nn.Parameter]:
        """Parameters the CLS_M path (unmasked images and texts fused) never reads: the contrastive
        projections and logit scale, the poolers and the mask token."""
        modules = [self.image_projection, self.text_projection, self.image_encoder.pooler,
                   self.text_encoder.pooler, self.multimodal_encoder.pooler]
        params = [p for m in modules for p in m.parameters()] + [self.logit_scale]
        return params + ([self.image_encoder.mask_token] if self.image_encoder.mask_token is not None else [])

    def text_tower(self) -> TextTower:
        """A copy of the text encoder alone, to train a text task without the other encoders."""
        return TextTower(copy.deepcopy(self.text_encoder))

    def replace_image_encoder(self, cfg: ImageEncoderConfig) -> list[str]:
        """Make the image encoder one of config `cfg` (e.g. to take a public tower of another
        architecture); the config follows. When only the pixel statistics differ nothing changes but
        the config; otherwise a freshly initialised encoder takes its place, with fresh projections
        from it when its width changes. Returns the names of the modules made fresh."""
        old = self.config.image
        config = validate(dataclasses.replace(self.config, image=cfg))
        self.config, self._processor = config, None  # the processor follows the config
        if dataclasses.replace(cfg, image_mean=old.image_mean, image_std=old.image_std) == old:
            self.image_encoder.cfg = cfg
            return []
        std, fresh = config.init_std, ["image_encoder"]
        encoder = ImageEncoder(cfg).to(self.device)
        init_weights(encoder, std)
        for p in encoder.token_parameters():
            trunc_normal_(p, std)
        self.image_encoder = encoder
        if cfg.hidden_size != old.hidden_size:
            for name in ("image_projection", "image_to_mm_projection"):
                new = nn.Linear(cfg.hidden_size, getattr(self, name).out_features).to(self.device)
                init_weights(new, std)
                setattr(self, name, new)
                fresh.append(name)
        return fresh

    def resize_image(self, image_size: int) -> None:
        """Permanently re-grid the position embeddings for a new input size (e.g. 480 px for VQA);
        the processor (its tokenizer kept) crops images to it from then on."""
        patch = self.config.image.patch_size
        # 0 passes the multiple-of-patch check and fails deep in torch's interpolation.
        if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < patch:
            raise InputError(f"image size {image_size!r} must be a whole number of pixels, a positive multiple of the "
                             f"patch size {patch}")
        image_size = int(image_size)
        self.image_encoder.resize(image_size)
        if getattr(self, "_processor", None) is not None:
            self._processor.image_size = image_size

    def block_stacks(self) -> list[Transformer]:
        """The three encoders' block stacks (for activation checkpointing, compiling, sharding)."""
        return [self.image_encoder.transformer, self.text_encoder.transformer, self.multimodal_encoder.transformer]

    # ------------------------------------------------------------------ io

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json and model.safetensors (this project's format) atomically, and the
        tokenizer when it is not BERT uncased (`save_tokenizer`)."""
        if any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in self.modules()):
            raise InputError("this model is quantized to int8, which is for inference and cannot be saved; save the "
                             "float model (flava.load(path) without quantize) and quantize it when loading")

        def fill(tmp) -> None:
            write_checkpoint_files(tmp, to_dict(self.config), {"model": self.state_dict()})
            self.save_tokenizer(tmp)
        write_checkpoint_dir(directory, fill, only=SAVED_FILES)

    def save_tokenizer(self, directory: str | os.PathLike) -> None:
        """When this model's processor is not the one its config makes (its own tokenizer, a text
        tower's; another image or text size), write it into a checkpoint directory being written,
        so whatever loads the checkpoint prepares inputs as it was trained; a checkpoint without
        one reads as its config says, with BERT uncased."""
        processor = getattr(self, "_processor", None)
        if processor is not None and (processor.tokenizer_file or processor != Processor.from_config(self.config)):
            processor.save_pretrained(directory)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class TextTower(nn.Module):
    """The text encoder without the rest of FLAVA. Its pooler, which no objective trains and
    classification heads replace with their own, is frozen."""

    def __init__(self, encoder: TextEncoder):
        super().__init__()
        self.encoder = encoder
        encoder.pooler.requires_grad_(False)

    def requires_grad_(self, requires_grad: bool = True) -> "TextTower":
        super().requires_grad_(requires_grad)
        self.encoder.pooler.requires_grad_(False)
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, cls_only: bool = False,
                skip_padding: bool = False) -> EncoderOutput:
        return self.encoder(input_ids, attention_mask, token_type_ids, cls_only=cls_only, skip_padding=skip_padding)
