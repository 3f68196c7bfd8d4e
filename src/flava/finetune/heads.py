"""The heads (RoBERTa's on text, the 2-layer one on CLS_M, a linear one on images) and the
classifiers that put each on its encoder copy."""

from __future__ import annotations

import torch
from torch import nn

from ..model.encoders import ImageEncoder
from ..model.flava import FlavaModel, TextTower
from ..model.layers import Activation, take_rows


class TextHead(nn.Module):
    """RoBERTa's classification head on a CLS state."""

    def __init__(self, dim: int, num_outputs: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.dense = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.tanh(self.dense(self.drop(x)))))


class MultimodalHead(nn.Module):
    """The 2-layer head on CLS_M (ViLT's layout, FLAVA's hidden size)."""

    def __init__(self, dim: int, hidden: int, num_outputs: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.act = Activation("gelu")
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.act(self.norm(self.dense(x)))))


class ImageHead(nn.Module):
    """A linear layer on the image CLS state (after dropout)."""

    def __init__(self, dim: int, num_outputs: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(dim, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(x))


class ImageClassifier(nn.Module):
    """A copy of FLAVA's image encoder and a head on its CLS state after the final LayerNorm."""

    def __init__(self, encoder: ImageEncoder, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixel_values, cls_only=True).last_hidden_state[:, 0]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixel_values))


class TextClassifier(nn.Module):
    """A copy of FLAVA's text encoder and a head on its CLS state."""

    def __init__(self, tower: TextTower, head: nn.Module):
        super().__init__()
        self.tower = tower
        self.head = head

    def features(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        # cls_only: the last block updates token 0 alone, the only state the head reads.
        return self.tower(input_ids, attention_mask, token_type_ids, cls_only=True).last_hidden_state[:, 0]

    def forward(self, **inputs) -> torch.Tensor:
        return self.head(self.features(**inputs))


class MultimodalClassifier(nn.Module):
    """A copy of FlavaModel and a head on CLS_M."""

    def __init__(self, flava: FlavaModel, head: nn.Module):
        super().__init__()
        self.flava = flava
        self.head = head

    def features(self, pixel_values, image_index, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        """`pixel_values` holds each distinct image of the batch once; `image_index[i]` is row i's
        image. Questions about one image share its image-encoder pass (exact: the rows are copies)."""
        f = self.flava
        image = take_rows(f.image_to_multimodal(f.encode_image_tokens(pixel_values)), image_index)
        # skip_padding: zeros at text padding, which the multimodal encoder masks out anyway.
        text = f.text_to_multimodal(f.encode_text_tokens(input_ids, attention_mask, token_type_ids, skip_padding=True))
        return f.fuse_tokens(image, text, attention_mask, skip_padding=True).cls

    def forward(self, **inputs) -> torch.Tensor:
        return self.head(self.features(**inputs))


def freeze_unused(flava: FlavaModel) -> None:
    """Parameters off the CLS_M path get no gradient; leaving them out keeps them out of the
    optimizer."""
    for p in flava.unused_by_fusion():
        p.requires_grad_(False)
