"""`flava demo` (`make demo`): the whole job on packaged data — train the image codebook, pretrain
the tiny preset, evaluate it on the demo suite beside the untrained model, and print the table."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console

from ..io.runs import RunDir


def add(sub) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on packaged data")
    p.add_argument("--output", default="runs/demo", help="where the demo writes (default: runs/demo)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> None:
    run_demo(Path(args.output), console)


def run_demo(output: Path, console: Console) -> dict:
    from ..evaluate.report import write_report
    from ..evaluate.run import evaluate_models, print_plan, results_table, untrained_like
    from ..evaluate.suite import load_suite
    from ..hub import load
    from ..train.config import TrainConfig
    from ..train.run import run_pretrain

    start = time.perf_counter()
    console.rule("[bold]flava demo: image codebook, pretraining, evaluation")
    run_dir = output / "pretrain"
    report_dir = output / "report"
    resume = RunDir(run_dir).checkpoints.exists() or (run_dir / "train_config.json").exists()
    cfg = TrainConfig()
    console.print(f"[bold]1-2/3[/] image codebook, then pretraining the tiny preset for {cfg.max_steps} steps "
                  f"on the demo data ({run_dir})" + (" — resuming the earlier run" if resume else ""))
    run_pretrain(cfg, run_dir, resume=resume, console=console)
    checkpoint = RunDir(run_dir).step(cfg.max_steps)
    model = load(checkpoint).eval()
    pretrain_minutes = (time.perf_counter() - start) / 60

    console.print("[bold]3/3[/] evaluating on the demo suite, then the same suite on the untrained model")
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
                  f"Report with pictures: {md}; loss curves: {run_dir / 'loss_curves.png'}")
    return {"results": results, "minutes": minutes}
