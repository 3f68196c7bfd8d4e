"""`flava train-codebook`: train the dVAE image codebook that gives MIM/MMM targets."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from rich.console import Console


def add(sub) -> None:
    p = sub.add_parser("train-codebook", help="train the dVAE image codebook that gives MIM/MMM targets")
    p.add_argument("--images", nargs="+", required=True,
                   help="image files, directories or globs; 'demo' for the packaged demo images")
    p.add_argument("--output", required=True)
    p.add_argument("--config", default="tiny", help="preset or JSON config; its codebook section is trained")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--diversity-weight", dest="diversity_weight", type=float)
    p.add_argument("--seed", type=int)
    p.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> None:
    from ..config import apply_overrides, check, config_from, validate
    from ..train.codebook import CodebookTraining, run_train_codebook

    cfg = validate(apply_overrides(config_from(args.config), args.set or []))
    settings = CodebookTraining()
    for field in dataclasses.fields(settings):
        value = getattr(args, field.name, None)
        if value is not None:
            setattr(settings, field.name, value)
    run_train_codebook(args.images, Path(args.output), cfg, check(settings), console)
