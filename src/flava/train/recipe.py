"""Recipes: several pretraining stages in one output directory, each a normal, resumable run.

The paper's recipe (`paper`): the text encoder by masked language modelling, the image encoder by
DINO self-distillation, then joint training with both encoders initialised from those stages and
the multimodal encoder newly initialised.

```
OUTPUT/
  recipe.json        the recipe, its stages, their directories and step budgets, and how each ended
  text-mlm/          a run directory (stage text-mlm)
  image-dino/        a run directory (stage image-dino)
  joint/             a run directory (stage joint, init_text / init_image from the two above)
```

A stage whose run reached its steps is not run again; an interrupted one resumes from its newest
checkpoint; so running the same command again continues the recipe where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..config import check, from_dict, to_dict
from ..errors import ConfigError
from ..io.files import read_json, write_json_atomic
from ..io.runs import RunDir
from .config import TrainConfig

RECIPES = {"paper": ("text-mlm", "image-dino", "joint")}
RECIPE_FILE = "recipe.json"


@dataclass
class Stage:
    name: str
    directory: Path
    config: TrainConfig


def _copy(cfg: TrainConfig) -> TrainConfig:
    return from_dict(TrainConfig, to_dict(cfg))


def plan(name: str, cfg: TrainConfig, output: Path, steps: dict[str, int]) -> list[Stage]:
    """The stages of recipe `name`: `cfg` is the joint stage's settings (its data, model and
    optimizer serve every stage); `steps` maps a stage to its steps (default: cfg.max_steps)."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    if cfg.stage != "joint":
        raise ConfigError(f"a recipe sets each stage itself; drop stage={cfg.stage}")
    if cfg.init or cfg.init_text or cfg.init_image:
        raise ConfigError("a recipe initialises the joint stage from its own stages; drop init, init_text and "
                          "init_image (init_multimodal may stay)")
    unknown = sorted(set(steps) - set(RECIPES[name]))
    if unknown:
        raise ConfigError(f"recipe {name!r} has no stage {unknown[0]!r}; its stages: {', '.join(RECIPES[name])}")
    stages = []
    for stage in RECIPES[name]:
        c = _copy(cfg)
        c.stage = stage
        c.max_steps = steps.get(stage, cfg.max_steps)
        if stage == "joint":
            c.init_text = str(output / "text-mlm")
            c.init_image = str(output / "image-dino")
        stages.append(Stage(stage, output / stage, check(c)))
    return stages


def _finished_step(directory: Path) -> int:
    pointer = RunDir(directory).intact_pointer()
    if pointer is None:
        return 0
    return int(read_json(RunDir(directory).pointer, "checkpoint pointer").get("step", 0))


def run_recipe(name: str, cfg: TrainConfig, output: Path, console: Console,
               steps: dict[str, int] | None = None) -> list[dict]:
    """Run (or continue) every stage of the recipe in order; returns what each stage did."""
    from .run import SETTINGS, run_pretrain

    stages = plan(name, cfg, output, steps or {})
    output.mkdir(parents=True, exist_ok=True)
    record = output / RECIPE_FILE
    wanted = {"recipe": name, "stages": [{"stage": s.name, "directory": s.name, "steps": s.config.max_steps}
                                         for s in stages]}
    if record.is_file():
        old = read_json(record, "recipe record", ConfigError, expect=dict)
        if [(s["stage"], s["steps"]) for s in old.get("stages", [])] != [(s.name, s.config.max_steps) for s in stages]:
            raise ConfigError(f"{output} holds recipe {old.get('recipe')!r} with other stages or steps; continue it "
                              f"with the same command, or choose another --output")
    write_json_atomic(record, wanted)
    done = []
    for i, stage in enumerate(stages, 1):
        console.rule(f"stage {i} of {len(stages)}: {stage.name}")
        reached = _finished_step(stage.directory)
        if reached >= stage.config.max_steps:
            console.print(f"{stage.name}: already finished ({reached} steps in {stage.directory})")
            done.append({"stage": stage.name, "steps": reached, "ran": False})
            continue
        resume = (stage.directory / SETTINGS).is_file()
        run_pretrain(stage.config, stage.directory, resume=resume, console=console)
        done.append({"stage": stage.name, "steps": _finished_step(stage.directory), "ran": True})
    write_json_atomic(record, {**wanted, "finished": done})
    table = Table(title=f"recipe {name} in {output}")
    for col in ("stage", "steps", "directory", "this time"):
        table.add_column(col)
    for stage, d in zip(stages, done):
        table.add_row(stage.name, str(d["steps"]), str(stage.directory), "trained" if d["ran"] else "already done")
    console.print(table)
    return done
