"""`flava train-codebook`: train the dVAE image codebook that gives MIM/MMM targets."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from rich.console import Console

from .. import stopping


def add(sub) -> None:
    p = sub.add_parser("train-codebook", help="train the dVAE image codebook that gives MIM/MMM targets")
    p.add_argument("--images", nargs="+", default=[],
                   help="image files, directories, globs, shards, parquet; 'demo' for the packaged demo images")
    p.add_argument("--pairs", nargs="+", default=[], help="pair data whose images to train on (shards, tables)")
    p.add_argument("--output", required=True)
    p.add_argument("--config", help="a preset, a model's JSON config or pretrain's settings file; its codebook section "
                                    "is trained (default: tiny)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a model setting, as pretrain names it or "
                   "without its model. prefix: codebook.vocab_size=8192, model.image.image_size=96 (repeatable)")
    # The defaults are CodebookTraining's (a test holds them equal), said without importing torch.
    p.add_argument("--steps", type=int, help="optimizer steps (default 300; real data wants thousands)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="images per step (default 32)")
    p.add_argument("--lr", type=float, help="peak AdamW learning rate (default 0.002)")
    p.add_argument("--diversity-weight", dest="diversity_weight", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: the GPU when there is one")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--num-workers", dest="num_workers", type=int, help="loader workers (default: none on the CPU)")
    p.add_argument("--save-every", dest="save_every", type=int, help="steps between resumable saves")
    p.add_argument("--log-every", dest="log_every", type=int, help="steps between logged metrics")
    p.add_argument("--eval-images", dest="eval_images", type=int,
                   help="images in the fixed sample scored before and after training (default 512)")
    p.add_argument("--outage-minutes", dest="outage_minutes", type=float,
                   help="how long a remote shard whose store cannot serve it now is waited for (default 30; 0: passed "
                        "over, counted)")
    p.add_argument("--max-nonfinite-steps", dest="max_nonfinite_steps", type=int,
                   help="steps in a row whose loss or gradients are not finite (their updates skipped) before the run "
                        "stops as diverged (default 5)")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished training in --output with its own settings (only --steps, --lr, "
                        "--save-every, --log-every, --outage-minutes, --max-nonfinite-steps, --device and "
                        "--num-workers may change)")
    p.set_defaults(run=run, graceful=True)  # stops at its boundaries on SIGTERM/SIGINT


def run(args: argparse.Namespace, console: Console) -> None:
    from ..config import apply_overrides, check, validate
    from ..errors import ConfigError, InputError
    from ..train.codebook import CodebookTraining, run_train_codebook
    from ..train.presets import model_settings

    # The model's settings, named as pretrain names them (model.image.image_size) or without the prefix.
    overrides = [o.removeprefix("--").removeprefix("model.") for o in args.set or []]
    flags = {f.name for f in dataclasses.fields(CodebookTraining)} & set(vars(args))
    for key in (o.partition("=")[0].strip() for o in overrides):
        if key in flags:  # --set takes the model's settings; the training's are flags
            raise ConfigError(f"--set {key}: {key} is a training setting, not the model's; give it as "
                              f"--{key.replace('_', '-')}")
    cfg = validate(apply_overrides(model_settings(args.config or "tiny"), overrides))
    settings = CodebookTraining()
    given = set()
    for field in dataclasses.fields(settings):
        value = getattr(args, field.name, None)
        if value is not None:
            setattr(settings, field.name, value)
            given.add(field.name)
    given |= {name for name, value in (("config", args.config), ("set", args.set)) if value}
    if not (args.images or args.pairs or args.resume):
        raise InputError("name the images to train on: --images (files, folders, shards; 'demo') or --pairs")
    # What a second signal (a stop at once) leaves, until the training saves its state and after.
    stopping.tell_saves_of_a_run(args.resume, "the training", "the state it resumed from")
    run_train_codebook(args.images, Path(args.output), cfg, check(settings), console, pairs_spec=args.pairs,
                       resume=args.resume, given=given)
