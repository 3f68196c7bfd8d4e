"""`flava demo` (`make demo`): the whole job on packaged data — the paper's recipe on the tiny
preset (the image codebook, text MLM, image MIM, then joint training from both encoders), the demo
suite on the result beside the untrained model, and the table.

The image stage is MIM, not DINO: at this scale (3,608 simple images, a few hundred steps) DINO's
teacher collapses to the uniform distribution (BENCHMARKS.md); `flava pretrain --recipe paper`
runs DINO where there is the data and compute for it."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console

from ..io.runs import RunDir


def add(sub) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on packaged data")
    p.add_argument("--output", default="runs/demo", help="where the demo writes (default: runs/demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pretraining run and the untrained model "
                                                        "(default 0; the seed spread is measured with 0 and 1)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> None:
    run_demo(Path(args.output), console, args.seed)


def run_demo(output: Path, console: Console, seed: int = 0) -> dict:
    from ..evaluate.report import write_report
    from ..evaluate.run import evaluate_models, print_plan, results_table, untrained_like
    from ..evaluate.suite import load_suite
    from ..loading import load
    from ..recipes.recipe import DEMO_RECIPE, DEMO_STAGE_SETTINGS, DEMO_STAGE_STEPS, demo_recipe_config, run_recipe

    start = time.perf_counter()
    console.rule("[bold]flava demo: the paper's recipe on the tiny preset, then the evaluation")
    run_dir = output / "pretrain"
    report_dir = output / "report"
    resume = (run_dir / "recipe.json").is_file()
    cfg = demo_recipe_config(seed)
    steps = ", ".join(f"{k} {v}" for k, v in DEMO_STAGE_STEPS.items())
    console.print(f"[bold]1/2[/] pretraining ({run_dir}): the image codebook, then text MLM and image MIM "
                  f"({steps} steps), then joint training of every objective from both encoders ({cfg.max_steps} "
                  "steps)" + (" — continuing the earlier run" if resume else ""))
    run_recipe(DEMO_RECIPE, cfg, run_dir, console, DEMO_STAGE_STEPS, DEMO_STAGE_SETTINGS)
    checkpoint = RunDir(run_dir / "joint").step(cfg.max_steps)
    model = load(checkpoint).eval()
    pretrain_minutes = (time.perf_counter() - start) / 60

    console.print("[bold]2/2[/] evaluating on the demo suite, then the same suite on the untrained model")
    suite = load_suite("demo")
    print_plan(suite, console)
    models = [("pretrained", model, str(checkpoint)),
              ("untrained", untrained_like(model, seed=cfg.seed), "the tiny preset, newly initialised")]
    results = evaluate_models(models, suite, console)
    md = write_report(results, report_dir, [m[0] for m in models])
    minutes = (time.perf_counter() - start) / 60
    console.rule("[bold]results")
    console.print(results_table(results, [m[0] for m in models],
                                "demo suite: pretrained vs untrained (percent, higher is better)"))
    console.print(f"pretraining took {pretrain_minutes:.1f} min, the demo {minutes:.1f} min in all. "
                  f"Report with pictures: {md}; loss curves: {run_dir / 'joint' / 'loss_curves.png'}")
    return {"results": results, "minutes": minutes}
