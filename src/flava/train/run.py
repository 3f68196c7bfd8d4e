"""`flava pretrain`: the Trainer with a progress bar, a config record and a closing summary."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from rich.console import Console
from rich.table import Table

from ..config import to_dict
from ..errors import ConfigError
from ..io.files import write_json_atomic
from ..io.runs import RunDir
from ..objectives.registry import needs_image_tokens
from ..progress import progress_bar
from .codebook import CodebookTraining, run_train_codebook
from .config import TrainConfig
from .trainer import STAGE_KINDS, Trainer

DEMO_CODEBOOK_STEPS = 200


def init_distributed() -> bool:
    """Join the process group torchrun describes in the environment; False when not under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def run_pretrain(cfg: TrainConfig, output: Path, resume: bool, console: Console) -> list[dict]:
    started = init_distributed()
    try:
        return _run(cfg, output, resume, console)
    finally:
        if started:
            dist.destroy_process_group()


def _run(cfg: TrainConfig, output: Path, resume: bool, console: Console) -> list[dict]:
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank != 0:
        console = Console(quiet=True)  # one process reports
    output.mkdir(parents=True, exist_ok=True)
    if not resume and RunDir(output).checkpoints.exists():
        raise ConfigError(f"{output} already holds a run; pass --resume to continue it or choose another --output")
    needs_codebook = needs_image_tokens(cfg.objectives, STAGE_KINDS.get(cfg.stage, ())) and not cfg.init
    if needs_codebook and not cfg.codebook:
        if cfg.data.pairs or cfg.data.images:
            raise ConfigError(
                "MIM/MMM need an image codebook: train one with `flava train-codebook --images ... --output CB` "
                "and pass --set codebook=CB (or set objectives.mim_weight=0 and objectives.mmm_image_weight=0)"
            )
        # The embedded default: make the demo's codebook first (about a minute and a half).
        codebook_dir = output / "codebook"
        if rank == 0 and not (codebook_dir / "model.safetensors").is_file():
            console.print("no image codebook given: training one on the demo images first")
            run_train_codebook(["demo"], codebook_dir, cfg.model, CodebookTraining(steps=DEMO_CODEBOOK_STEPS), console)
        if dist.is_initialized():
            dist.barrier()
        cfg.codebook = str(codebook_dir)
    trainer = Trainer(cfg, output)
    if resume and trainer.resume():
        console.print(f"resumed from step {trainer.step}")
    else:
        for what in trainer.initialised.values():
            console.print(what)
    if rank == 0:
        write_json_atomic(output / "train_config.json", to_dict(cfg))
    sizes = ", ".join(f"{k} {len(s)}" for k, s in trainer.sources.items())
    procs = f" x {trainer.world} processes ({cfg.distributed})" if trainer.world > 1 else ""
    console.print(f"pretraining stage {cfg.stage} for {cfg.max_steps} steps on {sizes} records; "
                  f"batch {cfg.data.batch_size}{procs}; {cfg.precision} on {trainer.device}; writing to {output}")
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    with progress_bar(console) as progress:
        task = progress.add_task("steps", total=cfg.max_steps, completed=trainer.step, info="")

        def log(row: dict) -> None:
            for name, v in row["losses"].items():
                first.setdefault(name, v)
                last[name] = v
            info = "  ".join(f"{k} {v:.3f}" for k, v in row["losses"].items())
            progress.update(task, completed=row["step"],
                            info=f"loss {row['loss']:.3f} ({info})  {row['samples_per_s']:.0f} samples/s")

        trainer.log = log
        rows = trainer.fit()
    table = Table(title="losses: first and last value seen in this run")
    for col in ("loss", "first", "last"):
        table.add_column(col, justify="right" if col != "loss" else "left")
    for name in first:
        table.add_row(name, f"{first[name]:.4f}", f"{last[name]:.4f}")
    console.print(table)
    skipped = trainer.skipped(everywhere=True)
    console.print("skipped records: " + (", ".join(f"{v} {k}" for k, v in skipped.items()) if skipped else "none"))
    console.print(f"checkpoints in {trainer.run.checkpoints}; metrics in {output / 'metrics.jsonl'}, "
                  f"{output / 'loss_curves.png'} and {output / 'tensorboard'}")
    if rank == 0:
        write_json_atomic(output / "summary.json", {"first": first, "last": last, "skipped": skipped})
    return rows
