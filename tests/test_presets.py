"""Training presets: `--config base` and `small` train with the paper's optimisation scaled to the
run's global batch and say so; the demo's settings (tiny, the default) are used as given."""

import math

import pytest
from conftest import pretrain_args

from flava.cli import main as cli
from flava.config import preset, settings
from flava.train.presets import PAPER_STEPS, demo_config, scaled_optimisation, train_config


def test_base_and_small_take_the_papers_optimisation():
    for name in ("base", "small"):
        cfg = train_config(name)
        o = cfg.optim
        assert (o.lr, o.warmup_steps, o.weight_decay, o.beta1, o.beta2, o.reference_batch) == \
            (1e-3, 10_000, 0.1, 0.9, 0.999, 8192)
        assert cfg.max_steps == PAPER_STEPS == 214_286 and cfg.data.mixing == [0.70, 0.15, 0.15]
    assert train_config("base").model == preset("base")


def test_the_papers_rate_and_warm_up_follow_the_global_batch():
    o = train_config("base").optim
    at_paper = scaled_optimisation(o, 8192, PAPER_STEPS)
    assert (at_paper.lr, at_paper.warmup_steps) == (1e-3, 10_000)
    # One machine's batch: the rate by the square root of the batch ratio; the warm-up's 81.92M
    # samples would be 640,000 steps, so it keeps the paper's share of the run.
    small = scaled_optimisation(o, 128, PAPER_STEPS)
    assert small.lr == pytest.approx(1e-3 * math.sqrt(128 / 8192))
    assert small.warmup_steps == 10_000
    assert "128" in small.note and "8,192" in small.note and "sqrt" in small.note and "640,000" in small.note
    # A larger batch warms up for the same samples in fewer steps and never exceeds the paper's rate.
    big = scaled_optimisation(o, 16384, PAPER_STEPS)
    assert (big.lr, big.warmup_steps) == (1e-3, 5_000) and "capped" in big.note
    short = scaled_optimisation(o, 8192, 1000)
    assert short.warmup_steps == math.ceil(1000 * 10_000 / PAPER_STEPS)
    # One step of four is no 4.7% of the run: the note says what the rounding made of it.
    assert "warm-up 1 steps (4.7% of the 4-step run, the paper's share, rounded up to 25%;" in \
        scaled_optimisation(o, 128, 4).note


def test_the_demo_keeps_its_own_settings():
    cfg = train_config("tiny")
    assert settings(cfg) == settings(demo_config())
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.reference_batch, cfg.max_steps, cfg.data.batch_size) == \
        (5e-4, 50, 0, 400, 32)
    plain = scaled_optimisation(cfg.optim, 32, cfg.max_steps)
    assert (plain.lr, plain.warmup_steps, plain.note) == (5e-4, 50, "")


def test_a_run_says_how_it_scaled_the_papers_optimisation(train_data, tmp_path, capsys):
    paper = ["--set", "optim.reference_batch=8192", "--set", "optim.lr=1e-3", "--set", "optim.warmup_steps=10000"]
    assert cli(pretrain_args(train_data, tmp_path / "run") + paper + ["--max-steps", "2"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "scaled to this run's 4" in out and f"lr {1e-3 * math.sqrt(4 / 8192):.3g}" in out, out
    assert cli(["config", "show", "--config", "base"]) == 0
    shown = capsys.readouterr().out
    assert "optim.reference_batch" in shown and "8192" in shown
