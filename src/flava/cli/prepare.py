"""`flava prepare`: write training shards once (resized images, cleaned captions, image tokens)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def add(sub) -> None:
    p = sub.add_parser("prepare", help="write training shards once: resized images, cleaned captions, bad samples "
                       "dropped and counted, and the image codebook's tokens precomputed")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--pairs", nargs="+", metavar="SPEC",
                      help="pair sources: CSV/TSV, WebDataset shards, parquet, datasets directories")
    what.add_argument("--images", nargs="+", metavar="SPEC",
                      help="image sources: folders (sub-folders are classes), shards, parquet, datasets")
    p.add_argument("--output", required=True, help="directory for the shards, index.json and prepare_report.json")
    p.add_argument("--codebook", help="image codebook directory: its token ids are stored with each image "
                   "(training on the shards then never runs it)")
    p.add_argument("--config", default="tiny", help="model preset or JSON config the tokens are for (image and "
                   "codebook input sizes)")
    p.add_argument("--size", type=int, default=256, help="shorter image side after resizing (default 256)")
    p.add_argument("--shard-size", dest="shard_size", type=int, default=1000,
                   help="samples per shard for CSV/TSV/JSONL tables and folders (default 1000); input tar shards, "
                        "parquet row groups and Arrow record batches map one to one")
    p.add_argument("--crops", type=int, default=4, help="crop boxes tokenized per image (default 4)")
    p.add_argument("--crop-scale-min", dest="crop_scale_min", type=float, default=0.9,
                   help="smallest share of the image a crop keeps (default 0.9, as training)")
    p.add_argument("--workers", type=int, help="processes (default: the CPU cores)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the codebook tokenises (default: the GPU when there is one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-unreadable", dest="skip_unreadable", action="store_true",
                   help="finish without the inputs a store cannot serve now (counted in the report); by default "
                        "they are left for the next run")
    # Stops at its boundaries on SIGTERM/SIGINT, and says so in its own words.
    p.set_defaults(run=run, graceful="stopping: the units finished are kept, and a rerun finishes the rest",
                   leaves="the units finished are kept: run the same command again to finish the rest")


def run(args: argparse.Namespace, console: Console) -> None:
    from ..config import Seed, check_value
    from ..distributed import resolve_device
    from ..data.prepare import PrepareSettings, default_workers, prepare
    from ..data.registry import check_disjoint, check_distinct, open_source
    from ..data.sources import listing_said
    from ..data.tables import is_table
    from ..errors import ConfigError, DataError
    from ..loading import CodebookTokenizer, codebook_scale_note
    from ..progress import progress_bar
    from ..train.presets import model_settings

    model = model_settings(args.config)
    for name, low in (("size", 8), ("shard_size", 1), ("crops", 1)):
        if getattr(args, name) < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least {low}")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be at least 1 (it is {args.workers}); leave it out for one per CPU core")
    check_value("--crop-scale-min", args.crop_scale_min, float)
    check_value("--seed", args.seed, Seed)
    if not 0 < args.crop_scale_min <= 1:
        raise ConfigError("--crop-scale-min must be in (0, 1]")
    kind = "pairs" if args.pairs else "images"
    check_distinct(args.pairs or args.images, f"--{kind}", "")
    sources = [open_source(kind, s) for s in (args.pairs or args.images)]
    check_disjoint(sources, f"--{kind}", "")
    settings = PrepareSettings(size=args.size, shard_size=args.shard_size, crops=args.crops,
                               crop_scale_min=args.crop_scale_min, codebook_image_size=model.codebook_image_size,
                               image_size=model.image.image_size, seed=args.seed)
    device = resolve_device(args.device).type
    # On a GPU this process tokenises the crops the worker processes read, in batches; on the CPU
    # each worker tokenises its own.
    tokenizer = CodebookTokenizer(args.codebook, device) if args.codebook else None
    fingerprint, vocab, trained = tokenizer.identity() if tokenizer else (None, None, None)
    if vocab is not None and vocab != model.image.vocab_size:  # recorded: pretraining refuses another vocabulary
        console.print(f"note: the codebook has {vocab} tokens and the --config model's MIM/MMM heads predict "
                      f"{model.image.vocab_size}: train on these shards with model.image.vocab_size={vocab}")
    note = codebook_scale_note(args.codebook, trained, model, "the --config model's")
    if note:  # as `flava pretrain` says of such a codebook
        console.print(note)
    workers = args.workers or default_workers()
    output = Path(args.output)
    created = not output.exists()
    if args.size < model.image.image_size:
        console.print(f"note: --size {args.size} is below the model's {model.image.image_size}-px input: training "
                      f"upscales every crop; give --size {model.image.image_size} or more")
    for source in sources:  # a table's bad rows and likely stray quotes, as pretraining says them at its start
        for said in listing_said(source):
            console.print(f"note: {source.name}: {escape(said)}")
    console.print(f"preparing {kind} from {', '.join(s.name for s in sources)} into {output} with {workers} "
                  f"process{'es' if workers > 1 else ''}" + (f"; image tokens from {args.codebook} on {device}" if tokenizer else ""))
    with progress_bar(console) as bar:
        task = bar.add_task("shards", total=None, info="")

        def progress(done: int, total: int, unread: int) -> None:
            bar.update(task, completed=done, total=total, info=f"{unread} could not be read" if unread else "")

        report = prepare(kind, sources, output, settings, tokenizer, fingerprint, grid=model.image.grid_size,
                         image_size=model.image.image_size, workers=workers, progress=progress, vocab_size=vocab,
                         skip_unreadable=args.skip_unreadable, tokenize_here=device != "cpu",
                         say=console.print)
    if report["samples"] == 0:
        # Nothing to train on: an error, not a recipe for an empty run (and no empty shards left behind).
        if created:
            shutil.rmtree(output, ignore_errors=True)
        why = ", ".join(f"{n:,} {reason}" for reason, n in sorted(report["dropped"].items())) or "no samples found"
        first = report["first_dropped"]
        if "missing image file" in first and any(is_table(s.name) for s in sources):
            raise DataError(f"no usable sample in {', '.join(s.name for s in sources)} ({why}; the first: "
                            f"{first['missing image file']}): a table's relative image paths are read from its "
                            "folder; write them relative to the table, or absolute")
        raise DataError(f"no usable sample in {', '.join(s.name for s in sources)} ({why}); check that --{kind} "
                        f"names {'WebDataset tar shards or a CSV of image,caption' if kind == 'pairs' else 'images'}")
    table = Table(title=f"prepared {kind}")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("samples written", f"{report['samples']:,}")
    table.add_row("shards", f"{report['shards']:,}")
    table.add_row("bytes per sample", f"{report['bytes_per_sample']:,.0f}")
    table.add_row("image tokens", "yes" if report["image_tokens"] else "no")
    for reason, n in sorted(report["dropped"].items()):
        table.add_row(f"dropped: {reason}", f"{n:,}")
    console.print(table)
    for reason, where in sorted(report["first_dropped"].items()):
        console.print(f"  first {reason}: {escape(where)}")
    if report["units_done_before"] == report["units"]:
        console.print(f"note: {output} was prepared before from these inputs, unchanged: nothing was done, and the "
                      "figures are that run's")
    console.print(f"train on it with --set 'data.{kind}=[\"{output}\"]'"
                  + (" (no codebook needed)" if report["image_tokens"] else ""))
