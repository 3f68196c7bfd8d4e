"""`flava embed`: embeddings of images, texts or pairs, written as .npy + parquet (resumable)."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape

from .. import stopping
from ..io.runs import MODEL_HELP


def add(sub) -> None:
    p = sub.add_parser("embed", help="embed images, texts or image-caption pairs into .npy files with a parquet of "
                       "metadata (clip-retrieval's layout); a rerun resumes")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", nargs="+", metavar="PATH", help="image files, folders (recursive) or globs")
    what.add_argument("--texts", metavar="FILE", help="a .txt file (one text per line), or a table (CSV, TSV, JSONL, "
                      "parquet) with a text, caption or sentence column")
    what.add_argument("--pairs", metavar="CSV|SHARDS", help="a CSV/TSV/JSONL table with image and caption "
                      "columns, WebDataset shards or parquet")
    p.add_argument("--output", required=True, help="directory for img_emb/, text_emb/, metadata/ and embed.json")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=32)
    p.add_argument("--part-size", dest="part_size", type=int, default=10_000,
                   help="inputs per part; a part is the unit a rerun skips (default 10000)")
    p.add_argument("--float16", action="store_true", help="store embeddings as float16 (half the disk)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda when available, else cpu)")
    p.add_argument("--int8", action="store_true", help="int8 linear layers (CPU inference)")
    # Stops at its boundaries on SIGTERM/SIGINT, and says so in its own words.
    p.set_defaults(run=run, graceful="stopping after the batch in progress: the parts finished are kept, and a "
                                     "rerun finishes the rest",
                   leaves="the parts finished are kept: run the same command again to finish the rest")


def load_for_inference(name: str, device: str | None, int8: bool):
    """The model, on the device asked for (int8 runs on the CPU)."""
    from .. import load
    from ..errors import ConfigError

    if int8:
        if device not in (None, "cpu"):
            raise ConfigError(f"--int8 runs on the CPU; drop --device {device}")
        return load(name, quantize="int8")
    return load(name, device=inference_device(device))


def inference_device(device: str | None) -> str:
    """`--device` checked usable here, or by default the GPU when there is one."""
    import torch

    from ..errors import ConfigError

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:  # torch's message lists every device type it was built to name
        raise ConfigError(f"--device {device!r} is no device: cpu, cuda, cuda:N or mps") from None
    if kind == "cuda" and not torch.cuda.is_available():  # as pretrain and train-codebook say it
        raise ConfigError(f"device {device!r} was asked for but CUDA is not available; use --device cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise ConfigError(f"device {device!r} is not usable here ({str(e).splitlines()[0]}); use --device cpu") from None
    return device


def model_name(name: str) -> str:
    """How an index records the model: a hub id as is, a local path absolute."""
    from pathlib import Path

    from ..io.hubcache import looks_like_hub_id

    return name if looks_like_hub_id(name) else str(Path(name).resolve())


def resolve_model(name: str) -> dict:
    """The checkpoint `name` names now (a run directory: its newest), as `checkpoint_identity`."""
    from pathlib import Path

    from ..io.checkpoint import checkpoint_dir
    from ..io.fingerprint import checkpoint_identity
    from ..io.runs import resolve

    return checkpoint_identity(checkpoint_dir(name) if Path(name).is_file() else resolve(name))


def run(args: argparse.Namespace, console: Console) -> None:
    from ..io.fingerprint import describe_checkpoint
    from ..progress import progress_bar
    from ..data.images import said_left_out
    from ..retrieval.embed import embed_run, image_inputs, pair_inputs, text_inputs

    try:  # remote shards are read whole here: a stop ends a stalled read (nothing is written yet)
        with stopping.abandonable(), stopping.interruptible():
            inputs = image_inputs(args.images) if args.images else text_inputs(args.texts) if args.texts else \
                pair_inputs(args.pairs)
    except stopping.Abandoned as e:
        raise stopping.Stopped(e.signum, f"stopped by {stopping.name(e.signum)} while reading the inputs; nothing "
                                         "was written: run the same command again to start") from None
    # Resolved once: a run directory's newest checkpoint may move on while this runs.
    checkpoint = resolve_model(args.model)
    model = load_for_inference(checkpoint["path"], args.device, args.int8)  # a refusal comes before any line
    console.print(escape(f"embedding {len(inputs)} {inputs.modality} input(s){said_left_out(inputs.left_out)} with "
                         f"{args.model}"
                         + (f" ({describe_checkpoint(checkpoint)})" if checkpoint["path"] != model_name(args.model)
                            else "")))
    with progress_bar(console) as bar:
        tasks: list = []

        def progress(done: int, total: int) -> None:  # the bar appears once embedding starts, not before a refusal
            if not tasks:
                tasks.append(bar.add_task("embed", total=total, info=""))
            bar.update(tasks[0], completed=done)
        summary = embed_run(model, model_name(args.model), inputs, args.output, batch_size=args.batch_size,
                            part_size=args.part_size, float16=args.float16, int8=args.int8, checkpoint=checkpoint,
                            progress=progress)
    if summary.skipped_parts:
        console.print(f"{summary.skipped_parts} of {summary.parts} part(s) were already done and kept")
    if summary.changed_parts:
        console.print(f"{summary.changed_parts} part(s) done before were embedded again: their image files changed "
                      "since")
    console.print(escape(f"wrote {summary.count} embedding(s) to {summary.output}"))
    if summary.failed:
        console.print("left out: " + ", ".join(f"{n} {why}" for why, n in summary.failed.most_common())
                      + f" (named in {summary.output / 'embed.json'})")
