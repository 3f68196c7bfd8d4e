"""A new model's weights: Normal(0, init_std) truncated to ±2 std (drawn by the inverse CDF, not by
torch's rejection sampling), zero biases, unit LayerNorms."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import flava
from flava.config import preset
from flava.model.flava import trunc_normal_


def test_the_truncated_normal_is_the_distribution_torch_samples():
    std, n = 0.02, 400_000
    torch.manual_seed(0)
    ours = trunc_normal_(torch.empty(n), std)
    torch.manual_seed(0)
    assert torch.equal(trunc_normal_(torch.empty(n), std), ours)  # a function of the seed
    theirs = nn.init.trunc_normal_(torch.empty(n), std=std, a=-2 * std, b=2 * std)
    # The bounds come from the CDF, not from clamping a wider draw: no mass piles up at ±2 std.
    assert (ours.abs() >= 2 * std * (1 - 1e-6)).sum() <= 2
    # Kolmogorov-Smirnov below its 1 % critical value, against the exact law and against torch's draw.
    critical = 1.63 / math.sqrt(n)
    assert stats.kstest(ours.numpy() / std, stats.truncnorm(-2, 2).cdf).statistic < critical
    assert stats.ks_2samp(ours.numpy(), theirs.numpy()).statistic < critical * math.sqrt(2)
    assert ours.std().item() == pytest.approx(std * stats.truncnorm(-2, 2).std(), rel=5e-3)


def test_a_new_model_is_initialised_as_flava_is():
    cfg = preset("tiny")
    std = cfg.init_std
    model = flava.FlavaModel(cfg)
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding))]
    flat = torch.cat([w.detach().flatten() for w in weights])
    assert flat.abs().max() <= 2 * std and flat.std().item() == pytest.approx(
        std * stats.truncnorm(-2, 2).std(), rel=1e-2)
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            assert not m.bias.any()
        if isinstance(m, nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()
    tokens = torch.cat([p.detach().flatten() for p in model.image_encoder.token_parameters() if p is not None])
    assert tokens.abs().max() <= 2 * std and tokens.std() > std / 2  # drawn, not left at zero
    assert np.isclose(model.logit_scale.item(), cfg.logit_scale_init)
