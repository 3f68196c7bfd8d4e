"""The SigLIP-style sigmoid image-text loss (objectives.contrastive = "sigmoid"): its definition,
its initialisation, two gloo processes equal to one process with the whole batch, and how it
sits beside the transformers bridge and export."""

import math

import pytest
import torch
import torch.nn.functional as F

import flava
from flava.config import ObjectivesConfig, from_dict, to_dict
from flava.errors import ConfigError
from flava.loading import pretraining_from_checkpoint, read_checkpoint
from flava.interop.bridge import pretraining_losses
from flava.interop.export import export_hf
from flava.objectives.losses import SigmoidContrastiveHead, sigmoid_contrastive_loss
from flava.objectives.pretraining import PretrainingModel
from conftest import free_port, gloo_group
from zygote import Results, spawn
from test_objectives import pair_batch, tiny_config


def brute_force(img, txt, t, b):
    """Zhai et al., Algorithm 1, one pair at a time."""
    n, total = img.shape[0], 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total += -math.log(1 / (1 + math.exp(-z * (t * float(img[i] @ txt[j]) + b))))
    return total / n


def test_loss_is_siglip_and_starts_as_the_paper_does():
    head = SigmoidContrastiveHead()
    assert head.logit_scale.exp().item() == torch.tensor(10.0).item() and head.logit_bias.item() == -10.0
    g = torch.Generator().manual_seed(0)
    img, txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1), F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    with torch.no_grad():
        head.logit_scale.fill_(math.log(3.0))
        head.logit_bias.fill_(-1.5)
    got = sigmoid_contrastive_loss(img, txt, head)
    assert abs(got.loss.item() - brute_force(img, txt, 3.0, -1.5)) < 1e-5
    assert torch.equal(got.labels, torch.arange(6))


def _worker(rank, world, port, img, txt, results):
    import torch.distributed as dist

    with gloo_group(rank, world, port):
        B = img.shape[0] // world
        i = img[rank * B:(rank + 1) * B].clone().requires_grad_()
        t = txt[rank * B:(rank + 1) * B].clone().requires_grad_()
        head = SigmoidContrastiveHead()
        res = sigmoid_contrastive_loss(F.normalize(i, dim=-1), F.normalize(t, dim=-1), head)
        res.loss.backward()
        # DDP averages gradients over processes: do the same for the shared temperature and bias.
        shared = torch.cat([head.logit_scale.grad, head.logit_bias.grad])
        dist.all_reduce(shared)
        results[rank] = (res.loss.detach(), i.grad, t.grad, shared / world, res.labels)


@pytest.mark.distributed
def test_two_processes_equal_one_process_with_the_whole_batch():
    world, B, D = 2, 5, 16
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(world * B, D, generator=g), torch.randn(world * B, D, generator=g)
    results = Results()
    spawn(_worker, (world, free_port(), img, txt, results), world)

    i, t, head = img.clone().requires_grad_(), txt.clone().requires_grad_(), SigmoidContrastiveHead()
    one = sigmoid_contrastive_loss(F.normalize(i, dim=-1), F.normalize(t, dim=-1), head)
    one.loss.backward()
    losses = torch.stack([results[r][0] for r in range(world)])
    torch.testing.assert_close(losses.mean(), one.loss, atol=1e-5, rtol=0)
    # Averaged as DDP averages them, the processes' gradients are the one-process gradients.
    torch.testing.assert_close(torch.cat([results[r][1] for r in range(world)]) / world, i.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.cat([results[r][2] for r in range(world)]) / world, t.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(results[0][3], torch.cat([head.logit_scale.grad, head.logit_bias.grad]),
                               atol=1e-5, rtol=1e-6)
    assert torch.equal(results[1][4], torch.arange(B, 2 * B))


def test_pretraining_model_trains_the_sigmoid_loss_and_its_head(tmp_path):
    cfg = tiny_config()
    torch.manual_seed(0)
    objectives = ObjectivesConfig(contrastive="sigmoid")
    pm = PretrainingModel(cfg, objectives, codebook=flava.FlavaImageCodebook(cfg.codebook))
    out = pm(pair_batch(cfg), torch.Generator().manual_seed(1))
    assert set(out.losses.named()) == {"sigmoid_contrastive", "itm", "mmm_image", "mmm_text"}
    out.losses.total.backward()
    head = pm.heads.sigmoid_contrastive
    assert head.logit_scale.grad is not None and head.logit_bias.grad is not None
    assert pm.model.logit_scale.grad is None  # the softmax temperature is not used
    assert 0 <= out.metrics["contrastive_top1"] <= 1

    # The transformers bridge has no such loss and leaves it out; the export drops its head.
    b = pair_batch(cfg)
    bridged = pretraining_losses(pm, input_ids=b.input_ids, attention_mask=b.attention_mask,
                                 pixel_values=b.pixel_values, bool_masked_pos=b.patch_mask,
                                 codebook_pixel_values=b.codebook_pixels)
    assert "mmm_image" in bridged and "global_contrastive" not in bridged
    pm.save_pretrained(tmp_path / "ckpt")
    back = flava.load(tmp_path / "ckpt", pretraining=True)
    assert back.objectives.contrastive == "sigmoid"
    assert torch.equal(back.heads.sigmoid_contrastive.logit_bias, head.logit_bias)
    notes = export_hf(read_checkpoint(tmp_path / "ckpt"), tmp_path / "hf")
    assert any("sigmoid_contrastive" in n for n in notes)


def test_a_bad_choice_is_named_with_the_choices():
    try:
        from_dict(ObjectivesConfig, {**to_dict(ObjectivesConfig()), "contrastive": "sigmoidal"}, "objectives")
    except ConfigError as e:
        assert "objectives.contrastive 'sigmoidal'" in str(e) and "'softmax', 'sigmoid'" in str(e)
        assert "did you mean 'sigmoid'" in str(e)
    else:
        raise AssertionError("an unknown contrastive kind was accepted")


def test_a_checkpoint_of_the_other_kind_initialises_what_it_can(tmp_path):
    cfg = tiny_config()
    torch.manual_seed(0)
    softmax = PretrainingModel(cfg, ObjectivesConfig())
    softmax.save_pretrained(tmp_path / "softmax")
    pm, notes = pretraining_from_checkpoint(read_checkpoint(tmp_path / "softmax"), ObjectivesConfig(contrastive="sigmoid"))
    assert any("no sigmoid_contrastive head" in n for n in notes)
    assert torch.equal(pm.heads.itm.classifier.weight, softmax.heads.itm.classifier.weight)
    pm.save_pretrained(tmp_path / "sigmoid")
    back, notes = pretraining_from_checkpoint(read_checkpoint(tmp_path / "sigmoid"), ObjectivesConfig())
    assert any("sigmoid_contrastive head(s) are not used" in n for n in notes)
    assert torch.equal(back.heads.mim.decoder.weight, softmax.heads.mim.decoder.weight)
