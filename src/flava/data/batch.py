"""The three kinds of training batch, and the conventions their tensors share.

Masks and labels are made by the data pipeline; losses read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from .transforms import CLIP_MEAN, CLIP_STD, Stats, map_uint8, normalize_uint8

IGNORE_INDEX = -100
"""Label of a position no loss reads (PyTorch's cross-entropy default)."""


def pad_rows(rows: Sequence[Sequence[int] | torch.Tensor], value: int) -> torch.Tensor:
    """[len(rows), longest] long tensor: each row left-aligned, the rest `value`."""
    out = np.full((len(rows), max((len(r) for r in rows), default=0)), value, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out)


def attention_mask(rows: Sequence[Sequence[int] | torch.Tensor]) -> torch.Tensor:
    """[len(rows), longest] 1 for each row's tokens, 0 for the padding `pad_rows` adds."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    longest = int(lengths.max()) if len(rows) else 0
    return (torch.arange(longest)[None, :] < lengths[:, None]).long()


PIXEL_INPUTS = {"pixel_values": normalize_uint8, "codebook_pixels": lambda x, mean, std: map_uint8(x)}
"""Fields that the loader fills with uint8 pixels (4x smaller than floats, to the device and
across processes) and how `to` turns them into the model's inputs there (the model's pixel
statistics given)."""


COUNTS = {"masked_patches": ("patch_mask", lambda t: t.count_nonzero()),
          "masked_tokens": ("mlm_labels", lambda t: (t != IGNORE_INDEX).sum()),
          "text_tokens": ("attention_mask", lambda t: t.count_nonzero())}
"""Count fields, the field each counts in, and how: `to` reads them from the host tensors, so
that the losses know their sizes on a device without reading it back (`flava.syncs`)."""


class _Batch:
    def to(self, device: torch.device | str, non_blocking: bool = False, mean: Stats = CLIP_MEAN,
           std: Stats = CLIP_STD):
        """The batch on `device`, uint8 pixels turned into model inputs there, normalised by the
        model's `mean`/`std` (its config's image_mean/image_std). Fields holding one host tensor
        (the codebook reading the model's own pixels) are copied once. Counts (`COUNTS`) are read
        from the tensors while they are still on the host."""
        names = {f.name for f in fields(self)}
        out = {name: int(count(getattr(self, source))) for name, (source, count) in COUNTS.items()
               if name in names and getattr(self, source).device.type == "cpu"}
        moved: dict[int, torch.Tensor] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, torch.Tensor):
                continue
            if id(value) not in moved:
                moved[id(value)] = value.to(device, non_blocking=non_blocking)
            value = moved[id(value)]
            if value.dtype == torch.uint8 and f.name in PIXEL_INPUTS:
                value = PIXEL_INPUTS[f.name](value, mean, std)
            out[f.name] = value
        return replace(self, **out)

    def pin_memory(self):
        """The batch with its tensors in page-locked memory (for asynchronous copies to a GPU);
        shared tensors stay shared."""
        pinned: dict[int, torch.Tensor] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor) and id(value) not in pinned:
                pinned[id(value)] = value.pin_memory()
        return replace(self, **{f.name: pinned[id(getattr(self, f.name))] for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def __len__(self) -> int:
        return next(getattr(self, f.name) for f in fields(self)).shape[0]

    def rows(self, index: slice):
        """The batch of rows `index`: views of every tensor field, and no counts (`COUNTS`; the
        whole batch's would be wrong: `to` reads the part's from host tensors)."""
        names = {f.name for f in fields(self)}
        return replace(self, **{n: getattr(self, n)[index] for n in names if isinstance(getattr(self, n), torch.Tensor)},
                       **{n: None for n in COUNTS if n in names})


@dataclass
class PairBatch(_Batch):
    """Image-text pairs: contrastive, ITM and MMM."""

    pixel_values: torch.Tensor
    """[B, C, H, W] normalised images (uint8 pixels on the host, normalised by `to`)."""
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
    """[B, C, 8g, 8g] the same crop for the image codebook, in its input range (uint8 on the
    host, mapped by `to`)."""
    image_targets: torch.Tensor | None = None
    """[B, num_patches] image token ids, if already computed (else the codebook makes them)."""
    masked_patches: int | None = None
    """How many patches `patch_mask` masks in all (filled in by `to`)."""
    masked_tokens: int | None = None
    """How many positions `mlm_labels` labels in all (filled in by `to`)."""
    text_tokens: int | None = None
    """How many real tokens `attention_mask` holds in all (filled in by `to`)."""


@dataclass
class ImageBatch(_Batch):
    """Images alone: MIM."""

    pixel_values: torch.Tensor
    patch_mask: torch.Tensor
    codebook_pixels: torch.Tensor | None = None
    image_targets: torch.Tensor | None = None
    masked_patches: int | None = None


@dataclass
class TextBatch(_Batch):
    """Text alone: MLM."""

    masked_input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mlm_labels: torch.Tensor
    masked_tokens: int | None = None
    text_tokens: int | None = None
