"""`flava pretrain`: pretrain FLAVA (with no data arguments: the tiny preset on the demo data)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console


def add(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain FLAVA (with no data arguments: tiny preset on the demo data)")
    p.add_argument("--config", help="JSON file of training settings (see flava.train.config.TrainConfig)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any setting, e.g. optim.lr=1e-4 or data.pairs='[\"shards/*.tar\"]'")
    p.add_argument("--output", required=True)
    p.add_argument("--max-steps", dest="max_steps", type=int)
    p.add_argument("--save-every", dest="save_every", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> None:
    from ..config import apply_overrides, from_dict
    from ..io.files import read_json
    from ..train.config import TrainConfig
    from ..train.run import run_pretrain

    cfg = TrainConfig()
    if args.config:
        cfg = from_dict(TrainConfig, read_json(args.config))
    cfg = apply_overrides(cfg, args.set or [])
    if args.max_steps is not None:
        cfg.max_steps = args.max_steps
    if args.save_every is not None:
        cfg.save_every = args.save_every
    run_pretrain(cfg, Path(args.output), resume=args.resume, console=console)
