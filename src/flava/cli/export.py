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

    ckpt = read_checkpoint(resolve(args.checkpoint))
    model_only = not ckpt.parts.get("heads") if args.layout is None else args.layout == "model"
    _check(ckpt, model_only)
    notes = export_hf(ckpt, args.output, model_only=model_only)
    for note in notes:
        console.print(f"note: {note}")
    kind = "FlavaModel" if model_only else "FlavaForPreTraining"
    console.print(f"wrote a transformers {kind} checkpoint (with its processor and tokenizer) to {args.output}")


def _check(ckpt, model_only: bool) -> None:
    """Refuse, before anything is written, weights a loader would refuse (the checks `flava info`
    and `flava.load` make): transformers could not load their export either. Heads and a codebook
    count only where the export carries them."""
    from ..errors import CheckpointError
    from ..loading import checkpoint_mismatches, refuse_non_finite

    exported = ("model",) if model_only else ("model", "heads", "codebook")
    found = [(part, why) for part, why in checkpoint_mismatches(ckpt) if part in exported]
    if found:
        fix = "" if found[0][0] == "model" else " Export the encoders alone with --as model."
        raise CheckpointError(" ".join(why for _, why in found) + " Every command that loads it refuses it, "
                              "export-hf too." + fix)
    for part in exported:
        refuse_non_finite(ckpt.parts.get(part) or {}, part, ckpt.path)
