"""int8 inference: dynamically quantized linear layers (weights int8, activations per batch)."""

from __future__ import annotations

import warnings

import torch
from torch import nn


def quantize_int8(model: nn.Module) -> nn.Module:
    """A CPU copy of `model` whose nn.Linear layers run in int8; convolutions, embeddings,
    LayerNorms and attention stay fp32."""
    from torch.ao.quantization import quantize_dynamic

    model = model.to("cpu").eval()
    with warnings.catch_warnings():
        # torch.ao announces its move to torchao; the eager API is still the supported CPU path here.
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=False)
