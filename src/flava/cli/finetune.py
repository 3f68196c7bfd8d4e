"""`flava finetune`: fine-tune a pretrained model on a task given as plain files, report its
validation (and test) metrics and save a task model for `flava predict` and `flava.load_task`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from .. import stopping
from ..io.runs import MODEL_HELP

VAL_FRACTION = 0.1

INPUTS = {
    "text-classification": "a table (CSV, TSV, JSONL, parquet) with text,label (and text2 for sentence pairs)",
    "text-regression": "a table with text,label (a number; text2 for pairs)",
    "image-classification": "a folder with one sub-folder of images per class, or a table with image,label",
    "vqa": "a table with image,question,answer (or answers: a list, in a CSV as JSON)",
    "visual-entailment": "a table with image,text,label",
    "image-text-classification": "a table with image,text,label",
}


def add(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune on a task from tables (CSV, TSV, JSONL, parquet) or image "
                                        "folders and save a task model for `flava predict`")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--task", required=True, metavar="KIND",
                   help="; ".join(f"{k}: {v}" for k, v in INPUTS.items()))
    p.add_argument("--train", required=True, help="the training data (file or folder, as --task describes)")
    p.add_argument("--val", help="validation data; default: a seeded --val-fraction of --train")
    p.add_argument("--test", help="test data, scored once with the best validation state")
    p.add_argument("--output", required=True, help="the task model directory to write")
    p.add_argument("--replace", action="store_true",
                   help="replace the task model that --output already holds")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, help="peak learning rate; default 1e-4, or 1e-3 with --head-only")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=32)
    p.add_argument("--max-steps", dest="max_steps", type=int, help="stop after this many steps")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--train-encoders", dest="train_encoders", action="store_true", default=True,
                      help="fine-tune the encoders with the head (the default)")
    mode.add_argument("--head-only", dest="train_encoders", action="store_false",
                      help="freeze the encoders and train the head alone (much faster on a CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", dest="val_fraction", type=float,
                   help=f"share of --train held out for validation when --val is not given (default {VAL_FRACTION})")
    p.add_argument("--max-text-length", dest="max_text_length", type=int,
                   help="tokens per text; default: the model's positions")
    p.add_argument("--resume", action="store_true",
                   help="continue the fine-tuning in --output that SIGTERM or Ctrl-C stopped (same arguments)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda when available, else cpu)")
    p.set_defaults(run=run, graceful=True)  # stops at its boundaries on SIGTERM/SIGINT


SMALL_VAL = 20
"""Below this many validation examples, the choice of the state kept rests on a handful of answers."""


def read_task(kind: str, train: str, val: str | None, test: str | None, val_fraction: float, seed: int):
    """The task's examples from the files a user gives (every data error before any training)."""
    from ..data.tables import SUFFIXES, is_table
    from ..errors import DataError
    from ..evaluate.readers.text import read_text_classification
    from ..evaluate.readers.user_files import read_image_classification, read_multimodal_table

    name = Path(train).stem
    if kind in ("text-classification", "text-regression"):
        for p in (train, val, test):
            if p is not None and not is_table(p):
                raise DataError(f"{p}: a {kind} task reads tables ({', '.join(SUFFIXES)}) with text and label "
                                f"columns")
        return read_text_classification(train, val, test, regression=kind == "text-regression",
                                        val_fraction=val_fraction, seed=seed, name=name)
    if kind == "image-classification":
        return read_image_classification(train, val, test, val_fraction=val_fraction, seed=seed, name=name)
    return read_multimodal_table(train, val, test, kind="vqa" if kind == "vqa" else "classification",
                                 val_fraction=val_fraction, seed=seed, name=name)


def _tokenizer(checkpoint: Path, model):
    from ..data.tokenizer import TextTokenizer

    # A checkpoint that ships its own tokenizer.json was trained with it.
    own = checkpoint / "tokenizer.json"
    return TextTokenizer(own if own.is_file() else None, max_length=model.config.text.max_length)


def run(args: argparse.Namespace, console: Console) -> None:
    import shutil

    from ..config import check
    from ..errors import ConfigError, did_you_mean
    from ..finetune.settings import TRAINING, FinetuneSettings
    from ..finetune.taskmodel import TASKS, check_output
    from ..io.files import check_not_current, check_writable
    from ..io.runs import LOCK, RunDir

    if args.task not in TASKS:
        raise ConfigError(f"unknown task {args.task!r}{did_you_mean(args.task, TASKS, 'tasks')}")
    if args.task == "image-classification" and args.max_text_length is not None:
        raise ConfigError("--max-text-length truncates texts, and an image-classification model reads none: drop it")
    if args.val is not None and args.val_fraction is not None:
        raise ConfigError(f"--val-fraction {args.val_fraction:g} carves validation out of --train, and --val gives "
                          "it: drop one")
    if args.val_fraction is None:
        args.val_fraction = VAL_FRACTION
    output = Path(args.output)
    # A --resume continues what its first command (with --replace, where needed) began.
    replaced = check_output(output, args.task, args.replace or args.resume)
    check_writable(output.parent)  # the task model replaces `output` whole from a folder beside it
    check_not_current(output)
    settings = check(FinetuneSettings(
        lr=args.lr if args.lr is not None else (1e-4 if args.train_encoders else 1e-3), epochs=args.epochs,
        batch_size=args.batch_size, max_steps=args.max_steps, train_encoders=args.train_encoders, seed=args.seed,
        max_text_length=args.max_text_length))
    # What a second signal (a stop at once) leaves: a fine-tuning saves its state only when it stops on request.
    if args.resume:
        stopping.tell_saves("nothing was saved since the stopped state it resumed from: continue with the same "
                            "command and --resume")
    else:
        stopping.tell_saves("nothing was saved: run the same command again to start the fine-tuning")
    # One writer per output: a second fine-tuning there would race for its state and task model.
    made = [p for p in (output, *output.parents) if not p.exists()]  # what the lock's mkdir creates
    locked_before = (output / LOCK).exists()
    with RunDir(output).lock():
        try:
            _finetune(args, console, output, settings, replaced)
        except BaseException:
            # A failed start leaves nothing: no folder it made, no lock beside a task model it kept.
            if made and {p.name for p in output.iterdir()} <= {LOCK}:
                shutil.rmtree(output)
                for folder in made[1:]:
                    if any(folder.iterdir()):
                        break
                    folder.rmdir()
            elif not locked_before and not (output / TRAINING).exists():
                (output / LOCK).unlink(missing_ok=True)
            raise


def _finetune(args: argparse.Namespace, console: Console, output: Path, settings, replaced: str | None) -> None:
    from rich.table import Table

    from ..config import to_dict
    from ..errors import ConfigError
    from ..evaluate.run import load_model
    from .embed import inference_device
    from ..finetune.loop import (check_max_text_length, check_resume, finetune_image, finetune_multimodal,
                                 finetune_text)
    from ..finetune.settings import TRAINING, Resumable, data_identity
    from ..finetune.taskmodel import save_task_model
    from ..finetune.text import truncating_copy
    from ..io.files import recover_replaced
    from ..io.fingerprint import checkpoint_identity
    from ..io.runs import resolve
    from ..progress import progress_bar

    # A fine-tuning stopped on request keeps its state in OUTPUT/training until its task model is saved;
    # a save killed midway leaves the previous state (moved back) and staging copies (removed).
    device = inference_device(args.device)  # a device that is not there, said before anything is read
    recover_replaced(output / TRAINING)
    stopped = (output / TRAINING / "state.pt").is_file()
    if stopped and not args.resume:
        raise ConfigError(f"{output} holds a fine-tuning that was stopped before it finished: add --resume to "
                          "continue it, or choose another --output")
    if args.resume and not stopped:
        raise ConfigError(f"--resume: {output} holds no stopped fine-tuning to continue; check the path, or leave "
                          "out --resume")
    # The checkpoint itself, not only its name: a run's newest checkpoint moves on as it trains.
    weights = checkpoint_identity(resolve(args.model))
    resumable = Resumable(output / TRAINING, {
        "model": args.model, "model_weights": f"{weights['path']} ({weights['fingerprint']})", "task": args.task,
        "train": args.train, "val": args.val, "test": args.test, "val_fraction": args.val_fraction,
        "data": {name: data_identity(getattr(args, name)) for name in ("train", "val", "test")},
        "settings": to_dict(settings)})
    if stopped:
        check_resume(resumable)
    task = read_task(args.task, args.train, args.val, args.test, args.val_fraction, args.seed)
    if stopped:
        console.print(f"resuming the fine-tuning stopped in {output}")
    outputs = "regression" if not task.label_names else \
        f"{len(task.label_names)} {'answers' if args.task == 'vqa' else 'labels'}"
    console.print(f"task [bold]{escape(task.name)}[/] ({args.task}): {len(task.train)}/{len(task.val)}/"
                  f"{len(task.test) if args.test else 0} train/val/test examples, {outputs}")
    for note in task.notes:
        console.print(f"  {escape(note)}")
    if len(task.val) < SMALL_VAL:
        console.print(f"note: validation holds {len(task.val)} example(s), from which the state kept is chosen (a "
                      "tie goes to the lower validation loss); "
                      + ("give a larger --val" if args.val else "give --val" if len(task.val) >= len(task.train)
                         else "give --val, or a larger --val-fraction"))  # not larger where it left few to train on
    model, resolved = load_model(args.model)
    model.to(device)
    tokenizer = _tokenizer(Path(resolved), model) if args.task != "image-classification" else None
    if tokenizer is not None and settings.max_text_length is not None:  # refused before the progress bar
        check_max_text_length(settings, model)
        pairs = any(getattr(e, "text2", None) is not None for e in task.train)
        truncating_copy(tokenizer, settings.max_text_length, pairs)
    if replaced:  # said once the command is known to go ahead
        console.print(f"note: the {replaced} task model in {output} will be replaced")
    console.print(f"model: {resolved} on {device}; {'full fine-tuning' if settings.train_encoders else 'head only'}, "
                  f"lr {settings.lr:g}, {settings.epochs} epoch(s), batch {settings.batch_size}")

    with progress_bar(console) as progress:
        bar = progress.add_task(f"fine-tuning {escape(task.name)}", total=None,
                                info="" if settings.train_encoders else "computing features")

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(bar, completed=step, total=total, info=f"loss {loss:.4f}")

        if args.task == "image-classification":
            result = finetune_image(model, task, settings, on_step, resumable)
        elif args.task in ("text-classification", "text-regression"):
            result = finetune_text(model, task, settings, tokenizer, on_step, resumable)
        else:
            result = finetune_multimodal(model, task, settings, tokenizer, on_step, resumable)

    best = result.val_metrics[result.eval_steps.index(result.best_step)]
    console.print(f"best validation {result.metric} at step {result.best_step} of {result.steps}")
    # x100, as `evaluate` and `classify` show scores (and the paper its tables); task.json keeps fractions.
    # The mean absolute error beside a regression's correlations, in the labels' units (not x100).
    mae = ["mae"] if "mae" in best and "mae" not in task.metrics else []
    table = Table(title=escape(task.name), caption="scores x100" + ("; mae as measured" if mae else ""))
    table.add_column("metric")
    table.add_column("validation", justify="right")
    if args.test:
        table.add_column("test", justify="right")
    for name in (*task.metrics, *mae):
        shown = (lambda v: f"{v:.4g}") if name == "mae" else (lambda v: f"{100 * v:.1f}")
        table.add_row(name, shown(best[name]), *([shown(result.test_metrics[name])] if args.test else []))
    console.print(table)

    def where(path):  # a local file as a path that still means it once the task model is moved
        return os.path.abspath(path) if path is not None and Path(path).exists() else path

    info = {"source_model": str(where(resolved)), "settings": to_dict(settings),
            "data": {"train": where(args.train), "val": where(args.val), "test": where(args.test),
                     "val_fraction": args.val_fraction}}
    if not args.test:  # the "test" scores were validation's again
        info["test_metrics"] = {}
    tm = save_task_model(result, output, task=args.task, tokenizer=tokenizer, info=info)
    example = {"image-classification": "IMAGE_DIR|IMAGE...", "text-classification": "FILE.csv|FILE.txt",
               "text-regression": "FILE.csv|FILE.txt"}.get(args.task, "FILE.csv|FILE.jsonl")
    call = {"image-classification": "images=[...]", "text-classification": "texts=[...]",
            "text-regression": "texts=[...]"}.get(args.task, "images=[...], texts=[...]")
    if tm.pairs:  # a .txt holds one text a line: no pairs
        call, example = "texts=[...], texts2=[...]", "FILE.csv|FILE.jsonl"
    console.print(f"task model: [bold]{output}[/] ({args.task}, {outputs})")
    console.print(f"predict with: flava predict --model {output} --input {example} [--output preds.csv]")
    console.print(f"in Python:    flava.load_task({str(output)!r}).predict({call})")
