"""What the image codebook trains on: random resized crops at the codebook's input size, flipped
at random, as uint8 batches from the same streams `flava pretrain` reads (shards, folders,
tables, parquet, prepared shards), and center crops for its fixed evaluation sample.

Every choice is drawn from a generator seeded by (seed, position), as `samples.SampleMaker`
does, so a resumed codebook run sees the same crops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .batch import _Batch
from .samples import merge_batches
from .decode import decode_crop
from .sources import ImageRecord, PairRecord
from .transforms import random_resized_crop_box


@dataclass
class PixelBatch(_Batch):
    """Images alone, as the codebook reads them."""

    pixels: torch.Tensor
    """[B, 3, S, S] uint8 (turn into [0, 1] floats on the device)."""


class CodebookCrops:
    """Records -> crops for the codebook (picklable: it runs in loader workers)."""

    def __init__(self, size: int, seed: int, crop_scale_min: float = 0.35, train: bool = True):
        self.size, self.seed, self.crop_scale_min, self.train = size, seed, crop_scale_min, train

    def __call__(self, kind: str, record, key: tuple[int, ...]) -> torch.Tensor:
        ref = record.image if isinstance(record, (ImageRecord, PairRecord)) else record
        rng = np.random.default_rng([self.seed, *key])

        def choose(width: int, height: int) -> tuple[int, int, int, int]:
            if self.train:
                left, top, w, h = random_resized_crop_box(width, height, rng, (self.crop_scale_min, 1.0))
            else:  # the central square
                w = h = min(width, height)
                left, top = (width - w) // 2, (height - h) // 2
            return left, top, left + w, top + h

        (pixels,) = decode_crop(ref, choose, self.size)
        return pixels.flip(-1) if self.train and rng.random() < 0.5 else pixels

    def collate(self, kind: str, samples: list[torch.Tensor]) -> PixelBatch:
        return PixelBatch(torch.stack(samples))

    def merge(self, parts: list[tuple[list[int], PixelBatch]]) -> PixelBatch:
        return merge_batches(parts, {})
