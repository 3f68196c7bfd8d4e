"""`flava evaluate`: run an evaluation suite and write a report."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from ..io.runs import MODEL_HELP


def add(sub) -> None:
    p = sub.add_parser("evaluate", help="run an evaluation suite and write a report (markdown, JSON, PNG)")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--suite", required=True, help="a suite JSON file, or 'demo' for the packaged-data suite")
    p.add_argument("--output", required=True, help="where report.md, report.json and the pictures go")
    p.add_argument("--compare-untrained", dest="compare_untrained", action="store_true",
                   help="also run the suite on a newly initialised model of the same configuration")
    p.add_argument("--replace", action="store_true", help="write over the report an --output folder holds")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> None:
    from rich.markup import escape

    from ..evaluate.run import run_evaluate

    note = untrained_note(args.model)
    if note:
        console.print(f"note: {escape(note)}")
    run_evaluate(args.model, args.suite, Path(args.output), console, compare_untrained=args.compare_untrained,
                 replace=args.replace)


def untrained_note(model: str) -> str | None:
    """What a unimodal stage's checkpoint leaves untrained, said before its scores are read as the
    model's: a text-mlm stage's zero-shot score measures an image encoder no step trained."""
    from ..errors import FlavaError
    from ..io.checkpoint import read_config
    from ..io.runs import resolve
    from ..train.init import GROUPS, stage_trains

    try:
        train = read_config(resolve(model)).get("train") or {}
    except (FlavaError, OSError):
        return None  # loading the model says what is wrong
    trained = stage_trains(train.get("stage"))
    if trained is None or train.get("init"):
        return None
    untrained = [name for name in GROUPS if name != trained and not train.get(f"init_{name}")]
    if not untrained:
        return None
    return (f"{model} was written by a {train['stage']} stage, which trains the {trained} encoder alone: the "
            f"{' and '.join(untrained)} encoder{'s are' if len(untrained) > 1 else ' is'} as initialised, and so "
            "are the projections; tasks that use them measure untrained parts (a fine-tune trains them)")
