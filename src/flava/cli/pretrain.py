"""`flava pretrain`: pretrain FLAVA (with no data.* settings: the tiny preset on the demo data)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
from pathlib import Path

from rich.console import Console

from .. import stopping


# train.run.RESUMABLE (importing it here would load torch to build the parser); a test holds them equal.
RESUMABLE_HELP = ("max_steps, save_every, log_every, diagnose_every, keep_last, keep_every, tensorboard, "
                  "max_nonfinite_steps, data.num_workers, data.cache_dir, data.cache_limit_gb, data.outage_minutes")


def add(sub) -> None:
    p = sub.add_parser("pretrain",
                       help="pretrain FLAVA (data.* settings name the data; none: tiny preset on the demo data; "
                            "no codebook named: one trained on the demo images first)")
    p.add_argument("--config", help="a preset (tiny: the CPU demo's settings, the default; small, base: the paper's "
                                    "optimisation scaled to your global batch) or a JSON file of training settings "
                                    "(over the preset its \"preset\" key names; without one, the paper's defaults: the "
                                    "base model); "
                                    "`flava config show` lists every setting")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any setting, e.g. optim.lr=1e-4 or data.pairs='[\"shards/*.tar\"]'")
    p.add_argument("--output", required=True)
    p.add_argument("--max-steps", dest="max_steps", type=int)
    p.add_argument("--save-every", dest="save_every", type=int)
    p.add_argument("--resume", action="store_true",
                   help=f"continue the run in OUTPUT with its own settings (only {RESUMABLE_HELP} may change)")
    p.add_argument("--override", action="store_true",
                   help="with --resume: allow other settings to change; the change is recorded in the run")
    p.add_argument("--recipe", choices=("paper", "paper-mim"),
                   help="run stages in OUTPUT: 'paper' = text-mlm, image-dino, then joint from both ('paper-mim': "
                        "image-mim instead of image-dino); the settings are the joint stage's; running the command "
                        "again continues where it stopped")
    p.add_argument("--stage-steps", dest="stage_steps", action="append", metavar="STAGE=N",
                   help="with --recipe: steps of one stage, e.g. text-mlm=200 (default: --max-steps)")
    p.add_argument("--stage-set", dest="stage_set", action="append", metavar="STAGE:KEY=VALUE",
                   help="with --recipe: a setting of one stage alone, e.g. text-mlm:optim.lr=1e-3")
    p.set_defaults(run=run, graceful=True)  # stops at its boundaries on SIGTERM/SIGINT


def settings(args: argparse.Namespace):
    """The settings the command asks for: a resumed run's own (with the given changes), else
    the defaults, a preset or a file, then every --set."""
    from ..config import apply_overrides, check
    from ..errors import ConfigError
    from ..train.presets import train_config
    from ..train.config import anchored
    from ..train.run import CHECKPOINT_KEYS, PLACES, saved_settings

    cfg = saved_settings(Path(args.output)) if args.resume and not args.config else None
    if cfg is None:
        cfg = train_config(args.config or "tiny")
    cfg = apply_overrides(cfg, args.set or [])
    given = {s.partition("=")[0].strip() for s in args.set or []}
    for flag, key in (("--max-steps", "max_steps"), ("--save-every", "save_every")):
        value = getattr(args, key)
        if value is None:
            continue
        if key in given and getattr(cfg, key) != value:  # which was meant? (the flag had won, unsaid)
            raise ConfigError(f"{flag} {value} and --set {key}={getattr(cfg, key)} disagree: give one of them")
        setattr(cfg, key, value)
    if args.override and not args.resume:
        raise ConfigError("--override only applies with --resume (a new run takes any settings)")
    # Paths named relative to this folder are saved as absolute ones: a --resume from another
    # folder reads the run's settings and must find them. A resumed run's saved values are its own
    # (relative to where it started): only what this command names (--config, --set) is made absolute.
    for key in PLACES:
        if not args.resume or args.config or key in given:
            section, _, name = key.rpartition(".")
            owner = getattr(cfg, section) if section else cfg
            setattr(owner, name, anchored(getattr(owner, name), existing=key in CHECKPOINT_KEYS))
    if args.resume and args.config and not args.override:
        _refuse_config_on_resume(args.config, Path(args.output), cfg)
    shaped = [s.partition("=")[0].strip() for s in args.set or [] if s.strip().startswith("model.")]
    if cfg.init and shaped and not args.resume:
        raise ConfigError(f"init={cfg.init} brings its own model, so {', '.join(shaped)} would be ignored: drop "
                          "those --set flags, or start without init (init_image, init_text and init_multimodal take "
                          "single encoders into a model of your settings)")
    if not args.resume:
        _refuse_what_a_source_decides(cfg, shaped)
    return check(cfg)


def _refuse_what_a_source_decides(cfg, shaped: list[str]) -> None:
    """A `--set model.text.*` beside init_text, or `model.image.*` beside init_image, that the source
    decides otherwise had been overwritten by it without a word (the same value is no conflict)."""
    from ..config import to_dict
    from ..errors import ConfigError
    from ..interop.text_towers import KEPT as TEXT_KEPT
    from ..interop.text_towers import following
    from ..interop.towers import KEPT as IMAGE_KEPT
    from ..train.init import follow_image_tower, text_source

    def overruled(section: str, asked, decided) -> list[str]:
        a, d = to_dict(asked), to_dict(decided)
        said = []
        for key in shaped:
            if key == f"model.{section}" and a != d:
                said.append(key)
            elif key.startswith(f"model.{section}.") and a.get(name := key.split(".", 2)[2]) != d.get(name):
                said.append(f"{key}={a.get(name)} (it has {d.get(name)})")
        return said

    named = {key.split(".")[1] for key in shaped if key.count(".") >= 1}  # read a source only where it may conflict
    if cfg.init_text and "text" in named:
        text = overruled("text", cfg.model.text, following(cfg.model.text, text_source(cfg.init_text).config))
        if text:
            raise ConfigError(f"init_text={cfg.init_text} decides the text encoder's settings, so {', '.join(text)} "
                              f"would be ignored: drop {'it' if len(text) == 1 else 'them'} (of model.text, "
                              f"{' and '.join(TEXT_KEPT)} stay yours)")
    if cfg.init_image and "image" in named:
        image = overruled("image", cfg.model.image,
                          follow_image_tower(cfg.model, cfg.init_image, cfg.init_image_size).image)
        if image:
            size = "; init_image_size=N runs the tower at another size" if any(
                k.startswith("model.image.image_size=") for k in image) else ""
            raise ConfigError(f"init_image={cfg.init_image} decides the image encoder's settings, so "
                              f"{', '.join(image)} would be ignored: drop {'it' if len(image) == 1 else 'them'}{size} "
                              f"(a public tower leaves {', '.join(IMAGE_KEPT)} to you)")


def _refuse_config_on_resume(config: str, output: Path, cfg) -> None:
    """--config gives every setting, its preset's defaults too: read on a resume, it seemed to change
    settings the user never named, and "drop those --set flags" named none they gave."""
    from ..config import said
    from ..errors import ConfigError
    from ..train.run import RESUMABLE, changes, keeps_demo_codebook, saved_settings

    saved = saved_settings(output)
    if saved is None:
        return
    if keeps_demo_codebook(saved, cfg, output):  # as the resume will: the preset names no codebook
        cfg = dataclasses.replace(cfg, codebook=saved.codebook)
    refused = {k: v for k, v in changes(saved, cfg).items() if k not in RESUMABLE}
    if refused:
        raise ConfigError(f"--resume --config {config} would change the run's settings ({said(refused)}): --config "
                          "gives every setting, its preset's defaults too, and a resumed run keeps its own; drop "
                          "--config and name a change with --set (with --override where it asks)")


def run(args: argparse.Namespace, console: Console) -> None:
    from ..errors import ConfigError
    from ..io.locks import InUse
    from ..train.run import run_pretrain

    # What a second signal (a stop at once) leaves, until the run saves a checkpoint and after.
    if args.recipe:
        stopping.tell_saves("nothing was saved since the last checkpoint: run the same command again",
                            "run the same command again")
    else:
        stopping.tell_saves_of_a_run(args.resume, "the run", "the run's last checkpoint")
    if args.recipe:
        from ..recipes.recipe import run_recipe

        if args.resume or args.override:
            raise ConfigError("a recipe continues by itself: run the same command again, without --resume")
        steps = {}
        for item in args.stage_steps or []:
            stage, eq, n = item.partition("=")
            if not eq or not n.strip().isdigit() or int(n) < 1:
                raise ConfigError(f"--stage-steps {item!r} must look like STAGE=N with N a positive number")
            if stage.strip() in steps:
                raise ConfigError(f"--stage-steps names stage {stage.strip()} twice ({steps[stage.strip()]} and {n}): "
                                  "give it once")
            steps[stage.strip()] = int(n)
        if "joint" in steps and args.max_steps is not None and args.max_steps != steps["joint"]:
            # Both give the joint stage's steps: the one --stage-steps gave had won unsaid.
            raise ConfigError(f"--stage-steps joint={steps['joint']} and --max-steps {args.max_steps} both give the "
                              "joint stage's steps: give one")
        overrides: dict[str, list[str]] = {}
        for item in args.stage_set or []:
            stage, colon, setting = item.partition(":")
            if not colon or "=" not in setting:
                raise ConfigError(f"--stage-set {item!r} must look like STAGE:KEY=VALUE, e.g. text-mlm:optim.lr=1e-3")
            key = setting.partition("=")[0].strip()
            given = next((s for s in overrides.get(stage.strip(), []) if s.partition("=")[0].strip() == key), None)
            if given is not None:  # as --stage-steps refuses a stage twice: the last had won unsaid
                raise ConfigError(f"--stage-set sets {key} of stage {stage.strip()} twice ({given.partition('=')[2]} "
                                  f"and {setting.partition('=')[2]}): give it once")
            overrides.setdefault(stage.strip(), []).append(setting.strip())
        run_recipe(args.recipe, settings(args), Path(args.output), console, steps, overrides)
        return
    if args.stage_steps or args.stage_set:
        raise ConfigError("--stage-steps and --stage-set only apply with --recipe")
    output = Path(args.output)
    if args.resume and not holds_run(output):
        if (output / "recipe.json").is_file():  # the recipe's directory, not one of its stages' runs
            raise ConfigError(f"--resume: {output} holds a recipe's stages, each a run of its own; a recipe continues "
                              "by itself: run its --recipe command again (or --resume one stage's run, e.g. "
                              f"{output / 'joint'})")
        # Else a mistyped path would start a new run on the demo data (minutes of codebook first).
        raise ConfigError(f"--resume: {output} holds no run to continue (no train_config.json, no checkpoints); "
                          "check the path, or drop --resume to start a new run there")
    created = not output.exists()
    try:
        run_pretrain(settings(args), output, resume=args.resume, console=console, override=args.override)
    except BaseException as e:
        # A start that failed before the run began leaves no directory behind (only its lock) for
        # the next attempt to trip over; one process cleans up. A trained demo codebook (minutes of
        # work) is kept for the corrected command, as a stop on request keeps what it saved; a
        # start refused by the lock leaves the directory to the run that holds it (started at the
        # same moment, it has written nothing yet).
        kept = (output / "codebook" / "model.safetensors").is_file()
        if created and not holds_run(output) and os.environ.get("RANK", "0") == "0" and not kept and \
                not isinstance(e, (stopping.Stopped, InUse)):
            shutil.rmtree(output, ignore_errors=True)
        raise


def holds_run(output: Path) -> bool:
    """Whether `output` holds a run that --resume can continue: its settings or a checkpoint."""
    from ..io.runs import RunDir
    from ..train.run import SETTINGS

    return (output / SETTINGS).is_file() or bool(RunDir(output).step_dirs()) or RunDir(output).pointer.is_file()
