"""`flava ablate`: the rows of the paper's Table 3 (and C.1's local vs global contrastive) trained
and evaluated at a chosen budget, in one report beside the paper's numbers."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console


def add(sub) -> None:
    p = sub.add_parser("ablate", help="train and evaluate the rows of the paper's Table 3 and report them beside "
                                      "the paper's numbers")
    p.add_argument("--output", required=True, help="the ablation's directory (running again continues it)")
    p.add_argument("--config", help="a preset (tiny, small, base) or a JSON file of training settings (a joint "
                                    "run's: data, model, optimizer); default: the tiny preset on the demo data")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any training setting, of every stage of the full FLAVA row too (with --balancing, "
                        "the unimodal stages keep the demo recipe's optim.lr=1e-3 unless --set gives optim.lr, and "
                        "--balancing, not objectives.balancing, chooses the methods)")
    p.add_argument("--steps", type=int, help="optimizer steps of every trained row (default: max_steps)")
    p.add_argument("--unimodal-steps", dest="unimodal_steps", type=int,
                   help="steps of each unimodal stage of the full FLAVA row (default: --steps)")
    p.add_argument("--image-stage", dest="image_stage", choices=("dino", "mim"),
                   help="how the full FLAVA row pretrains its image encoder (default: dino, the paper's; with "
                        "--balancing: mim, the demo recipe's, the only one it runs)")
    p.add_argument("--rows", help="comma-separated rows to run (default: all; flava-c-local needs --processes 2+): "
                                  "mim, mlm, flava-c-local, flava-c, flava-mm, flava-no-init, flava, untrained")
    p.add_argument("--processes", type=int, default=1,
                   help="train each row under torchrun with this many processes (each takes data.batch_size: "
                        "halve it for 2 to keep the global batch)")
    p.add_argument("--suite", default="demo", help="a suite JSON file, or 'demo' (default)")
    p.add_argument("--balancing", metavar="METHODS",
                   help="instead of Table 3's rows: the full FLAVA row (the demo's recipe) under each of these ways of "
                        "balancing the objectives, comma-separated, fixed among them: fixed, uncertainty, dwa, pcgrad, "
                        "mixing-adaptive (fixed, with the data kinds' mix adapted to their loss progress)")
    p.add_argument("--seeds", help="with --balancing: the seeds each method runs (default 0,1)")
    # Stops at its boundaries on SIGTERM/SIGINT; a stop at once keeps what its runs saved.
    p.set_defaults(run=run, graceful="stopping at the next training step, or once the evaluation in progress "
                                     "ends, after saving",
                    leaves="the runs finished are kept, and the run in progress from its last checkpoint: run the "
                           "same command again to continue")


def run(args: argparse.Namespace, console: Console) -> None:
    from ..config import apply_overrides, check
    from ..errors import ConfigError
    from ..recipes.ablate import ROWS, Plan, default_rows, run_ablation
    from ..train.presets import train_config

    if args.balancing:
        return run_balancing_comparison(args, console)
    if args.seeds is not None:
        raise ConfigError("--seeds applies with --balancing (Table 3's rows run the settings' seed once); drop it, "
                          "or set seed=N")
    cfg = check(apply_overrides(train_config(args.config or "tiny"), args.set or []))
    steps = args.steps if args.steps is not None else cfg.max_steps
    rows = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows is not None else \
        default_rows(args.processes)
    if twice := next((r for i, r in enumerate(rows) if r in rows[:i]), None):  # it had trained the row twice
        raise ConfigError(f"--rows names {twice} twice: name each row once")
    if not rows:  # an empty $ROWS had run every row, a lone comma none (exit 0, an empty table)
        raise ConfigError(f"--rows {args.rows!r} names no row; name some of {', '.join(ROWS)}, or leave --rows out "
                          "for all")
    plan = Plan(rows=rows, steps=steps, unimodal_steps=steps if args.unimodal_steps is None else args.unimodal_steps,
                image_stage=args.image_stage or "dino", processes=args.processes, suite=args.suite)
    run_ablation(cfg, plan, Path(args.output), console)


def run_balancing_comparison(args: argparse.Namespace, console: Console) -> None:
    from ..config import apply_overrides, check
    from ..errors import ConfigError
    from ..recipes.balancing import BalancingPlan, balancing_set, run_balancing, stage_settings
    from ..recipes.recipe import DEMO_RECIPE, RECIPES, demo_recipe_config
    from ..train.presets import train_config

    image_stage = RECIPES[DEMO_RECIPE][1].removeprefix("image-")
    if args.image_stage not in (None, image_stage):
        raise ConfigError(f"--balancing runs the demo's recipe, whose image stage is {image_stage}; drop --image-stage "
                          f"{args.image_stage}")
    for flag, given in (("--rows", args.rows), ("--steps", args.steps), ("--processes", args.processes != 1)):
        if given:
            # Each flag's own hint: --rows had been given the one for steps.
            hint = {"--steps": " (the joint stage's steps: --set max_steps=N; the unimodal stages': "
                               "--unimodal-steps N)",
                    "--rows": " (its rows are the --balancing methods, each run once per seed)"}.get(flag, "")
            raise ConfigError(f"--balancing runs the demo's recipe (text MLM, image MIM, joint) as it is, in one "
                              f"process; drop {flag}{hint}")
    try:
        seeds = [int(s) for s in (args.seeds or "0,1").split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds takes comma-separated integers, e.g. 0,1; got {args.seeds!r}") from None
    for item in args.set or []:  # even 'fixed', the default: the methods other than fixed would not train with it
        key, _, value = item.partition("=")
        if key.strip().lstrip("-") == "objectives.balancing":
            raise balancing_set(value.strip().strip("'\""))
    cfg = demo_recipe_config() if args.config in (None, "tiny") else train_config(args.config)
    cfg = check(apply_overrides(cfg, args.set or []))
    methods = [m.strip() for m in args.balancing.split(",") if m.strip()]
    plan = BalancingPlan(methods, seeds, args.suite, args.unimodal_steps, stage_settings(args.set or []))
    run_balancing(cfg, plan, Path(args.output), console)
