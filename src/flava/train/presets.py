"""Training presets and the scaling of the paper's optimisation to the batch a run trains with.

`--config small` and `--config base` train with the paper's optimisation (Table A.1: AdamW, lr
1e-3, weight decay 0.1, betas (0.9, 0.999), 10,000 warm-up updates, warm-up then cosine, global
batch 8,192; B.1: PMD drawn 150k times at p = 0.70, so about 214k updates), which are
`OptimConfig`'s and `TrainConfig`'s defaults. `--config tiny` (and `flava pretrain` with no
`--config`) is the CPU demo's: its own rate, warm-up and length, tuned on the demo data
(BENCHMARKS.md), used as given.

How a run's global batch B (processes x data.batch_size x optim.grad_accumulation) changes the
paper's numbers, when `optim.reference_batch` is set (the paper's 8,192):

- the learning rate follows the square root of B / 8,192 (never above the paper's rate). Adam's
  update is normalised per coordinate, so the noise in a step shrinks with the square root of the
  batch, not linearly: the square-root rule keeps the training dynamics alike across batches
  (Malladi et al., 2022, "On the SDEs and scaling rules for adaptive gradient algorithms"; Hoffer
  et al., 2017), whereas the linear rule (Goyal et al., 2017) is SGD's and, at the 32-256 sample
  batches of one machine, would cut the rate 32-256 fold where sqrt cuts it 6-16 fold. Above
  8,192 the paper's rate is kept: it reports 1e-3 as already the large rate that needs the long
  warm-up and weight decay to not diverge.
- the warm-up spans the paper's number of warm-up samples (10,000 x 8,192), now ceil(81.92M / B)
  steps, but at most the share of the run the paper warms up for (10,000 of its ~214k updates):
  at small batches the sample rule alone would warm up for longer than any run a machine makes,
  and the rate would never reach its peak.
- max_steps is the run's own (`--max-steps`); the cosine decays over it.

The run prints what it trains with at the start (`Optimisation.note`).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path

from ..config import PRESETS, from_dict, preset, to_dict
from ..errors import ConfigError
from ..io.files import read_json
from .config import OptimConfig, TrainConfig

PAPER_BATCH = 8192
PAPER_WARMUP = 10_000
PAPER_STEPS = round(150_000 / 0.70)
"""The paper's updates: PMD drawn for 150k of them at sampling probability 0.70 (B.1, Table A.2)."""
WARMUP_SHARE = PAPER_WARMUP / PAPER_STEPS

# The CPU demo's settings (tiny preset, demo data): measured in BENCHMARKS.md; the demo and its
# figures depend on them, so they change only with a new measurement.
DEMO_LR = 5e-4
DEMO_WARMUP_STEPS = 50
DEMO_MAX_STEPS = 400
DEMO_BATCH_SIZE = 32
DEMO_DINO = {
    # K near the teacher rows a step sees (64) rather than 65,536, and a teacher that follows the
    # student within a few hundred steps (0.996 -> 1 moves it a third of the way in 200 steps).
    "out_dim": 1024, "momentum_teacher": 0.99,
    # Sharper teacher targets than 0.04: at 0.04 the untrained teacher's centred outputs are nearly
    # uniform and stay so (log K).
    "teacher_temp": 0.02, "warmup_teacher_temp": 0.02,
    # One epoch here (155 steps) is a quarter of the run: the last layer learns from the start; the
    # center starts at the first batch's mean instead of learning it while the student moves.
    "freeze_last_layer": 0, "center_warm_start": True,
    # The demo's 64 px images have no detail a 24 px local crop of 5-40 % could match across views:
    # two global crops, over a wider range of scales (as DINO advises without local crops).
    "local_crops": 0, "global_crop_scale_min": 0.3,
}
"""DINO at the demo's scale (tiny preset, demo images, batch 32; measured in BENCHMARKS.md)."""
DEMO_DINO_STEPS = 600
"""Steps of the DINO stage at the demo's scale that learn (BENCHMARKS.md: 300 do not yet)."""


def demo_config(**fields) -> TrainConfig:
    """The CPU demo's training settings (the tiny preset): `fields` set top-level fields."""
    cfg = TrainConfig(model=preset("tiny"), max_steps=DEMO_MAX_STEPS)
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.reference_batch = DEMO_LR, DEMO_WARMUP_STEPS, 0
    cfg.data.batch_size = DEMO_BATCH_SIZE
    for k, v in DEMO_DINO.items():
        setattr(cfg.dino, k, v)
    for k, v in fields.items():
        setattr(cfg, k, v)
    return cfg


def model_settings(spec: str):
    """The model `--config` names for a command that trains no FLAVA model (train-codebook, prepare,
    init): a preset, a model's config file, or a pretraining settings file, whose model (over its
    preset's) is taken, so one file serves pretrain and these alike."""
    from ..config import config_from

    if str(spec).lower().endswith(".json") and Path(spec).is_file():
        data = read_json(spec, "settings file", ConfigError)
        # Keys no model config has; a checkpoint's config.json holds its model under "model" too.
        if isinstance(data, dict) and ("preset" in data or "model" in data) and data.get("format") != "flava":
            return train_config(spec).model
    return config_from(spec)


def train_config(spec: str) -> TrainConfig:
    """Training settings from a preset name (tiny: the demo's; small, base: the paper's
    optimisation with that model) or a JSON file of settings over the preset its "preset" key
    names (without one, the settings it leaves out are the paper's: the base model)."""
    if spec == "tiny":
        return demo_config()
    if spec in PRESETS:
        return TrainConfig(model=preset(spec))
    if not Path(spec).exists() and Path(spec).suffix.lower() != ".json":
        close = difflib.get_close_matches(spec, PRESETS, n=1)
        raise ConfigError(f"--config {spec} is neither a preset ({', '.join(PRESETS)}) nor a settings file"
                          + (f"; did you mean {close[0]!r}?" if close else ""))
    if Path(spec).is_dir():
        # A run's folder names its settings file: say it, and how to continue that run instead.
        own = Path(spec) / "train_config.json"
        hint = f" (a run's: --config {own} starts a new run with them; --resume --output {spec} continues it)" \
            if own.is_file() else ""
        raise ConfigError(f"--config {spec} is a directory: name a preset ({', '.join(PRESETS)}) or a JSON settings "
                          f"file{hint}")
    data = read_json(spec, "settings file", ConfigError, expect=dict)
    base = data.pop("preset", None)
    if base is None:
        return from_dict(TrainConfig, data)
    if base not in PRESETS:
        raise ConfigError(f"{spec}: preset {base!r} is not one of {', '.join(PRESETS)}")
    return from_dict(TrainConfig, _merged(to_dict(train_config(base)), data))


def _merged(base: dict, over: dict) -> dict:
    """`over`'s values in `base`, section by section."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class Optimisation:
    """The rate and warm-up a run trains with, and a sentence saying how they were chosen."""

    lr: float
    warmup_steps: int
    note: str


def scaled_optimisation(optim: OptimConfig, global_batch: int, max_steps: int) -> Optimisation:
    """`optim`'s lr and warm-up as given (reference_batch 0), or scaled from its reference batch
    to `global_batch` as the module docstring says."""
    if not optim.reference_batch:
        return Optimisation(optim.lr, optim.warmup_steps, "")
    ref = optim.reference_batch
    lr = optim.lr * min(1.0, math.sqrt(global_batch / ref))
    by_samples = math.ceil(optim.warmup_steps * ref / global_batch)
    cap = math.ceil(WARMUP_SHARE * max_steps)
    warmup = min(by_samples, cap)
    why = (f"the same {optim.warmup_steps * ref:,} warm-up samples" if warmup == by_samples else
           f"{WARMUP_SHARE:.1%} of the {max_steps:,}-step run, the paper's share"
           + (f", rounded up to {cap / max_steps:.0%}" if cap / max_steps > 1.5 * WARMUP_SHARE else "")
           + f"; its {optim.warmup_steps * ref:,} warm-up samples would take {by_samples:,} steps")
    note = (f"optimisation: AdamW with lr {optim.lr:g} and {optim.warmup_steps:,} warm-up steps given for a global "
            f"batch of {ref:,}, scaled to this run's {global_batch:,}: lr {lr:.3g} (x sqrt({global_batch:,}/{ref:,})"
            + (", capped at the given rate" if global_batch > ref else "") + f"), warm-up {warmup:,} steps ({why}), "
            f"then cosine to {optim.min_lr_ratio:g} x lr over {max_steps:,} steps; weight decay {optim.weight_decay:g}, "
            f"betas ({optim.beta1:g}, {optim.beta2:g}). Set optim.reference_batch=0 to use lr and warmup_steps as given")
    return Optimisation(lr, warmup, note)
