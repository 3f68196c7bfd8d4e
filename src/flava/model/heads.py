"""Pretraining head modules, kept apart from the encoders; which objective uses which is
`flava.objectives.registry`."""

from __future__ import annotations

import torch
from torch import nn

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
