"""Masking statistics over many draws match the specification."""

import numpy as np
import pytest
import torch

from flava.data.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID, TextTokenizer
from flava.data.masking import IGNORE_INDEX, BlockMasking, TextMasking, mask_texts


def test_block_masking_on_the_paper_grid():
    masking = BlockMasking()
    rng = np.random.default_rng(0)
    counts = []
    for _ in range(2000):
        blocks = []
        mask = masking(rng, blocks)
        counts.append(int(mask.sum()))
        union = np.zeros_like(mask)
        for top, left, h, w in blocks:
            assert h * w >= 16, (h, w)
            assert 0.3 - 1e-9 <= h / w <= 1 / 0.3 + 1e-9, (h, w)
            union[top: top + h, left: left + w] = True
        assert (union == mask).all()
    counts = np.array(counts)
    assert counts.max() == 75
    assert counts.mean() > 74.5  # the target ratio 75/196, met exactly in most draws
    assert (counts == 75).mean() > 0.8


def mask_images(masking: BlockMasking, batch: int, rng: np.random.Generator) -> torch.Tensor:
    return torch.from_numpy(np.stack([masking(rng).reshape(-1) for _ in range(batch)]))


def test_block_masking_scales_with_the_grid_and_is_seeded():
    small = BlockMasking.for_grid(8)
    assert (small.num_masked, small.min_block) == (24, 5)
    big = BlockMasking.for_grid(30)  # 480 px / patch 16
    assert big.num_masked == round(75 / 196 * 900)
    a = mask_images(small, 6, np.random.default_rng(1))
    b = mask_images(small, 6, np.random.default_rng(1))
    assert a.shape == (6, 64) and a.dtype == torch.bool and torch.equal(a, b)
    assert not torch.equal(a, mask_images(small, 6, np.random.default_rng(2)))


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer(max_length=64)


def test_text_masking_rates_and_specials(tokenizer):
    masking = TextMasking.from_tokenizer(tokenizer)
    rng = np.random.default_rng(0)
    ids = rng.integers(999, tokenizer.vocab_size, size=(4000, 30))
    ids[:, 0], ids[:, -1] = CLS_ID, SEP_ID
    ids[::2, 20:] = PAD_ID
    ids[::2, 19] = SEP_ID
    masked, labels = mask_texts(masking, torch.from_numpy(ids), rng)
    chosen = labels != IGNORE_INDEX
    special = torch.from_numpy(np.isin(ids, [PAD_ID, CLS_ID, SEP_ID]))
    assert not (chosen & special).any()
    assert torch.equal(masked[special], torch.from_numpy(ids)[special])
    assert abs(chosen.sum() / (~special).sum() - 0.15) < 0.005
    assert torch.equal(labels[chosen], torch.from_numpy(ids)[chosen])
    n = chosen.sum().item()
    to_mask = (masked[chosen] == MASK_ID).sum().item() / n
    kept = (masked[chosen] == torch.from_numpy(ids)[chosen]).sum().item() / n
    assert abs(to_mask - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(1 - to_mask - kept - 0.1) < 0.01
    assert (masked[chosen & (masked != MASK_ID)] >= 999).all()
    assert not ((labels == IGNORE_INDEX) & (masked != torch.from_numpy(ids))).any()


def test_whole_word_masking_keeps_words_together(tokenizer):
    masking = TextMasking.from_tokenizer(tokenizer, whole_word=True, probability=0.3)
    text = "unbelievably photogenic hyperparameters tokenization of unaffordable skyscrapers " * 3
    ids = np.array(tokenizer.encode([text])[0])
    cont = masking.continuation[ids]
    assert cont.any()
    rng = np.random.default_rng(0)
    for _ in range(200):
        _, labels = masking(ids, rng)
        chosen = labels != IGNORE_INDEX
        for i in np.flatnonzero(cont):
            assert chosen[i] == chosen[i - 1]  # a continuation follows its word's previous piece
    a = masking(ids, np.random.default_rng(5))
    b = masking(ids, np.random.default_rng(5))
    assert all((x == y).all() for x, y in zip(a, b))


def test_a_small_ratio_masks_its_patches_though_they_make_no_block_of_the_papers_least_size():
    # 5 % of a 14x14 grid is 10 patches, under the scaled least block (16): no block fitted, and
    # MIM/MMM measured nothing on every sample.
    rng = np.random.default_rng(0)
    for grid, ratio, want in ((14, 0.05, 10), (8, 0.02, 1)):
        masking = BlockMasking.for_grid(grid, ratio)
        assert all(int(masking(rng).sum()) == want for _ in range(20)), (grid, ratio)
