"""`flava <command>`: the command-line entry point."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .errors import FlavaError

# Piped output (make, CI logs) gets room for the results tables instead of the 80-column default.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 110)


def _cmd_init(args) -> None:
    import torch

    from .config import apply_overrides, config_from, validate
    from .model import FlavaModel

    cfg = validate(apply_overrides(config_from(args.config), args.set or []))
    torch.manual_seed(args.seed)
    model = FlavaModel(cfg)
    model.save_pretrained(args.output)
    console.print(f"wrote a newly initialised model ({model.num_parameters() / 1e6:.1f} M parameters) to {args.output}")


def _cmd_info(args) -> None:
    from .storage import read_checkpoint

    ckpt = read_checkpoint(args.checkpoint)
    cfg = ckpt.config
    table = Table(title=f"{ckpt.path} ({ckpt.source} format)")
    for col in ("part", "layers", "hidden", "heads", "mlp", "tensors", "parameters"):
        table.add_column(col, justify="right" if col != "part" else "left")
    prefixes = {"image": "image_encoder.", "text": "text_encoder.", "multimodal": "multimodal_encoder."}
    model = ckpt.parts["model"]
    for name, prefix in prefixes.items():
        enc = getattr(cfg, name)
        keys = [k for k in model if k.startswith(prefix)]
        table.add_row(name, str(enc.num_layers), str(enc.hidden_size), str(enc.num_heads), str(enc.mlp_size),
                      str(len(keys)), f"{sum(model[k].numel() for k in keys) / 1e6:.2f} M")
    for part in ("heads", "codebook"):
        sd = ckpt.parts.get(part) or {}
        table.add_row(part, "", "", "", "", str(len(sd)),
                      f"{sum(v.numel() for v in sd.values()) / 1e6:.2f} M" if sd else "absent")
    console.print(table)
    console.print(f"image {cfg.image.image_size} px, patch {cfg.image.patch_size}; text up to "
                  f"{cfg.text.max_position_embeddings} tokens; projection {cfg.projection_dim}")


def _cmd_export_hf(args) -> None:
    from .interop.export import export_hf

    notes = export_hf(args.checkpoint, args.output)
    for note in notes:
        console.print(f"note: {note}")
    console.print(f"wrote a transformers FlavaForPreTraining checkpoint to {args.output}")


def _cmd_train_tokenizer(args) -> None:
    import dataclasses

    from .codebook import TokenizerTraining
    from .config import apply_overrides, config_from, validate
    from .tokenizer_cli import run_train_tokenizer

    cfg = validate(apply_overrides(config_from(args.config), args.set or []))
    settings = TokenizerTraining()
    for field in dataclasses.fields(settings):
        value = getattr(args, field.name, None)
        if value is not None:
            setattr(settings, field.name, value)
    run_train_tokenizer(args.images, Path(args.output), cfg, settings, console)


def _cmd_pretrain(args) -> None:
    from .config import apply_overrides, from_dict
    from .train.config import TrainConfig
    from .train.run import run_pretrain

    cfg = TrainConfig()
    if args.config:
        from .config import read_json

        cfg = from_dict(TrainConfig, read_json(args.config))
    cfg = apply_overrides(cfg, args.set or [])
    if args.max_steps is not None:
        cfg.max_steps = args.max_steps
    if args.save_every is not None:
        cfg.save_every = args.save_every
    run_pretrain(cfg, Path(args.output), resume=args.resume, console=console)


def _cmd_evaluate(args) -> None:
    from .evaluate.run import run_evaluate

    run_evaluate(args.model, args.suite, Path(args.output), console, compare_untrained=args.compare_untrained)


def _cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(Path(args.output), console)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flava", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the end-to-end demo on packaged data")
    p.add_argument("--output", default="runs/demo", help="where the demo writes (default: runs/demo)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("init", help="write a newly initialised model")
    p.add_argument("--config", default="tiny", help="preset name (tiny, small, base) or a JSON config file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True)
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("pretrain", help="pretrain FLAVA (with no data arguments: tiny preset on the demo data)")
    p.add_argument("--config", help="JSON file of training settings (see flava.train.config.TrainConfig)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any setting, e.g. optim.lr=1e-4 or data.pairs='[\"shards/*.tar\"]'")
    p.add_argument("--output", required=True)
    p.add_argument("--max-steps", dest="max_steps", type=int)
    p.add_argument("--save-every", dest="save_every", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("evaluate", help="run an evaluation suite and write a report (markdown, JSON, PNG)")
    p.add_argument("--model", required=True, help="a checkpoint directory (ours or transformers'), or a run directory")
    p.add_argument("--suite", required=True, help="a suite JSON file, or 'demo' for the packaged-data suite")
    p.add_argument("--output", required=True, help="where report.md, report.json and the pictures go")
    p.add_argument("--compare-untrained", dest="compare_untrained", action="store_true",
                   help="also run the suite on a newly initialised model of the same configuration")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("train-tokenizer", help="train the dVAE image tokenizer that gives MIM/MMM targets")
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
    p.set_defaults(func=_cmd_train_tokenizer)

    p = sub.add_parser("info", help="describe a checkpoint (ours or Hugging Face's)")
    p.add_argument("checkpoint")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("export-hf", help="write a checkpoint transformers' FlavaForPreTraining loads")
    p.add_argument("checkpoint")
    p.add_argument("output")
    p.set_defaults(func=_cmd_export_hf)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        args.func(args)
    except FlavaError as e:
        print(f"flava {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flava {args.command}: interrupted after {time.perf_counter() - start:.0f} s", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
