"""ITM negatives: which (image, text) pairs the multimodal encoder sees, and which of them match.

Drawn over the global batch with a generator that is the same on every process, so N processes
pick exactly the negatives one process with the whole batch would; a negative never has the
same caption text as its image's own. Every shape here is fixed by the batch size, and nothing is
read back from the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.batch import IGNORE_INDEX


@dataclass
class ItmPairs:
    """Which (image, text) pair each multimodal row holds, and whether it matches."""

    image_index: torch.Tensor
    """[R] rows of the image states the multimodal encoder reads."""
    text_index: torch.Tensor
    labels: torch.Tensor
    """[R] 1 for a matched pair, 0 for a negative, IGNORE_INDEX for a row that found no negative
    (it still runs; no loss reads it)."""
    image_offset: int = 0
    """Where this process's own images start in `image_index`'s numbering (global indices)."""
    text_offset: int = 0


def same_text(ids_a: torch.Tensor, mask_a: torch.Tensor, ids_b: torch.Tensor, mask_b: torch.Tensor) -> torch.Tensor:
    """[A, B] True where two texts have the same tokens (padding ignored)."""
    L = max(ids_a.shape[1], ids_b.shape[1])

    def key(ids, mask):
        k = ids.masked_fill(mask == 0, -1)
        return F.pad(k, (0, L - k.shape[1]), value=-1)

    return (key(ids_a, mask_a)[:, None, :] == key(ids_b, mask_b)[None, :, :]).all(-1)


def draw(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """[N] one column per row of [N, M] `weights`, with probability proportional to them (every
    row needs a positive sum). This is `torch.multinomial(weights, 1)`'s own method (the argmax of
    weights over exponential noise), with its draws for the same generator, but without its checks
    of the weights, which read them on the host."""
    noise = torch.empty_like(weights).exponential_(1, generator=generator)
    return (weights / noise).argmax(-1)


def swap_negatives(input_ids: torch.Tensor, attention_mask: torch.Tensor, probability: float,
                   generator: torch.Generator | None = None) -> ItmPairs:
    """The original recipe: with `probability` a pair's caption becomes another pair's caption
    whose text differs (a pair with no differing caption in the batch stays matched)."""
    B = input_ids.shape[0]
    device = input_ids.device
    candidates = ~same_text(input_ids, attention_mask, input_ids, attention_mask)
    flip = torch.rand(B, generator=generator, device=device) < probability
    flip &= candidates.any(1)
    # Rows that stay matched draw a dummy sample.
    drawn = draw(torch.where(flip[:, None], candidates.float(), 1.0), generator)
    rows = torch.arange(B, device=device)
    text_index = torch.where(flip, drawn, rows)
    return ItmPairs(rows, text_index, (~flip).long())


def hard_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, same: torch.Tensor,
                   generator: torch.Generator | None = None, own: slice | None = None) -> ItmPairs:
    """ALBEF: for every image a negative text, for every text a negative image, drawn with
    probability softmax(similarity), never one with the same text.

    `sim_*` and `same` are [G, G] over the global batch, drawn identically on every process;
    `own` keeps the rows this process holds (its positives, its images' negative texts, its
    texts' negative images). Rows are positives, then image->text, then text->image negatives.
    """
    G = sim_i2t.shape[0]
    own = own or slice(0, G)
    rows = torch.arange(G, device=sim_i2t.device)
    mine = rows[own]
    pairs = [(mine, mine, torch.ones_like(mine))]
    for sim, image_side in ((sim_i2t, True), (sim_t2i, False)):
        # Softmax over the allowed candidates alone: the same draws as ALBEF's softmax over all
        # with the true captions zeroed, but at a scale of 100 the latter underflows to zero for
        # every allowed one when a true caption dominates.
        found = (~same).any(1)
        weights = sim.float().masked_fill(same, float("-inf")).softmax(dim=1)
        # A row with nothing to draw (every other text the same) draws a dummy and is labelled
        # to be ignored, so the rows keep their number.
        drawn = draw(torch.where(found[:, None], weights, 1.0), generator)[own]
        labels = torch.where(found[own], 0, IGNORE_INDEX)
        pairs.append((mine, drawn, labels) if image_side else (drawn, mine, labels))
    image_index, text_index, labels = (torch.cat(t) for t in zip(*pairs))
    return ItmPairs(image_index, text_index, labels, own.start, own.start)
