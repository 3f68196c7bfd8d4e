"""Training the dVAE image codebook that gives MIM/MMM targets, and `flava train-codebook`.

DALL-E's encoder is trained with a decoder through the Gumbel-softmax relaxation, with
batch-level diversity and per-position sharpness terms that keep codes in use.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from typing import Annotated
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

from ..config import CodebookConfig, FlavaConfig, NonNegative, Positive, PositiveInt, Range, to_dict
from ..data.demo import demo_images
from ..data.images import find_images
from ..data.sources import BadSample, open_image
from ..data.transforms import map_pixels, random_resized_crop, resize_center_crop, to_tensor
from ..errors import DataError, InputError
from ..io.checkpoint import check_replaceable, write_checkpoint_dir, write_checkpoint_files
from ..io.files import write_json_atomic
from ..model.codebook import CodebookDecoder, FlavaImageCodebook
from ..optim import warmup_cosine
from ..progress import progress_bar

@dataclass
class CodebookTraining:
    """How `flava train-codebook` trains the dVAE."""

    steps: PositiveInt = 300
    """Optimizer steps (enough for the tiny demo codebook; real data wants thousands)."""
    batch_size: PositiveInt = 32
    """Images per step."""
    lr: Positive = 2e-3
    """Peak AdamW learning rate (cosine decay to a tenth after a 5 % warmup)."""
    temperature_start: Positive = 1.0
    """Gumbel-softmax temperature at the start..."""
    temperature_end: Positive = 1 / 16
    """...annealed exponentially to this (DALL-E's final value)."""
    kl_weight: NonNegative = 0.0
    """Weight of the ELBO's per-position KL(q || uniform), ramped in over the first half."""
    diversity_weight: NonNegative = 0.3
    """Weight of KL(mean q over the batch || uniform): penalises a batch that uses few codes
    (wav2vec 2.0's diversity loss), the usual cure for a collapsing codebook."""
    entropy_weight: NonNegative = 0.05
    """Weight of the mean per-position entropy H(q): with the diversity term this maximises the
    mutual information between images and codes (sharp per position, spread over the batch)."""
    straight_through: bool = False
    """Decode hard one-hot samples with straight-through gradients instead of soft ones."""
    crop_scale_min: Annotated[float, Range(0, 1, low_open=True)] = 0.35
    """Random crops cover this much of an image at least (augmentation)."""
    seed: int = 0
    log_every: PositiveInt = 50


def token_usage(token_ids: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """Perplexity exp(H) of the token histogram and the share of the vocabulary used."""
    counts = torch.bincount(token_ids.flatten(), minlength=vocab_size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"perplexity": float(entropy.exp()), "codes_used": float((counts > 0).double().mean()),
            "codes_used_count": int((counts > 0).sum())}


def train_codebook(
    images: list,
    cfg: CodebookConfig,
    image_size: int,
    settings: CodebookTraining,
    on_step=None,
    eval_images: list | None = None,
) -> tuple[FlavaImageCodebook, CodebookDecoder, dict]:
    """Train encoder + decoder with the Gumbel-softmax relaxation on PIL images; `on_step(step,
    row)` is called after every step, with the logged metrics every `log_every` steps (else None).

    Returns the encoder (the codebook), the decoder, and a summary: reconstruction MSE at the
    start and end (on `eval_images`, center crops), codebook perplexity and share of codes used.
    """
    if not images:
        raise InputError("no images to train the image codebook on")
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    encoder, decoder = FlavaImageCodebook(cfg), CodebookDecoder(cfg)
    decoder.to(memory_format=torch.channels_last)  # as the encoder: faster convolutions
    params = list(encoder.parameters()) + list(decoder.parameters())
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    schedule = warmup_cosine(max(1, settings.steps // 20), settings.steps, min_ratio=0.1)

    def lr_at(step: int) -> float:
        return settings.lr * schedule(step)

    if eval_images is None:  # a fixed sample, scored with center crops before and after
        pick = np.random.default_rng(settings.seed + 1).choice(len(images), min(512, len(images)), replace=False)
        eval_images = [images[i] for i in sorted(pick)]
    eval_x = torch.stack([to_tensor(resize_center_crop(im, image_size)) for im in eval_images])

    @torch.no_grad()
    def evaluate() -> dict:
        encoder.eval(), decoder.eval()
        mse, ids = 0.0, []
        for chunk in eval_x.split(128):
            tokens = encoder(map_pixels(chunk)).argmax(1)
            ids.append(tokens)
            mse += float(F.mse_loss(decoder.decode_tokens(tokens), chunk, reduction="sum"))
        encoder.train(), decoder.train()
        return {"reconstruction_mse": mse / eval_x.numel(), **token_usage(torch.cat(ids), cfg.vocab_size)}

    start = evaluate()
    history = []
    log_ratio = math.log(settings.temperature_end / settings.temperature_start)
    for step in range(settings.steps):
        pick = rng.integers(0, len(images), settings.batch_size)
        x = torch.stack([
            to_tensor(random_resized_crop(images[i], image_size, rng, (settings.crop_scale_min, 1.0))) for i in pick
        ])
        if rng.random() < 0.5:
            x = x.flip(-1)
        tau = settings.temperature_start * math.exp(log_ratio * step / max(1, settings.steps - 1))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = encoder(map_pixels(x))
        z = F.gumbel_softmax(logits, tau=tau, hard=settings.straight_through, dim=1)
        recon = F.mse_loss(decoder(z), x)
        log_q = logits.log_softmax(dim=1)
        q = log_q.exp()
        kl = (q * log_q).sum(1).mean() + math.log(cfg.vocab_size)
        q_mean = q.mean(dim=(0, 2, 3))
        diversity = (q_mean * q_mean.clamp_min(1e-12).log()).sum() + math.log(cfg.vocab_size)
        beta = settings.kl_weight * min(1.0, step / max(1, settings.steps // 2))
        entropy = math.log(cfg.vocab_size) - kl
        loss = recon + beta * kl + settings.diversity_weight * diversity + settings.entropy_weight * entropy
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        row = None
        if step % settings.log_every == 0 or step == settings.steps - 1:
            row = {"step": step, "loss": loss.item(), "reconstruction_mse": recon.item(), "kl": kl.item(),
                   "diversity": diversity.item(), "temperature": tau, "lr": lr_at(step)}
            history.append(row)
        if on_step is not None:
            on_step(step, row)
    end = evaluate()
    summary = {"start": start, "end": end, "history": history, "images": len(images),
               "image_size": image_size, "settings": dataclasses.asdict(settings)}
    return encoder.eval().requires_grad_(False), decoder.eval(), summary


# --------------------------------------------------------------------------- the command


METRICS = "codebook_metrics.jsonl"


def load_training_images(specs: list[str], console: Console) -> list[Image.Image]:
    if specs == ["demo"]:
        return demo_images()
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


def run_train_codebook(images_spec: list[str], output: Path, cfg: FlavaConfig, settings: CodebookTraining,
                        console: Console) -> dict:
    if cfg.image.vocab_size != cfg.codebook.vocab_size:
        console.print(f"note: image.vocab_size set to the codebook's {cfg.codebook.vocab_size} tokens")
        cfg.image.vocab_size = cfg.codebook.vocab_size
    size = cfg.codebook_image_size
    check_replaceable(output, (METRICS,))  # before the training, not after it
    images = load_training_images(images_spec, console)
    console.print(f"training a {cfg.codebook.vocab_size}-token image codebook on {len(images)} images "
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
        write_checkpoint_files(tmp, to_dict(cfg), {"codebook": encoder.state_dict()}, extra={"codebook_training": {
            k: v for k, v in summary.items() if k != "history"}})
        save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, str(tmp / "decoder.safetensors"))
        write_json_atomic(tmp / "codebook_report.json", summary)
        shutil.copy(metrics_path, tmp / metrics_path.name)
        reconstruction_grid(encoder, decoder, sample, size, tmp / "reconstructions.png")

    write_checkpoint_dir(output, fill, (METRICS,))

    s, e = summary["start"], summary["end"]
    table = Table(title="image codebook before and after training (a fixed sample of 512 training images, center crops)")
    for col in ("", "reconstruction MSE", "perplexity", "codes used"):
        table.add_column(col, justify="right")
    for name, r in (("start", s), ("end", e)):
        table.add_row(name, f"{r['reconstruction_mse']:.4f}", f"{r['perplexity']:.1f}",
                      f"{r['codes_used_count']}/{cfg.codebook.vocab_size} ({r['codes_used']:.0%})")
    console.print(table)
    console.print(f"saved to {output} (load with flava.load_codebook); reconstructions in "
                  f"{output / 'reconstructions.png'}")
    return summary

