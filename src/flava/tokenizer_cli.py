"""`flava train-tokenizer`: train the dVAE image tokenizer and save it where the model loads it."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

from .codebook import TokenizerTraining, map_pixels, train_codebook
from .config import FlavaConfig
from .data.demo import demo_images
from .data.images import find_images
from .data.sources import BadSample, open_image
from .data.transforms import resize_center_crop, to_tensor
from .progress import progress_bar
from .storage import check_replaceable, replace_dir, write_checkpoint_files, write_json_atomic

METRICS = "tokenizer_metrics.jsonl"


def load_training_images(specs: list[str], console: Console) -> list[Image.Image]:
    if specs == ["demo"]:
        return demo_images()
    from collections import Counter

    skipped: Counter = Counter()
    paths = find_images(specs)
    images = []
    for path in paths:
        try:
            images.append(open_image(path))
        except BadSample as e:
            skipped[e.kind] += 1
    if skipped:
        console.print("skipped " + ", ".join(f"{n} ({why})" for why, n in skipped.items()))
    if not images:
        from .errors import DataError

        raise DataError(f"none of the {len(paths)} image files could be read")
    return images


def reconstruction_grid(encoder, decoder, images: list[Image.Image], size: int, path: Path) -> None:
    """Originals (top row) over their reconstructions from the discrete tokens (bottom row)."""
    x = torch.stack([to_tensor(resize_center_crop(im, size)) for im in images])
    with torch.no_grad():
        recon = decoder.decode_tokens(encoder(map_pixels(x)).argmax(1)).clamp(0, 1)
    rows = [torch.cat(list(t), dim=2) for t in (x, recon)]
    grid = (torch.cat(rows, dim=1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


def run_train_tokenizer(images_spec: list[str], output: Path, cfg: FlavaConfig, settings: TokenizerTraining,
                        console: Console) -> dict:
    if cfg.image.vocab_size != cfg.codebook.vocab_size:
        console.print(f"note: image.vocab_size set to the codebook's {cfg.codebook.vocab_size} tokens")
        cfg.image.vocab_size = cfg.codebook.vocab_size
    size = cfg.codebook_image_size
    check_replaceable(output, (METRICS,))
    images = load_training_images(images_spec, console)
    console.print(f"training a {cfg.codebook.vocab_size}-token image tokenizer on {len(images)} images "
                  f"at {size} px ({cfg.image.grid_size}x{cfg.image.grid_size} tokens each), {settings.steps} steps")
    output.mkdir(parents=True, exist_ok=True)
    metrics_path = output / METRICS
    metrics_path.write_text("")
    start = time.perf_counter()
    with progress_bar(console) as progress, metrics_path.open("a") as metrics:
        task = progress.add_task("dVAE", total=settings.steps, info="")
        state = {"info": ""}

        def on_step(step: int, row: dict | None) -> None:
            if row is not None:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                state["info"] = f"mse {row['reconstruction_mse']:.4f}"
            rate = (step + 1) * settings.batch_size / (time.perf_counter() - start)
            progress.update(task, completed=step + 1, info=f"{state['info']}  {rate:.0f} img/s")

        encoder, decoder, summary = train_codebook(images, cfg.codebook, size, settings, on_step=on_step)

    rng = np.random.default_rng(0)
    sample = [images[i] for i in rng.choice(len(images), size=min(8, len(images)), replace=False)]

    def fill(tmp: Path) -> None:
        write_checkpoint_files(tmp, cfg, {"codebook": encoder}, extra={"tokenizer_training": {
            k: v for k, v in summary.items() if k != "history"}})
        save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, str(tmp / "decoder.safetensors"))
        write_json_atomic(tmp / "tokenizer_report.json", summary)
        shutil.copy(metrics_path, tmp / metrics_path.name)
        reconstruction_grid(encoder, decoder, sample, size, tmp / "reconstructions.png")

    replace_dir(output, fill, (METRICS,))

    s, e = summary["start"], summary["end"]
    table = Table(title="image tokenizer before and after training (a fixed sample of 512 training images, center crops)")
    for col in ("", "reconstruction MSE", "perplexity", "codes used"):
        table.add_column(col, justify="right")
    for name, r in (("start", s), ("end", e)):
        table.add_row(name, f"{r['reconstruction_mse']:.4f}", f"{r['perplexity']:.1f}",
                      f"{r['codes_used_count']}/{cfg.codebook.vocab_size} ({r['codes_used']:.0%})")
    console.print(table)
    console.print(f"saved to {output} (load with flava.load_codebook); reconstructions in "
                  f"{output / 'reconstructions.png'}")
    return summary

