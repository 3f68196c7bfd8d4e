"""The synthetic pair batch the step benchmarks share: random pixels and codebook pixels,
captions of 8 to L tokens (CLS ... SEP, padded), BERT masking and BEiT block masks, all seeded."""

from __future__ import annotations

import numpy as np
import torch

from flava.data.batch import PairBatch
from flava.data.masking import BlockMasking, TextMasking, mask_texts


def pair_batch(cfg, batch: int, length: int = 32, seed: int = 0) -> PairBatch:
    """A batch of `batch` pairs for model config `cfg`, on the CPU, with codebook pixels."""
    rng, g = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    s, cs = cfg.image.image_size, cfg.codebook_image_size
    pixels = torch.randn(batch, 3, s, s, generator=g)
    codebook_pixels = torch.rand(batch, 3, cs, cs, generator=g)
    lengths = torch.randint(8, length + 1, (batch,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = torch.randint(1000, cfg.text.vocab_size, (batch, length), generator=g) * mask
    ids[:, 0], ids[torch.arange(batch), lengths - 1] = 101, 102
    masked_ids, mlm_labels = mask_texts(TextMasking(vocab_size=cfg.text.vocab_size), ids, rng)
    blocks = BlockMasking.for_grid(cfg.image.grid_size)
    patch_mask = torch.from_numpy(np.stack([blocks(rng).reshape(-1) for _ in range(batch)]))
    return PairBatch(pixels, ids, mask, patch_mask, masked_ids, mlm_labels, codebook_pixels=codebook_pixels)
