"""`make demo`: the whole job on packaged data — train the image tokenizer, pretrain the tiny
preset, evaluate it on the demo suite beside the untrained model, and print the table."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from .evaluate.run import evaluate_models, print_plan, results_table, untrained_like
from .evaluate.report import write_report
from .evaluate.suite import load_suite
from .storage import load
from .train.config import TrainConfig
from .train.run import run_pretrain


def run_demo(output: Path, console: Console) -> dict:
    start = time.perf_counter()
    console.rule("[bold]flava demo: tokenizer, pretraining, evaluation")
    run_dir = output / "pretrain"
    report_dir = output / "report"
    resume = (run_dir / "checkpoints").exists()
    cfg = TrainConfig()
    console.print(f"[bold]1-2/3[/] image tokenizer, then pretraining the tiny preset for {cfg.max_steps} steps "
                  f"on the demo data ({run_dir})" + (" — resuming the earlier run" if resume else ""))
    run_pretrain(cfg, run_dir, resume=resume, console=console)
    checkpoint = run_dir / "checkpoints" / f"step_{cfg.max_steps:08d}"
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
