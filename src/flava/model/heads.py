"""Pretraining heads, kept apart from the encoders: MIM, MLM, MMM-image, MMM-text, ITM."""

from __future__ import annotations

import torch
from torch import nn

from ..config import FlavaConfig
from .layers import Activation


class MaskedPredictionHead(nn.Module):
    """dense -> activation -> LayerNorm -> decoder over a token vocabulary."""

    def __init__(self, in_dim: int, vocab_size: int, activation: str, eps: float):
        super().__init__()
        self.dense = nn.Linear(in_dim, in_dim)
        self.act = Activation(activation)
        self.norm = nn.LayerNorm(in_dim, eps=eps)
        self.decoder = nn.Linear(in_dim, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(x))))


class ITMHead(nn.Module):
    """Pooled CLS_M (dense + tanh) -> match / mismatch logits."""

    def __init__(self, dim: int):
        super().__init__()
        self.pooler = nn.Linear(dim, dim)
        self.classifier = nn.Linear(dim, 2)

    def forward(self, cls_state: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.pooler(cls_state)))


class PretrainingHeads(nn.Module):
    """The five prediction heads. Each MMM head reads the multimodal encoder's width; its
    activation and LayerNorm epsilon follow the modality it predicts."""

    def __init__(self, config: FlavaConfig):
        super().__init__()
        ic, tc, mc = config.image, config.text, config.multimodal
        self.mim = MaskedPredictionHead(ic.hidden_size, ic.vocab_size, ic.activation, ic.layer_norm_eps)
        self.mlm = MaskedPredictionHead(tc.hidden_size, tc.vocab_size, tc.activation, tc.layer_norm_eps)
        self.mmm_image = MaskedPredictionHead(mc.hidden_size, ic.vocab_size, ic.activation, ic.layer_norm_eps)
        self.mmm_text = MaskedPredictionHead(mc.hidden_size, tc.vocab_size, tc.activation, tc.layer_norm_eps)
        self.itm = ITMHead(mc.hidden_size)
        from .flava import init_weights

        init_weights(self, config.init_std)
