"""`flava export-hf`: write a checkpoint transformers' FlavaForPreTraining loads."""

from __future__ import annotations

import argparse

from rich.console import Console


def add(sub) -> None:
    p = sub.add_parser("export-hf", help="write a checkpoint (with processor and tokenizer files) that transformers "
                       "loads: FlavaForPreTraining, or FlavaModel with --as model")
    p.add_argument("checkpoint", help="a checkpoint directory, run directory or hub id")
    p.add_argument("output")
    p.add_argument("--as", dest="layout", choices=("pretraining", "model"),
                   help="FlavaForPreTraining (heads and codebook) or FlavaModel (encoders only); default: "
                        "pretraining when the checkpoint has pretraining heads, else model")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> None:
    from ..loading import read_checkpoint
    from ..interop.export import export_hf
    from ..io.runs import resolve

    model_only = None if args.layout is None else args.layout == "model"
    ckpt = read_checkpoint(resolve(args.checkpoint))
    notes = export_hf(ckpt, args.output, model_only=model_only)
    for note in notes:
        console.print(f"note: {note}")
    kind = "FlavaModel" if (not ckpt.parts.get("heads") if model_only is None else model_only) else \
        "FlavaForPreTraining"
    console.print(f"wrote a transformers {kind} checkpoint (with its processor and tokenizer) to {args.output}")
