"""`flava init`: write a newly initialised model."""

from __future__ import annotations

import argparse

from rich.console import Console


def add(sub) -> None:
    p = sub.add_parser("init", help="write a newly initialised model")
    p.add_argument("--config", default="tiny", help="preset name (tiny, small, base) or a JSON config file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a model setting, as `flava config "
                   "show` names it or without its model. prefix: model.projection_dim=64 (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="the initialisation's seed (default 0)")
    p.add_argument("--output", required=True)
    p.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> None:
    from pathlib import Path

    import torch

    from ..config import apply_overrides, validate
    from ..errors import ConfigError
    from ..model import FlavaModel
    from ..train.presets import model_settings

    # The model's settings, named as `flava config show` prints them (model.projection_dim) or without the prefix.
    overrides = [o.removeprefix("--").removeprefix("model.") for o in args.set or []]
    cfg = validate(apply_overrides(model_settings(args.config), overrides))
    # A model there may be a trained one, with embeddings and indexes made by it: never replaced unasked.
    if (Path(args.output) / "config.json").is_file():
        raise ConfigError(f"{args.output} already holds a checkpoint (its config.json); choose another --output "
                          "(or remove it to initialise a model there)")
    torch.manual_seed(args.seed)
    model = FlavaModel(cfg)
    model.save_pretrained(args.output)
    console.print(f"wrote a newly initialised model ({model.num_parameters() / 1e6:.1f} M parameters) to {args.output}")
