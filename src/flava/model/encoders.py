"""The image (ViT), text (BERT-style) and multimodal encoders."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ImageEncoderConfig, MultimodalEncoderConfig, TextEncoderConfig
from ..errors import InputError
from ..syncs import is_sync_free
from .layers import Packing, Pooler, Transformer, padding_mask


@dataclass
class EncoderOutput:
    """Per-token states of one encoder."""

    last_hidden_state: torch.Tensor
    """[B, N, D] after the encoder's final LayerNorm (N = 1 when only CLS was asked for). A post-norm
    text encoder (a BERT-family tower) has no final LayerNorm: its last block's output, as BERT's."""
    pre_norm_hidden_state: torch.Tensor
    """[B, N, D] before the final LayerNorm: what the multimodal encoder consumes. For a post-norm
    text encoder the same tensor as `last_hidden_state` (whose CLS the contrastive embedding reads)."""
    attention_mask: torch.Tensor | None = None
    """[B, N] 1 for real tokens, 0 for padding (text only)."""
    hidden_states: tuple[torch.Tensor, ...] | None = None
    """Embedding output and every block's output, when asked for."""
    prefix_tokens: int = 1
    """Tokens before the patches (images) or the text: CLS, then an image encoder's distillation
    and register tokens when it has them (`ImageEncoderConfig.num_prefix_tokens`)."""

    @property
    def patches(self) -> torch.Tensor:
        """[B, N - prefix_tokens, D] the final states after the prefix tokens (an image's patches)."""
        return self.last_hidden_state[:, self.prefix_tokens:]


@dataclass(frozen=True)
class MultimodalLayout:
    """Where each part sits in the multimodal sequence [CLS_M | image tokens | text tokens].

    The image tokens are the image encoder's CLS followed by its patches.
    """

    num_image_tokens: int
    num_text_tokens: int
    has_cls: bool = True

    @property
    def offset(self) -> int:
        return 1 if self.has_cls else 0

    @property
    def length(self) -> int:
        return self.offset + self.num_image_tokens + self.num_text_tokens

    @property
    def image(self) -> slice:
        return slice(self.offset, self.offset + self.num_image_tokens)

    @property
    def image_patches(self) -> slice:
        """The image patches only (the image encoder's CLS excluded)."""
        return slice(self.offset + 1, self.offset + self.num_image_tokens)

    @property
    def text(self) -> slice:
        start = self.offset + self.num_image_tokens
        return slice(start, start + self.num_text_tokens)


@dataclass
class MultimodalOutput:
    last_hidden_state: torch.Tensor
    """[B, layout.length, D] after the final LayerNorm."""
    layout: MultimodalLayout
    hidden_states: tuple[torch.Tensor, ...] | None = None

    @property
    def cls(self) -> torch.Tensor:
        """[B, D] the CLS_M state (the first token; needs `use_cls_token`)."""
        if not self.layout.has_cls:
            raise InputError("this multimodal encoder has no CLS_M token (use_cls_token is false)")
        return self.last_hidden_state[:, 0]

    @property
    def image_patches(self) -> torch.Tensor:
        return self.last_hidden_state[:, self.layout.image_patches]

    @property
    def text(self) -> torch.Tensor:
        return self.last_hidden_state[:, self.layout.text]


def resize_position_table(pos_embed: torch.Tensor, grid_h: int, grid_w: int, prefix: int = 1,
                          antialias: bool = False) -> torch.Tensor:
    """[1, prefix + g*g, D] (CLS, and DeiT's distillation token, first, then a square grid of
    patches) -> [1, prefix + grid_h*grid_w, D], the patch positions resized bicubically as
    transformers' `interpolate_pos_encoding` does (`antialias`: as DINOv2 with registers does)."""
    cls_pos, patch_pos = pos_embed[:, :prefix], pos_embed[:, prefix:]
    g = math.isqrt(patch_pos.shape[1])
    if g * g != patch_pos.shape[1]:
        raise InputError(f"a position table of {patch_pos.shape[1]} patches is not a square grid")
    if (grid_h, grid_w) == (g, g):
        return pos_embed
    d = patch_pos.shape[-1]
    patch_pos = patch_pos.reshape(1, g, g, d).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False,
                              antialias=antialias)
    return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, d)], dim=1)


class ImageEncoder(nn.Module):
    """ViT: patch embedding, a learned mask token, CLS, learned positions, pre-norm blocks.

    What some public towers add (`interop.towers`), each off in FLAVA's own: DeiT's distillation
    token after CLS (with a position), DINOv2's register tokens after those (without positions)
    and LayerScale, CLIP's LayerNorm over the embeddings and bias-free patch projection. The
    sequence is [CLS, distillation token, registers, patches]."""

    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.patch_embed = nn.Conv2d(cfg.num_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                                     bias=cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.distillation_token else None
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.register_tokens, d)) if cfg.register_tokens else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.use_mask_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + self.positioned_prefix, d))
        self.drop = nn.Dropout(cfg.dropout)
        self.embed_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps) if cfg.embed_norm else None
        self.transformer = Transformer(cfg, cfg.layer_scale)
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.pooler = Pooler(d)

    @property
    def positioned_prefix(self) -> int:
        """Tokens before the patches that have a position: CLS and the distillation token."""
        return 1 + int(self.cfg.distillation_token)

    def token_parameters(self) -> list[nn.Parameter]:
        """The learned tokens and positions (initialised like weights, never weight-decayed)."""
        return [p for p in (self.cls_token, self.dist_token, self.register_tokens, self.pos_embed, self.mask_token)
                if p is not None]

    def _check(self, pixel_values: torch.Tensor, interpolate: bool) -> None:
        cfg = self.cfg
        if not isinstance(pixel_values, torch.Tensor) or not pixel_values.dtype.is_floating_point:
            got = f"{pixel_values.dtype} values" if isinstance(pixel_values, torch.Tensor) else \
                type(pixel_values).__name__
            raise InputError(f"pixel_values must be a float tensor of normalised pixels; got {got}: give raw images "
                             "(PIL, arrays, paths) to encode_image or model.processor, and move a data batch of uint8 "
                             "pixels with batch.to(device), which normalises them")
        if pixel_values.dim() != 4:
            raise InputError(
                f"pixel_values must be [batch, {cfg.num_channels}, H, W]; got shape {tuple(pixel_values.shape)}"
            )
        b, c, h, w = pixel_values.shape
        if b == 0:
            raise InputError("pixel_values holds no image (a batch of 0)")
        if c != cfg.num_channels and pixel_values.shape[-1] == cfg.num_channels:
            raise InputError(f"pixel_values are [batch, H, W, {cfg.num_channels}] (channels last); the image encoder "
                             f"takes [batch, {cfg.num_channels}, H, W]: pixel_values.permute(0, 3, 1, 2)")
        if c != cfg.num_channels:
            raise InputError(
                f"images have {c} channels but the image encoder expects {cfg.num_channels} "
                f"(convert grey or RGBA images to RGB)"
            )
        if not interpolate and (h, w) != (cfg.image_size, cfg.image_size):
            raise InputError(
                f"images are {h}x{w} but the model expects {cfg.image_size}x{cfg.image_size}; resize them, "
                f"or pass interpolate_pos_encoding=True to run at another multiple of {cfg.patch_size}"
            )
        if interpolate and (h % cfg.patch_size or w % cfg.patch_size):
            raise InputError(f"image size {h}x{w} is not a multiple of the patch size {cfg.patch_size}")

    def position_embeddings(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """[1, P + grid_h*grid_w, D] (P: CLS and a distillation token), bicubically resized when the
        grid differs from the model's (from this table: a public tower loaded at another size than
        its own had its table resized once then, so other sizes differ slightly from the tower run
        from its original table)."""
        return resize_position_table(self.pos_embed, grid_h, grid_w, self.positioned_prefix, self.cfg.pos_antialias)

    def resize(self, image_size: int) -> None:
        """Permanently re-grid the position embeddings for a new input size (e.g. 480 px for VQA)."""
        if image_size % self.cfg.patch_size:
            raise InputError(f"image size {image_size} is not a multiple of the patch size {self.cfg.patch_size}")
        grid = image_size // self.cfg.patch_size
        with torch.no_grad():
            new = self.position_embeddings(grid, grid).clone()
        self.pos_embed = nn.Parameter(new)
        self.cfg.image_size = image_size

    def forward(
        self,
        pixel_values: torch.Tensor,
        patch_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        cls_only: bool = False,
    ) -> EncoderOutput:
        """`patch_mask` [B, num_patches] (or [B, h, w]) marks patches replaced by the mask token.
        `cls_only` returns the CLS state alone and skips the work only other tokens need."""
        self._check(pixel_values, interpolate_pos_encoding)
        return self._encode(self._patches(pixel_values), patch_mask, output_hidden_states, cls_only)

    def masked_and_whole(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> tuple[EncoderOutput,
                                                                                               EncoderOutput]:
        """The image with `patch_mask`'s patches masked, and the whole image's CLS state
        (`cls_only`), from one patch projection: a pretraining pair's two image passes. Under FSDP
        it is a forward method of its own (`register_fsdp_forward_method`): one gathering of the
        encoder's weights for both."""
        self._check(pixel_values, False)
        patches = self._patches(pixel_values)
        whole = self._encode(patches, None, cls_only=True)
        return self._encode(patches, patch_mask), whole

    def _patches(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        grid_h, grid_w = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), grid_h, grid_w

    def _encode(self, patches: tuple[torch.Tensor, int, int], patch_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False, cls_only: bool = False) -> EncoderOutput:
        x, grid_h, grid_w = patches
        B, N, _ = x.shape
        if patch_mask is not None:
            if self.mask_token is None:
                raise InputError("this image encoder has no mask token (use_mask_token is false)")
            patch_mask = patch_mask.reshape(patch_mask.shape[0], -1)
            if tuple(patch_mask.shape) != (B, N):
                raise InputError(f"patch_mask must be [{B}, {N}]; got {tuple(patch_mask.shape)}")
            x = torch.where(patch_mask.to(torch.bool).unsqueeze(-1), self.mask_token.to(x.dtype), x)
        prefix = [self.cls_token] + ([self.dist_token] if self.dist_token is not None else [])
        x = torch.cat([p.expand(B, -1, -1).to(x.dtype) for p in prefix] + [x], dim=1)
        x = x + self.position_embeddings(grid_h, grid_w)
        if self.register_tokens is not None:
            n = len(prefix)
            x = torch.cat([x[:, :n], self.register_tokens.expand(B, -1, -1).to(x.dtype), x[:, n:]], dim=1)
        x = self.drop(x)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        h, states = self.transformer(x, keep_all=output_hidden_states, cls_only=cls_only)
        return EncoderOutput(self.norm(h), h, hidden_states=states, prefix_tokens=self.cfg.num_prefix_tokens)


class TextEncoder(nn.Module):
    """BERT embeddings (word + position + token type, LayerNorm) and blocks: pre-norm with a final
    LayerNorm (FLAVA's), or post-norm without one (`norm_placement='post'`: BERT, RoBERTa and their
    kin, whose positions may start at `position_offset`)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, d, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, d)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, d)
        self.embed_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.transformer = Transformer(cfg)
        # Post-norm blocks end normalised: a final LayerNorm would be a second one BERT never had.
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps) if cfg.norm_placement == "pre" else nn.Identity()
        self.pooler = Pooler(d)

    def _check(self, input_ids: torch.Tensor, attention_mask, token_type_ids) -> None:
        cfg = self.cfg
        for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask)):
            if t is not None and not isinstance(t, torch.Tensor):
                raise InputError(f"{name} must be a tensor; got {type(t).__name__}: give raw texts to encode_text or "
                                 "model.processor")
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be [batch, length]; got shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype in (torch.bool, torch.uint8, torch.int8,
                                                                    torch.int16):
            raise InputError(f"input_ids must be integer token ids as torch.long (or int32); got {input_ids.dtype}: "
                             "input_ids.long()")
        if input_ids.shape[0] == 0:
            raise InputError("input_ids holds no text (a batch of 0)")
        L = input_ids.shape[1]
        if L == 0:
            raise InputError("input_ids is empty: every text needs at least one token")
        if L > cfg.max_length:
            raise InputError(
                f"texts are {L} tokens long but the text encoder takes at most "
                f"{cfg.max_length}; truncate them"
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise InputError(
                f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}"
            )
        if token_type_ids is not None and token_type_ids.shape != input_ids.shape:
            raise InputError("token_type_ids must have the shape of input_ids")
        if is_sync_free():  # reading ids would wait for the device; the trainer checks its tokenizer instead
            return
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= cfg.vocab_size:
            bad = hi if hi >= cfg.vocab_size else lo
            raise InputError(
                f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size}); "
                f"was the text tokenized with a different vocabulary?"
            )
        if token_type_ids is not None:
            if int(token_type_ids.min()) < 0 or int(token_type_ids.max()) >= cfg.type_vocab_size:
                raise InputError(f"token_type_ids must lie in [0, {cfg.type_vocab_size})")

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        cls_only: bool = False,
        skip_padding: bool = False,
        real_tokens: int | None = None,
    ) -> EncoderOutput:
        """`cls_only` returns the CLS state alone. `skip_padding` runs the linear layers on real
        tokens only and leaves zeros (pre-norm) at padding positions: for losses and embeddings,
        which never read them. `cls_only` implies it. Under `sync_free()` padding is skipped only
        when the host knows `real_tokens`, the number of 1s in `attention_mask` (and every row's
        token 0 is taken to be real, as this project's tokenizer makes it); else it is masked."""
        self._check(input_ids, attention_mask, token_type_ids)
        L = input_ids.shape[1]
        # Right-padded rows: real tokens sit at 0..n-1, so RoBERTa's positions (counted over
        # non-padding from pad_token_id + 1) are these plus the offset.
        positions = torch.arange(self.cfg.position_offset, self.cfg.position_offset + L, device=input_ids.device)
        if token_type_ids is None:
            x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
        else:
            x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(positions)
        x = self.drop(self.embed_norm(x))
        mask = padding_mask(attention_mask, x)
        packing = None
        free = is_sync_free()  # then packing needs the host's count, and token 0 goes unchecked
        if mask is not None and (skip_padding or cls_only) and not output_hidden_states:
            if (not free or real_tokens is not None) and (not cls_only or free or bool(attention_mask[:, 0].all())):
                packing = Packing.from_mask(attention_mask, real_tokens if free else None)
        h, states = self.transformer(x, mask, output_hidden_states, cls_only, packing)
        if cls_only:
            attention_mask = None if attention_mask is None else attention_mask[:, :1]
        return EncoderOutput(self.norm(h), h, attention_mask=attention_mask, hidden_states=states)


class MultimodalEncoder(nn.Module):
    """Pre-norm blocks over [CLS_M | image tokens | text tokens], text padding masked."""

    def __init__(self, cfg: MultimodalEncoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.use_cls_token else None
        self.transformer = Transformer(cfg)
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.pooler = Pooler(d)

    def forward(
        self,
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        text_attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        skip_padding: bool = False,
    ) -> MultimodalOutput:
        """`skip_padding`: linear layers on real tokens only, zeros at text padding positions."""
        if image_tokens.shape[0] != text_tokens.shape[0]:
            raise InputError(
                f"the multimodal encoder needs as many images as texts; "
                f"got {image_tokens.shape[0]} images and {text_tokens.shape[0]} texts"
            )
        B = image_tokens.shape[0]
        layout = MultimodalLayout(image_tokens.shape[1], text_tokens.shape[1], self.cls_token is not None)
        # The residual stream keeps the weights' dtype: under autocast the projections hand over
        # bfloat16/float16 tokens, and the sums and LayerNorms must stay float32.
        dtype = self.norm.weight.dtype
        parts = [image_tokens.to(dtype), text_tokens.to(dtype)]
        if self.cls_token is not None:
            parts.insert(0, self.cls_token.expand(B, -1, -1).to(dtype))
        x = torch.cat(parts, dim=1)
        mask = packing = None
        if text_attention_mask is not None:
            keep_prefix = text_attention_mask.new_ones(B, layout.offset + layout.num_image_tokens)
            keep = torch.cat([keep_prefix, text_attention_mask], dim=1)
            mask = padding_mask(keep, x)
            # Packing's size is the number of real tokens, which under `sync_free()` no one knows
            # here (it depends on the ITM negatives drawn on the device): padding is masked instead.
            if mask is not None and skip_padding and not output_hidden_states and not is_sync_free():
                packing = Packing.from_mask(keep)
        h, states = self.transformer(x, mask, keep_all=output_hidden_states, packing=packing)
        return MultimodalOutput(self.norm(h), layout, hidden_states=states)
