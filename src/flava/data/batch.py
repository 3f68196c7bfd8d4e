"""The three kinds of training batch, and the conventions their tensors share.

Masks and labels are made by the data pipeline; losses read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch

IGNORE_INDEX = -100
"""Label of a position no loss reads (PyTorch's cross-entropy default)."""


def pad_rows(rows: Sequence[Sequence[int] | torch.Tensor], value: int) -> torch.Tensor:
    """[len(rows), longest] long tensor: each row left-aligned, the rest `value`."""
    out = torch.full((len(rows), max((len(r) for r in rows), default=0)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def attention_mask(rows: Sequence[Sequence[int] | torch.Tensor]) -> torch.Tensor:
    """[len(rows), longest] 1 for each row's tokens, 0 for the padding `pad_rows` adds."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    longest = int(lengths.max()) if len(rows) else 0
    return (torch.arange(longest)[None, :] < lengths[:, None]).long()


class _Batch:
    def to(self, device: torch.device | str):
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def __len__(self) -> int:
        return next(getattr(self, f.name) for f in fields(self)).shape[0]


@dataclass
class PairBatch(_Batch):
    """Image-text pairs: contrastive, ITM and MMM."""

    pixel_values: torch.Tensor
    """[B, C, H, W] normalised images."""
    input_ids: torch.Tensor
    """[B, L] unmasked token ids (contrastive)."""
    attention_mask: torch.Tensor
    """[B, L] 1 for real tokens."""
    patch_mask: torch.Tensor
    """[B, num_patches] True where a patch is masked."""
    masked_input_ids: torch.Tensor
    """[B, L] token ids after text masking (ITM, MMM)."""
    mlm_labels: torch.Tensor
    """[B, L] original ids at chosen positions, IGNORE_INDEX elsewhere."""
    codebook_pixels: torch.Tensor | None = None
    """[B, C, 8g, 8g] the same crop for the image codebook, in its input range."""
    image_targets: torch.Tensor | None = None
    """[B, num_patches] image token ids, if already computed (else the codebook makes them)."""


@dataclass
class ImageBatch(_Batch):
    """Images alone: MIM."""

    pixel_values: torch.Tensor
    patch_mask: torch.Tensor
    codebook_pixels: torch.Tensor | None = None
    image_targets: torch.Tensor | None = None


@dataclass
class TextBatch(_Batch):
    """Text alone: MLM."""

    masked_input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mlm_labels: torch.Tensor
