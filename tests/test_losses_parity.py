"""Every loss against transformers' FlavaForPreTraining on the same weights, masks and labels."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import hf_config, randomize_, require

import flava
from flava.data.batch import ImageBatch, PairBatch, TextBatch
from flava.interop.bridge import pretraining_losses
from flava.data.masking import BlockMasking

transformers = require("transformers")

CONFIGS = {
    "plain": hf_config(),
    "weighted-tanh": hf_config(
        image=dict(hidden_act="gelu_new", qkv_bias=False, image_size=48, patch_size=16, vocab_size=30),
        text=dict(hidden_act="gelu_new", num_hidden_layers=3),
        multimodal=dict(num_hidden_layers=2),
        mim_weight=0.5, mlm_weight=2.0, itm_weight=0.25, global_contrastive_weight=1.5, mmm_image_weight=0.7,
        mmm_text_weight=1.3,
    ),
    # A codebook of fewer tokens than the heads predict: transformers takes it, and so must a load.
    "small-codebook": hf_config(codebook=dict(vocab_size=16)),
}


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.fixture(params=list(CONFIGS))
def pair(request, tmp_path):
    ref = randomize_(transformers.FlavaForPreTraining(CONFIGS[request.param]), seed=11)
    ref.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = flava.load(tmp_path, pretraining=True).eval()
    return ref, ours


def make_inputs(ref, B=4, L=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ic, tc = ref.config.image_config, ref.config.text_config
    grid = ic.image_size // ic.patch_size
    pixels = torch.randn(B, 3, ic.image_size, ic.image_size, generator=g)
    ids = torch.randint(5, tc.vocab_size, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    for i in range(1, B):
        mask[i, L - 2 * i:] = 0
        ids[i, L - 2 * i:] = 0
    chosen = (torch.rand(B, L, generator=g) < 0.3) & (mask == 1)
    chosen[:, 1] = True
    masked_ids = ids.masked_fill(chosen, 3)
    mlm_labels = ids.masked_fill(~chosen, -100)
    masking = BlockMasking.for_grid(grid)
    patch_mask = torch.from_numpy(np.stack([masking(np.random.default_rng(seed + i)).reshape(-1) for i in range(B)]))
    mim_labels = torch.randint(0, ic.vocab_size, (B, grid * grid), generator=g)
    codebook_pixels = torch.rand(B, 3, 8 * grid, 8 * grid, generator=g)
    return dict(pixels=pixels, ids=ids, mask=mask, masked_ids=masked_ids, mlm_labels=mlm_labels,
                patch_mask=patch_mask, mim_labels=mim_labels, codebook_pixels=codebook_pixels)


def pair_kwargs(x, **extra):
    return dict(input_ids=x["ids"], input_ids_masked=x["masked_ids"], attention_mask=x["mask"],
                pixel_values=x["pixels"], bool_masked_pos=x["patch_mask"], mlm_labels=x["mlm_labels"], **extra)


def reference(ref, **kw):
    with torch.no_grad():
        info = ref(**kw, return_loss=True).loss_info
    return {k: v for k, v in info.items() if v is not None}


def compare(ref, ours, **kw):
    snapshot = {k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        got = pretraining_losses(ours, **kw)
    for k, v in kw.items():  # our bridge leaves its inputs alone
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, snapshot[k]), k
    want = reference(ref, **{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
    assert set(got) == set(want), (set(got), set(want))
    for k in want:
        close(got[k], want[k])
    return got


def test_pair_losses_with_itm_negatives(pair):
    ref, ours = pair
    x = make_inputs(ref)
    got = compare(ref, ours, **pair_kwargs(x, mim_labels=x["mim_labels"], itm_labels=torch.tensor([1, 0, 1, 0])))
    assert set(got) == {"itm", "global_contrastive", "mmm_image", "mmm_text"}


def test_pair_losses_with_targets_from_the_codebook(pair):
    ref, ours = pair
    x = make_inputs(ref, seed=1)
    compare(ref, ours, **pair_kwargs(x, codebook_pixel_values=x["codebook_pixels"],
                                     itm_labels=torch.ones(4, dtype=torch.long)))


def test_no_matching_pair_keeps_every_row(pair):
    ref, ours = pair
    x = make_inputs(ref, seed=2)
    compare(ref, ours, **pair_kwargs(x, mim_labels=x["mim_labels"], itm_labels=torch.zeros(4, dtype=torch.long)))


def test_unimodal_losses(pair):
    ref, ours = pair
    x = make_inputs(ref, seed=3)
    got = compare(ref, ours, pixel_values=x["pixels"], bool_masked_pos=x["patch_mask"], mim_labels=x["mim_labels"])
    assert set(got) == {"mim"}
    got = compare(ref, ours, input_ids_masked=x["masked_ids"], attention_mask=x["mask"], mlm_labels=x["mlm_labels"])
    assert set(got) == {"mlm"}


def test_native_batches_equal_transformers(pair):
    """PretrainingModel.forward on typed batches gives transformers' losses (no ITM negatives)."""
    ref, ours = pair
    ours.objectives.itm_negative_probability = 0.0
    x = make_inputs(ref, seed=4)
    batch = PairBatch(x["pixels"], x["ids"], x["mask"], x["patch_mask"], x["masked_ids"], x["mlm_labels"],
                      image_targets=x["mim_labels"])
    want = reference(ref, **pair_kwargs(x, mim_labels=x["mim_labels"].clone(),
                                        itm_labels=torch.ones(4, dtype=torch.long)))
    with torch.no_grad():
        got = ours(batch)
    assert set(got.losses.named()) == set(want)
    for k, v in got.losses.named().items():
        close(v, want[k])
    close(got.losses.total, sum(want.values()))

    with torch.no_grad():
        mim = ours(ImageBatch(x["pixels"], x["patch_mask"], codebook_pixels=x["codebook_pixels"])).losses
        mlm = ours(TextBatch(x["masked_ids"], x["mask"], x["mlm_labels"])).losses
    close(mim.mim, reference(ref, pixel_values=x["pixels"], bool_masked_pos=x["patch_mask"],
                             codebook_pixel_values=x["codebook_pixels"])["mim"])
    close(mlm.mlm, reference(ref, input_ids_masked=x["masked_ids"], attention_mask=x["mask"],
                             mlm_labels=x["mlm_labels"])["mlm"])
    assert mim.named().keys() == {"mim"} and mlm.named().keys() == {"mlm"}


def test_contrastive_logits_are_float32_under_autocast():
    # At a scale of 100, bfloat16 logits are off by about a tenth; the loss must not round them.
    import math

    from flava.objectives.losses import SigmoidContrastiveHead, global_contrastive_loss, sigmoid_contrastive_loss

    g = torch.Generator().manual_seed(0)
    img, txt = (F.normalize(torch.randn(64, 32, generator=g), dim=-1) for _ in range(2))
    scale = torch.tensor(math.log(100.0))
    head = SigmoidContrastiveHead(scale=math.log(100.0))
    want = global_contrastive_loss(img, txt, scale), sigmoid_contrastive_loss(img, txt, head)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = global_contrastive_loss(img, txt, scale), sigmoid_contrastive_loss(img, txt, head)
    for w, r in zip(want, got):
        assert r.logits_per_image.dtype == torch.float32
        torch.testing.assert_close(r.logits_per_image, w.logits_per_image, rtol=0, atol=1e-5)
        torch.testing.assert_close(r.loss, w.loss, rtol=0, atol=1e-6)
