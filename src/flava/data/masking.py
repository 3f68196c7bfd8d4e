"""Masking for MIM/MMM (BEiT block masking of image patches) and MLM/MMM (BERT masking of text).

Both take an explicit `numpy.random.Generator`, so a mask depends only on the seed it was drawn
with: a data loader that seeds per sample reproduces every mask after a restart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .batch import IGNORE_INDEX
from .tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID

# The paper's setting for a 14 x 14 grid (BEiT's): 75 patches in blocks of at least 16.
BASE_GRID = 14
BASE_MASKED = 75
BASE_MIN_BLOCK = 16
CHUNK = 16
"""Block candidates drawn per generator call."""


@dataclass
class BlockMasking:
    """BEiT block masking: rectangles of random area and aspect ratio until the target is met.

    Every rectangle covers at least `min_block` patches with its aspect ratio in
    [min_aspect, max_aspect], and adds at most the patches still missing (it may overlap earlier
    ones). Unlike BEiT, which fills the last few patches with blocks below `min_block`, the last
    rectangles here overlap earlier ones instead; the loop ends when `tries` draws in a row add
    nothing, so a mask never exceeds `num_masked` and almost always equals it.
    """

    grid: int = BASE_GRID
    num_masked: int = BASE_MASKED
    min_block: int = BASE_MIN_BLOCK
    min_aspect: float = 0.3
    max_aspect: float | None = None
    """Defaults to 1 / min_aspect."""
    tries: int = 200

    @classmethod
    def for_grid(cls, grid: int, mask_ratio: float | None = None) -> "BlockMasking":
        """The paper's setting scaled in proportion to another patch grid."""
        n = grid * grid
        ratio = BASE_MASKED / BASE_GRID**2 if mask_ratio is None else mask_ratio
        num_masked = max(1, round(ratio * n))
        # A block no smaller than the patches to mask: past it no block fits, and none were masked.
        return cls(grid=grid, num_masked=num_masked,
                   min_block=min(num_masked, max(1, round(BASE_MIN_BLOCK / BASE_GRID**2 * n))))

    def __post_init__(self) -> None:
        hi = self.max_aspect if self.max_aspect is not None else 1 / self.min_aspect
        self._log_aspect = (math.log(self.min_aspect), math.log(hi))
        if not 0 < self.num_masked <= self.grid**2:
            raise ValueError(f"num_masked must be in [1, {self.grid ** 2}], got {self.num_masked}")
        # _rows[h]: one bit at the start of each of h consecutive rows.
        self._rows = [sum(1 << (r * self.grid) for r in range(h)) for h in range(self.grid + 1)]

    def _add_block(self, mask: int, budget: int, rng: np.random.Generator,
                   blocks: list | None) -> tuple[int, int]:
        """(the mask with one more block, patches it added); the mask is an integer with one bit
        per patch (row-major), so a block's overlap is one popcount."""
        g = self.grid
        lo_aspect, hi_aspect = (math.exp(x) for x in self._log_aspect)
        lo, span = self._log_aspect[0], self._log_aspect[1] - self._log_aspect[0]
        extra = max(0, budget - self.min_block)
        # Candidates come from one generator call per chunk and are judged in plain Python: a
        # mask costs tens of microseconds, which matters at a thousand samples per second.
        for first in range(0, self.tries, CHUNK):
            u = rng.random(4 * min(CHUNK, self.tries - first)).tolist()
            for i in range(0, len(u), 4):
                area = self.min_block + u[i] * extra
                aspect = math.exp(lo + u[i + 1] * span)
                h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
                # Rounding must not break the shape rules: every block keeps >= min_block patches
                # and its aspect ratio in range (small blocks would otherwise round to 1x5 and such).
                if h * w < self.min_block or h > g or w > g or not lo_aspect - 1e-9 <= h / w <= hi_aspect + 1e-9:
                    continue
                top, left = int(u[i + 2] * (g - h + 1)), int(u[i + 3] * (g - w + 1))
                # w bits at `left`, repeated on h rows from `top` (rows do not overlap: left + w <= g).
                block = (((1 << w) - 1) << left) * self._rows[h] << (top * g)
                new = h * w - (mask & block).bit_count()
                if 0 < new <= budget:
                    if blocks is not None:
                        blocks.append((top, left, h, w))
                    return mask | block, new
        return mask, 0

    def __call__(self, rng: np.random.Generator, blocks: list | None = None) -> np.ndarray:
        """A [grid, grid] boolean mask; `blocks` (if a list) receives each (top, left, h, w)."""
        mask, count = 0, 0
        while count < self.num_masked:
            mask, added = self._add_block(mask, self.num_masked - count, rng, blocks)
            if added == 0:
                break
            count += added
        n = self.grid * self.grid
        bits = np.frombuffer(mask.to_bytes((n + 7) // 8, "little"), dtype=np.uint8)
        return np.unpackbits(bits, count=n, bitorder="little").astype(bool).reshape(self.grid, self.grid)


@dataclass
class TextMasking:
    """BERT masking: each ordinary token is chosen with `probability`; a chosen token becomes
    the mask token 80 % of the time, a random ordinary token 10 %, and stays itself 10 %.

    Special tokens and padding are never chosen. With `whole_word`, a word's continuation pieces
    (WordPiece `##...`; see `TextTokenizer.continuation`) are chosen together with its first piece.
    The defaults are BERT uncased's; `from_tokenizer` takes a tokenizer's own ids.
    """

    probability: float = 0.15
    mask_fraction: float = 0.8
    random_fraction: float = 0.1
    whole_word: bool = False
    vocab_size: int = 30522
    random_low: int = 999
    """Without `random_ids`, random replacements are drawn from [random_low, vocab_size): BERT's ordinary tokens."""
    special_ids: tuple[int, ...] = (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID)
    mask_id: int = MASK_ID
    """The id a chosen token becomes 80 % of the time."""
    random_ids: np.ndarray | None = field(default=None, repr=False)
    """The ids random replacements are drawn from (the tokenizer's ordinary tokens), or None."""
    continuation: np.ndarray | None = field(default=None, repr=False)
    """[vocab] True for pieces that continue a word; needed for `whole_word`."""

    def __post_init__(self) -> None:
        # A lookup table (np.isin costs more than the rest of masking a caption); ids past the
        # last special one read its final, ordinary entry.
        self._special = np.zeros(max(self.special_ids) + 2, dtype=bool)
        self._special[list(self.special_ids)] = True
        ids = self.random_ids
        # A contiguous range draws as [random_low, vocab_size) always did: BERT runs keep their masks.
        if ids is not None and len(ids) and ids[-1] - ids[0] + 1 == len(ids):
            self.random_low, self.vocab_size, self.random_ids = int(ids[0]), int(ids[-1]) + 1, None

    @classmethod
    def from_tokenizer(cls, tokenizer, **kwargs) -> "TextMasking":
        """Masking with `tokenizer`'s (a `TextTokenizer`) mask id, special ids and vocabulary."""
        return cls(vocab_size=tokenizer.vocab_size, special_ids=tokenizer.special.all, mask_id=tokenizer.mask_id,
                   random_ids=tokenizer.ordinary_ids(), continuation=tokenizer.continuation(), **kwargs)

    def __call__(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One text's ids (unpadded or padded) -> (masked ids, labels with -100 where unchosen)."""
        ids = np.asarray(ids, dtype=np.int64)
        ordinary = ~self._special[np.minimum(ids, len(self._special) - 1)]
        if self.whole_word:
            if self.continuation is None:
                raise ValueError("whole-word masking needs the vocabulary's continuation table (a WordPiece, "
                                 "byte-level BPE or SentencePiece tokenizer)")
            cont = self.continuation[ids] & ordinary
            word = np.cumsum(~cont) - 1  # word index of every token
            chosen_words = rng.random(word[-1] + 1 if len(ids) else 0) < self.probability
            chosen = ordinary & chosen_words[word]
        else:
            chosen = ordinary & (rng.random(len(ids)) < self.probability)
        labels = np.where(chosen, ids, IGNORE_INDEX)
        r = rng.random(len(ids))
        masked = ids.copy()
        masked[chosen & (r < self.mask_fraction)] = self.mask_id
        randomize = chosen & (r >= self.mask_fraction) & (r < self.mask_fraction + self.random_fraction)
        if self.random_ids is None:
            masked[randomize] = rng.integers(self.random_low, self.vocab_size, int(randomize.sum()))
        else:
            masked[randomize] = self.random_ids[rng.integers(0, len(self.random_ids), int(randomize.sum()))]
        return masked, labels


def mask_texts(masking: TextMasking, input_ids: torch.Tensor, rng: np.random.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row by row over a padded [B, L] batch -> (masked ids, labels)."""
    masked, labels = zip(*(masking(row, rng) for row in input_ids.numpy()))
    return torch.from_numpy(np.stack(masked)), torch.from_numpy(np.stack(labels))
