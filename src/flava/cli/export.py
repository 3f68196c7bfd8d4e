"""`flava export-hf`: write a checkpoint transformers' FlavaForPreTraining loads."""

from __future__ import annotations

import argparse

from rich.console import Console


def add(sub) -> None:
    p = sub.add_parser("export-hf", help="write a checkpoint transformers' FlavaForPreTraining loads")
    p.add_argument("checkpoint")
    p.add_argument("output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> None:
    from ..hub import read_checkpoint
    from ..interop.export import export_hf

    notes = export_hf(read_checkpoint(args.checkpoint), args.output)
    for note in notes:
        console.print(f"note: {note}")
    console.print(f"wrote a transformers FlavaForPreTraining checkpoint to {args.output}")
