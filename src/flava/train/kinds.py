"""Which stage a run is and which data kind each of its steps trains: the built-in stages, the
kinds a run trains on (its stage's, less those without data or without a weighted objective),
and the seeded draw of a step's kind."""

from __future__ import annotations

import numpy as np

from ..data.registry import KINDS
from ..errors import ConfigError
from ..objectives.registry import active
from .config import TrainConfig
from .dino import DinoStage
from .pretraining import PretrainingStage
from .stage import Stage

STAGES: dict[str, type[Stage]] = {"joint": PretrainingStage, "text-mlm": PretrainingStage,
                                  "image-mim": PretrainingStage, "image-dino": DinoStage}


def step_kind(seed: int, step: int, kinds: tuple[str, ...], probs: np.ndarray) -> str:
    """The data kind of `step`: the same on every process and after any restart."""
    return kinds[int(np.random.default_rng([seed, step, 7]).choice(len(kinds), p=probs))]


def _check_mask_rates(cfg: TrainConfig, kinds) -> None:
    """A masked-prediction objective at a zero masking rate predicts nothing, step after step."""
    o = cfg.objectives
    for rate in ("image_mask_ratio", "text_mask_probability"):
        idle = [r for r in active(o, kinds) if r.masks == rate]
        if idle and getattr(o, rate) == 0:
            names = " and ".join("-".join([r.name.split("_")[0].upper(), *r.name.split("_")[1:]]) for r in idle)
            weights = " and ".join(f"objectives.{r.weight}=0" for r in idle)
            raise ConfigError(f"objectives.{rate}=0 masks nothing, so {names} would measure nothing: give a positive "
                              f"rate (the default is {getattr(type(o)(), rate):.3g}), or set {weights}")


def _unread(cfg: TrainConfig, kinds: list[str], why: str, fix: str) -> str:
    """A note on named data the run never reads (its sources had been listed as used, their count
    at the end 0, unsaid); `{}` in `why` and `fix` is 'it' or 'them'."""
    named = " and ".join(f"data.{k} (" + ", ".join(str(getattr(s, "path", s)) for s in getattr(cfg.data, k)) + ")"
                         for k in kinds)
    one = len(kinds) == 1
    it = "it" if one else "them"
    return f"{named} {'is' if one else 'are'} named but not read: {why.format(it)}; leave {it} out or {fix.format(it)}"


def trained_kinds(cfg: TrainConfig, stage: Stage | None = None) -> tuple[tuple[str, ...], list[str]]:
    """The data kinds a run trains on: its stage's, less those without data (the demo data
    stands in only when no data is named at all) or without an objective to train; and notes
    saying what was left out and why."""
    if len(cfg.data.mixing) != len(KINDS):
        raise ConfigError("data.mixing needs three non-negative probabilities (pairs, images, text); "
                          f"got {len(cfg.data.mixing)}")
    stage = stage or STAGES[cfg.stage](cfg)
    kinds, notes = list(stage.kinds()), []
    given = [k for k in KINDS if getattr(cfg.data, k)]
    unread_notes = []  # not why a stage has nothing to train
    if unread := [k for k in given if k not in kinds]:
        unread_notes.append(_unread(cfg, unread, f"stage {cfg.stage} trains on {' and '.join(kinds)} alone",
                             "choose a stage that reads {} (joint)"))
    if given:
        for k in [k for k in kinds if k not in given]:
            notes.append(f"no {k} data given (data.{k}): {k} steps are left out")
        kinds = [k for k in kinds if k in given]
    if isinstance(stage, PretrainingStage):  # of the kinds with data: MIM without images never runs
        _check_mask_rates(cfg, kinds)
    trained = stage.trained_kinds()
    for k in [k for k in kinds if k not in trained]:
        notes.append(f"every objective on {k} has weight 0: {k} steps are left out")
    kinds = [k for k in kinds if k in trained]
    linear = cfg.data.mixing_schedule == "linear"  # a kind with no share at the start may get one by the end
    end = cfg.data.mixing_end if linear else []
    if unshared := [k for k in kinds if k in given and cfg.data.mixing[KINDS.index(k)] == 0
                    and (len(end) != len(KINDS) or end[KINDS.index(k)] == 0)]:
        unread_notes.append(_unread(cfg, unshared, "data.mixing" + (" and data.mixing_end give" if linear else " gives")
                             + " {} a share of 0", "give {} a share"))
    if not kinds:
        raise ConfigError(
            f"stage {cfg.stage} has nothing to train: it trains on {', '.join(stage.kinds())}, but "
            + ("; ".join(notes) or "no data is given") + ". Name data for it ("
            + ", ".join(f"data.{k}" for k in stage.kinds()) + ") or give its objectives a positive weight")
    return tuple(kinds), unread_notes + notes
