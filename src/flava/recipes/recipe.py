"""Recipes: several pretraining stages in one output directory, each a normal, resumable run.

The paper's recipe (`paper`): the text encoder by masked language modelling, the image encoder by
DINO self-distillation, then joint training with both encoders initialised from those stages and
the multimodal encoder newly initialised. `paper-mim` pretrains the image encoder by masked image
modelling instead (the paper's BEiT-style alternative, Table C.1), which is what the CPU demo uses:
it was chosen when DINO collapsed at the demo's scale; with the tiny preset's DINO settings DINO
now learns there in 600 steps (BENCHMARKS.md).

```
OUTPUT/
  recipe.json        the recipe, its stages, their directories, step budgets and settings, and how each ended
  codebook/          the image codebook the stages share (demo data with no codebook named)
  text-mlm/          a run directory (stage text-mlm)
  image-dino/        a run directory (stage image-dino; image-mim/ in `paper-mim`)
  joint/             a run directory (stage joint, init_text / init_image from the two above)
```

A stage whose run reached its steps is not run again; an interrupted one resumes from its newest
checkpoint; so running the same command again continues the recipe where it stopped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from rich.console import Console
from rich.table import Table

from .. import stopping
from ..config import apply_overrides, check, from_dict, said, to_dict
from ..errors import ConfigError
from ..io.files import read_json, refuse_other_files, write_json_atomic
from ..io.runs import RunDir
from ..train.config import TrainConfig, moved_away
from ..train.presets import demo_config

RECIPES = {"paper": ("text-mlm", "image-dino", "joint"), "paper-mim": ("text-mlm", "image-mim", "joint")}
RECIPE_FILE = "recipe.json"

# The demo's recipe (`flava demo`, and the runs `flava ablate --balancing` compares): steps of the
# unimodal stages (the joint stage runs the demo settings' max_steps), sized so that the whole demo,
# install included, stays under 20 minutes on 2 cores.
DEMO_RECIPE = "paper-mim"
DEMO_STAGE_STEPS = {"text-mlm": 300, "image-mim": 150}
DEMO_STAGE_SETTINGS = {"text-mlm": ["optim.lr=1e-3"], "image-mim": ["optim.lr=1e-3"]}
# The joint stage's text encoder learns at a tenth of the rate: at full rate, contrastive training on
# the demo's narrow captions undoes what text MLM taught its CLS. The image encoder keeps the full
# rate: slowed too, it aligns with the text more slowly (both measured in BENCHMARKS.md).
DEMO_INIT_LR_SCALE = 0.1
DEMO_INIT_LR_SCALED = ["text"]


def demo_recipe_config(seed: int = 0) -> TrainConfig:
    """The joint stage's settings of the demo's recipe (its data, model and optimizer serve every stage)."""
    cfg = demo_config(seed=seed)
    cfg.optim.init_lr_scale, cfg.optim.init_lr_scaled = DEMO_INIT_LR_SCALE, list(DEMO_INIT_LR_SCALED)
    return cfg


@dataclass
class Stage:
    name: str
    directory: Path
    config: TrainConfig


def _copy(cfg: TrainConfig) -> TrainConfig:
    return from_dict(TrainConfig, to_dict(cfg))


def plan(name: str, cfg: TrainConfig, output: Path, steps: dict[str, int],
         overrides: dict[str, list[str]] | None = None) -> list[Stage]:
    """The stages of recipe `name`: `cfg` is the joint stage's settings (its data, model and
    optimizer serve every stage); `steps` maps a stage to its steps (default: cfg.max_steps);
    `overrides` maps a stage to KEY=VALUE settings of that stage alone (e.g. its learning rate)."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    if cfg.stage != "joint":
        raise ConfigError(f"a recipe sets each stage itself; drop stage={cfg.stage}")
    if cfg.init or cfg.init_text or cfg.init_image:
        raise ConfigError("a recipe initialises the joint stage from its own stages; drop init, init_text and "
                          "init_image (init_multimodal may stay)")
    overrides = overrides or {}
    for given in (steps, overrides):
        unknown = sorted(set(given) - set(RECIPES[name]))
        if unknown:
            raise ConfigError(f"recipe {name!r} has no stage {unknown[0]!r}; its stages: {', '.join(RECIPES[name])}")
    stages = []
    image_stage = RECIPES[name][1]
    for stage in RECIPES[name]:
        c = _copy(cfg)
        c.stage = stage
        c.max_steps = steps.get(stage, cfg.max_steps)
        for key in ("stage", "max_steps", "init", "init_text", "init_image"):
            if any(o.split("=", 1)[0].strip() == key for o in overrides.get(stage, [])):
                raise ConfigError(f"the recipe sets {key} of stage {stage} itself; drop it from that stage's settings")
        try:
            c = apply_overrides(c, overrides.get(stage, []))
        except ConfigError as e:  # the message names a key, not whose it is
            raise ConfigError(f"stage {stage}'s settings: {e}") from None
        if stage == "joint":
            c.init_text = str(output / "text-mlm")
            c.init_image = str(output / image_stage)
        stages.append(Stage(stage, output / stage, check(c)))
    return stages


def finished_step(directory: Path) -> int:
    """The step of a run directory's newest intact checkpoint (0 without one)."""
    pointer = RunDir(directory).intact_pointer()
    if pointer is None:
        return 0
    return int(read_json(RunDir(directory).pointer, "checkpoint pointer").get("step", 0))


def _stage_text(stage: tuple | None) -> str:
    if stage is None:
        return "none"
    return f"{stage[0]} {stage[1]} steps" + (f" ({', '.join(stage[2])})" if stage[2] else "")


def _paired(a: list, b: list) -> list[tuple]:
    return [(a[i] if i < len(a) else None, b[i] if i < len(b) else None) for i in range(max(len(a), len(b)))]


def _lengthened(pairs: list[tuple], changed: list[int], stages: list) -> bool:
    """Whether the only change to a recipe's record is more steps for stages no later stage has
    started from (a later stage's encoders come from an earlier one's end)."""
    from ..train.run import SETTINGS

    more = all(a is not None and b is not None and (a[0], a[2]) == (b[0], b[2]) and b[1] > a[1]
               for a, b in (pairs[i] for i in changed))
    return more and not any((s.directory / SETTINGS).is_file() for s in stages[min(changed) + 1:])


def _moved_with_recipe(stage: Stage, output: Path) -> None:
    """A stage resumed keeps the places it started from where they moved: the recipe's own
    earlier stages and demo codebook in a folder moved or copied, and a codebook named at its new
    place (the recipe's settings allow that where the old place is gone). A resume reads none of
    them; naming them anew was refused as a change of what the stage started from."""
    from ..train.run import CHECKPOINT_KEYS, saved_settings

    saved = saved_settings(stage.directory)
    if saved is None:
        return
    for key in CHECKPOINT_KEYS:
        was, now = getattr(saved, key), getattr(stage.config, key)
        if not (was and now and was != now):
            continue
        own = os.path.abspath(now) == os.path.abspath(output / Path(was).name)
        if own or (key == "codebook" and moved_away(was)):
            setattr(stage.config, key, was)


def _same_codebook(stages: list[Stage], named: str) -> str:
    """What a codebook named anew is, said once it is known to be the one the started stages'
    checkpoints hold (their MIM/MMM targets came from it); ConfigError where it is another."""
    from ..errors import CheckpointError
    from ..loading import load_codebook

    now = load_codebook(named).fingerprint()
    compared = []
    for stage in stages:
        try:
            held = load_codebook(stage.directory).fingerprint()  # its newest checkpoint's
        except CheckpointError:  # not started, or a stage that needs no codebook
            continue
        if held != now:
            raise ConfigError(f"codebook={named} is not the codebook stage {stage.name} trained with (its weights "
                              f"{now}, the stage's {held}): name that codebook where it is now, or choose another "
                              "--output")
        compared.append(stage.name)
    if not compared:
        return "which no stage that has started used: it must be the one the others are to train with"
    return f"the codebook stage{'s' if len(compared) > 1 else ''} {' and '.join(compared)} trained with ({now})"


def run_recipe(name: str, cfg: TrainConfig, output: Path, console: Console,
               steps: dict[str, int] | None = None, overrides: dict[str, list[str]] | None = None) -> list[dict]:
    """Run (or continue) every stage of the recipe in order; returns what each stage did."""
    from ..train.run import end_distributed, init_distributed

    started = init_distributed(cfg.device, cfg.data.outage_minutes)  # one process group for every stage
    try:
        return _run_recipe(name, cfg, output, console, steps or {}, overrides or {})
    finally:
        if started:
            end_distributed()


def _run_recipe(name: str, cfg: TrainConfig, output: Path, console: Console, steps: dict[str, int],
                overrides: dict[str, list[str]]) -> list[dict]:
    from ..train.run import DEMO_CODEBOOK, RESUMABLE, SETTINGS, changes, check_codebook_vocabulary, \
        ensure_demo_codebook, needs_demo_codebook, run_pretrain
    from ..train.trainer import check_stage

    rank = dist.get_rank() if dist.is_initialized() else 0
    stages = plan(name, cfg, output, steps, overrides)
    # Before the record, every stage still to train: a corrected command is not refused as another
    # recipe, and a setting a later stage refuses (DINO's optim.contrastive_chunks) is said before
    # any stage trains.
    for stage in stages:
        if not (stage.directory / SETTINGS).is_file():
            check_stage(stage.config)
        if needs_demo_codebook(stage.config):
            check_codebook_vocabulary(stage.config.model)
    record = output / RECIPE_FILE
    refuse_other_files(output, record, "recipe", allowed=(DEMO_CODEBOOK,))
    output.mkdir(parents=True, exist_ok=True)
    started = [s.name for s in stages if (s.directory / SETTINGS).is_file()]
    wanted = {"recipe": name, "stages": [{"stage": s.name, "directory": s.name, "steps": s.config.max_steps,
                                          "settings": sorted(overrides.get(s.name, []))} for s in stages],
              "settings": to_dict(cfg)}
    if record.is_file() and not started:  # nothing trained: the corrected command starts it afresh
        old = read_json(record, "recipe record", ConfigError, expect=dict)
        if old.get("stages") != wanted["stages"] or old.get("settings") != wanted["settings"]:
            console.print(f"note: no stage of the recipe in {output} had started: it starts with these settings")
    elif record.is_file():
        old = read_json(record, "recipe record", ConfigError, expect=dict)
        was = [(s.get("stage"), s.get("steps"), s.get("settings", [])) for s in old.get("stages", [])]
        now = [(s["stage"], s["steps"], s["settings"]) for s in wanted["stages"]]
        if was != now:
            pairs = _paired(was, now)
            changed = [i for i, (a, b) in enumerate(pairs) if a != b]
            if _lengthened(pairs, changed, stages):
                for i in changed:
                    console.print(f"note: stage {pairs[i][1][0]} lengthened from {pairs[i][0][1]} to {pairs[i][1][1]} "
                                  "steps")
            else:
                differ = "; ".join(f"stage {i + 1}: {_stage_text(pairs[i][0])} -> {_stage_text(pairs[i][1])}"
                                   for i in changed)
                raise ConfigError(f"{output} holds recipe {old.get('recipe')!r} with other stages, steps or stage "
                                  f"settings ({differ}); continue it with the same command (a stage may be given more "
                                  "steps while no later stage has started), or choose another --output")
        # The settings every stage shares: later stages trained with others than earlier ones had.
        if isinstance(old.get("settings"), dict):  # records before they were kept: not compared
            # A codebook no longer where it was may be named where it is now, as a run's --resume may.
            diff = changes(from_dict(TrainConfig, old["settings"]), cfg)
            moved = diff.pop("codebook") if "codebook" in diff and moved_away(diff["codebook"][0]) else None
            diff = {k: v for k, v in diff.items() if k not in RESUMABLE}
            if moved and not diff:
                console.print(f"note: the codebook is no longer at {moved[0]}; the stages still to train read "
                              f"{moved[1]}, {_same_codebook(stages, moved[1])}")
            if diff:
                raise ConfigError(f"{output} holds recipe {old.get('recipe')!r} started with other settings "
                                  f"({said(diff)}); "
                                  "its stages share them: continue it with the same command, or choose another "
                                  "--output")
    if rank == 0:
        write_json_atomic(record, wanted)
    # One codebook for every stage that needs image tokens, trained once.
    for stage in stages:
        ensure_demo_codebook(stage.config, output / "codebook", console, rank)
    done = []
    for i, stage in enumerate(stages, 1):
        console.rule(f"stage {i} of {len(stages)}: {stage.name}")
        reached = finished_step(stage.directory)
        if reached >= stage.config.max_steps:
            console.print(f"{stage.name}: already finished ({reached} steps in {stage.directory})")
            done.append({"stage": stage.name, "steps": reached, "ran": False})
            continue
        last = stages[-1]
        if stage is not last and finished_step(last.directory) > 0:
            # The last stage's checkpoints hold what it took from this one: it may be removed to free the disk.
            console.print(f"{stage.name}: {'not there' if not reached else f'at step {reached} here'}, and not needed: "
                          f"stage {last.name} has started from it")
            done.append({"stage": stage.name, "steps": reached, "ran": False, "needed": False})
            continue
        resume = (stage.directory / SETTINGS).is_file()
        if resume:
            _moved_with_recipe(stage, output)
        try:
            run_pretrain(stage.config, stage.directory, resume=resume, console=console)
        except stopping.Stopped as e:
            saved = "" if e.at == stopping.BEFORE_FIRST_STEP else f" (saved in {stage.directory})"
            raise stopping.Stopped(e.signum, f"stopped by {stopping.name(e.signum)} in stage {stage.name} {e.at}"
                                             f"{saved}: run the same command again to continue", e.at) from None
        done.append({"stage": stage.name, "steps": finished_step(stage.directory), "ran": True})
        if (signum := stopping.agreed()) and i < len(stages):
            at = f"after stage {stage.name} ({i} of {len(stages)})"
            raise stopping.Stopped(signum, f"stopped by {stopping.name(signum)} {at}: run the same command again to "
                                           "continue", at)
    if rank == 0:
        write_json_atomic(record, {**wanted, "finished": done})
    table = Table(title=f"recipe {name} in {output}")
    for col in ("stage", "steps", "directory", "this time"):
        table.add_column(col)
    for stage, d in zip(stages, done):
        this_time = "trained" if d["ran"] else "already done" if d.get("needed", True) else "not needed"
        table.add_row(stage.name, str(d["steps"]), str(stage.directory), this_time)
    console.print(table)
    return done
