"""`flava config show`: every training setting with its value and what it means."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table


def add(sub) -> None:
    p = sub.add_parser("config", help="show every `flava pretrain` setting, its value and what it does")
    p.add_argument("action", choices=["show"])
    p.add_argument("--config", help="a preset (tiny, small, base) or a JSON file of training settings "
                   "(over the preset its \"preset\" key names)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting (repeatable)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> None:
    from ..config import apply_overrides, check, describe, plain, validate
    from ..train.presets import train_config
    from ..train.trainer import check_stage

    cfg = check(apply_overrides(train_config(args.config or "tiny"), args.set or []))
    # What `flava pretrain` refuses of these settings alone (no data read): said here too.
    validate(cfg.model)
    check_stage(cfg)
    if not console.is_terminal:
        # Piped (grep, less, a file): one whole line per setting instead of a table whose
        # descriptions fold at the console's width.
        for key, value, doc in describe(cfg):
            console.print(f"{key} = {json.dumps(plain(value))}  # {doc}", soft_wrap=True, markup=False, highlight=False)
        return
    table = Table(title="flava pretrain settings (set any with --set KEY=VALUE)", show_lines=False)
    table.add_column("setting", no_wrap=True)
    table.add_column("value", overflow="fold", max_width=30)
    table.add_column("what it does", overflow="fold")
    for key, value, doc in describe(cfg):
        table.add_row(key, json.dumps(plain(value)), doc)
    console.print(table)
