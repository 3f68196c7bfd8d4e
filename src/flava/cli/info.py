"""`flava info`: describe a checkpoint."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table


def add(sub) -> None:
    p = sub.add_parser("info", help="describe a checkpoint (ours or Hugging Face's), a codebook or a task model")
    p.add_argument("checkpoint", help="a checkpoint, run, recipe, codebook or task model directory, or a Hugging "
                                      "Face hub id")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> None:
    from pathlib import Path

    from ..finetune.taskmodel import TASK_FILE
    from ..loading import read_checkpoint
    from ..io.runs import resolve

    if (Path(args.checkpoint) / TASK_FILE).is_file():
        return _task_model(Path(args.checkpoint), console)
    ckpt = read_checkpoint(resolve(args.checkpoint))
    cfg = ckpt.config
    if not ckpt.parts.get("model") and ckpt.parts.get("codebook"):
        sd = ckpt.parts["codebook"]
        console.print(f"{ckpt.path}: an image codebook (`flava train-codebook`), not a model: "
                      f"{cfg.codebook.vocab_size:,} tokens from {cfg.codebook_image_size}-px images "
                      f"({cfg.image.grid_size}x{cfg.image.grid_size} per image), "
                      f"{sum(v.numel() for v in sd.values()) / 1e6:.2f} M parameters; pretraining takes it with "
                      f"--set codebook={ckpt.path}")
        return _refused(ckpt, console)
    if not ckpt.parts.get("model") and ckpt.parts.get("dino"):
        sd = ckpt.parts["dino"]
        teacher = sum(v.numel() for k, v in sd.items() if k.startswith("teacher.backbone.")) / 1e6
        console.print(f"{ckpt.path}: an image-dino stage, not a model: DINO's student and teacher image encoders "
                      f"({teacher:.2f} M parameters each, {cfg.image.num_layers} layers, {cfg.image.hidden_size} "
                      f"wide, {cfg.image.image_size} px); a run starts from its teacher with --set "
                      f"init_image={ckpt.path}")
        return
    table = Table(title=f"{ckpt.path} ({ckpt.source} format)")
    for col in ("part", "layers", "hidden", "heads", "mlp", "tensors", "parameters"):
        table.add_column(col, justify="right" if col != "part" else "left")
    prefixes = {"image": "image_encoder.", "text": "text_encoder.", "multimodal": "multimodal_encoder."}
    model = ckpt.parts["model"]
    for name, prefix in prefixes.items():
        enc = getattr(cfg, name)
        keys = [k for k in model if k.startswith(prefix)]
        table.add_row(name, str(enc.num_layers), str(enc.hidden_size), str(enc.num_heads), str(enc.mlp_size),
                      str(len(keys)), f"{sum(model[k].numel() for k in keys) / 1e6:.2f} M")
    # The projections into the shared and multimodal spaces, and the contrastive temperature.
    rest = [k for k in model if not k.startswith(tuple(prefixes.values()))]
    table.add_row("projections", "", "", "", "", str(len(rest)), f"{sum(model[k].numel() for k in rest) / 1e6:.2f} M")
    for part in ("heads", "codebook"):
        sd = ckpt.parts.get(part) or {}
        table.add_row(part, "", "", "", "", str(len(sd)),
                      f"{sum(v.numel() for v in sd.values()) / 1e6:.2f} M" if sd else "absent")
    every = [v for part in ("model", "heads", "codebook") for v in (ckpt.parts.get(part) or {}).values()]
    table.add_section()
    table.add_row("total", "", "", "", "", str(len(every)), f"{sum(v.numel() for v in every) / 1e6:.2f} M")
    console.print(table)
    post = "; a post-norm text encoder (from a BERT-family tower)" if cfg.text.norm_placement == "post" else ""
    console.print(f"image {cfg.image.image_size} px, patch {cfg.image.patch_size}; text up to "
                  f"{cfg.text.max_length} tokens; projection {cfg.projection_dim}{post}")
    _refused(ckpt, console)


def _refused(ckpt, console: Console) -> None:
    """What the loaders would refuse, said after the description: weights the config does not
    build. The model's (or a codebook checkpoint's) is an error; heads or a codebook beside a model
    only pretraining from it reads, so those are a note."""
    from rich.markup import escape

    from ..errors import CheckpointError
    from ..loading import checkpoint_mismatches

    found = checkpoint_mismatches(ckpt)
    if found and (found[0][0] == "model" or not ckpt.parts.get("model")):
        raise CheckpointError(" ".join(problem for _, problem in found) + " Every command that loads it refuses it.")
    for _, problem in found:
        console.print("note: " + escape(problem) + " Pretraining from it (init=, codebook=, load(pretraining=True), "
                      "export-hf --as pretraining) refuses it; embed, classify, evaluate and finetune read the model "
                      "alone.")


def _task_model(path, console: Console) -> None:
    """A fine-tuned task model: its task, outputs and the model under it."""
    from ..finetune.load import load_task

    tm = load_task(path)
    shown = ", ".join(tm.label_names[:8]) + (", ..." if len(tm.label_names) > 8 else "")
    kind = "answers" if tm.task == "vqa" else "labels"
    outputs = f"{len(tm.label_names)} {kind} ({shown})" if tm.label_names else "one value (regression)"
    params = sum(p.numel() for p in tm.classifier.parameters()) / 1e6
    console.print(f"{path}: a {tm.task} task model (`flava finetune`): {outputs}; {params:.2f} M parameters; "
                  f"predict with flava predict --model {path}")
