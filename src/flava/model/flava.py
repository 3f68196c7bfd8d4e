"""FlavaModel: three encoders, the contrastive projections and the multimodal fusion."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FlavaConfig, validate
from ..errors import InputError
from .encoders import EncoderOutput, ImageEncoder, MultimodalEncoder, MultimodalOutput, TextEncoder

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


def init_weights(module: nn.Module, std: float) -> None:
    """Truncated-normal linear/conv/embedding weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class FlavaModel(nn.Module):
    """FLAVA's encoders. Heads and losses live elsewhere (`flava.model.heads`, `flava.losses`)."""

    def __init__(self, config: FlavaConfig):
        super().__init__()
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
        tokens = [self.image_encoder.cls_token, self.image_encoder.pos_embed, self.image_encoder.mask_token,
                  self.multimodal_encoder.cls_token]
        for p in tokens:
            if p is not None:
                nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)
        with torch.no_grad():
            self.logit_scale.fill_(self.config.logit_scale_init)

    # ------------------------------------------------------------------ unimodal

    def encode_image_tokens(
        self,
        pixel_values: torch.Tensor,
        patch_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
    ) -> EncoderOutput:
        """Per-token image states (see `EncoderOutput`)."""
        return self.image_encoder(pixel_values, patch_mask, interpolate_pos_encoding, output_hidden_states)

    def encode_text_tokens(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> EncoderOutput:
        """Per-token text states (see `EncoderOutput`)."""
        return self.text_encoder(input_ids, attention_mask, token_type_ids, output_hidden_states)

    def image_embedding(self, image: EncoderOutput) -> torch.Tensor:
        """normalize(image_projection(LN(H_I)[:, 0])): one [D] vector per image."""
        return F.normalize(self.image_projection(image.last_hidden_state[:, 0]), dim=-1)

    def text_embedding(self, text: EncoderOutput) -> torch.Tensor:
        """normalize(text_projection(LN(H_T)[:, 0])): one [D] vector per text."""
        return F.normalize(self.text_projection(text.last_hidden_state[:, 0]), dim=-1)

    def encode_image(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """[B, projection_dim] L2-normalised contrastive image embeddings."""
        return self.image_embedding(
            self.image_encoder(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, cls_only=True)
        )

    def encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, projection_dim] L2-normalised contrastive text embeddings."""
        return self.text_embedding(self.text_encoder(input_ids, attention_mask, token_type_ids, cls_only=True))

    # ------------------------------------------------------------------ multimodal

    def fuse(
        self, image: EncoderOutput, text: EncoderOutput, output_hidden_states: bool = False,
        skip_padding: bool = False,
    ) -> MultimodalOutput:
        """Run the multimodal encoder on already computed unimodal states (pre-final-norm).
        `skip_padding`: for losses, which never read the states at text padding."""
        return self.multimodal_encoder(
            self.image_to_mm_projection(image.pre_norm_hidden_state),
            self.text_to_mm_projection(text.pre_norm_hidden_state),
            text.attention_mask,
            output_hidden_states,
            skip_padding,
        )

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

    # ------------------------------------------------------------------ io

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json and model.safetensors (this project's format) atomically."""
        from ..storage import save_model

        save_model(directory, self.config, {"model": self})

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
