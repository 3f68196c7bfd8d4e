"""`flava evaluate`: run an evaluation suite and write a report."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console


def add(sub) -> None:
    p = sub.add_parser("evaluate", help="run an evaluation suite and write a report (markdown, JSON, PNG)")
    p.add_argument("--model", required=True, help="a checkpoint directory (ours or transformers'), or a run directory")
    p.add_argument("--suite", required=True, help="a suite JSON file, or 'demo' for the packaged-data suite")
    p.add_argument("--output", required=True, help="where report.md, report.json and the pictures go")
    p.add_argument("--compare-untrained", dest="compare_untrained", action="store_true",
                   help="also run the suite on a newly initialised model of the same configuration")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> None:
    from ..evaluate.run import run_evaluate

    run_evaluate(args.model, args.suite, Path(args.output), console, compare_untrained=args.compare_untrained)
