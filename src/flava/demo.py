"""`make demo`: build a model, save and reload it, embed packaged photographs and captions."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .config import preset
from .data.demo import skimage_photos
from .data.tokenizer import TextTokenizer
from .data.transforms import eval_transform
from .model import FlavaModel
from .progress import progress_bar
from .storage import load


def run_demo(output: Path, console: Console) -> dict:
    torch.manual_seed(0)
    cfg = preset("tiny")
    console.rule("[bold]flava demo")
    console.print(f"1/4 building the [bold]tiny[/] preset (image {cfg.image.image_size} px, "
                  f"{cfg.image.num_layers}/{cfg.text.num_layers}/{cfg.multimodal.num_layers} layers) "
                  f"and saving it to {output / 'model'}")
    FlavaModel(cfg).save_pretrained(output / "model")

    console.print("2/4 loading it back with flava.load, in fp32 and in int8")
    model = load(output / "model")
    model_int8 = load(output / "model", quantize="int8")

    photos = skimage_photos()
    names = list(photos)
    captions = [photos[n][1] for n in names]
    console.print(f"3/4 embedding {len(names)} scikit-image photographs and their {len(captions)} captions")
    tokenizer = TextTokenizer(max_length=cfg.text.max_position_embeddings)
    text = tokenizer(captions)
    images = []
    with progress_bar(console) as progress:
        task = progress.add_task("preprocess", total=len(names), info="")
        t0 = time.perf_counter()
        for i, n in enumerate(names, 1):
            images.append(eval_transform(photos[n][0], cfg.image.image_size))
            progress.update(task, advance=1, info=f"{i / (time.perf_counter() - t0):.0f} img/s")
    pixels = torch.stack(images)
    with torch.inference_mode():
        t0 = time.perf_counter()
        img, txt = model.encode_image(pixels), model.encode_text(text.input_ids, text.attention_mask)
        t_fp32 = time.perf_counter() - t0
        img8 = model_int8.encode_image(pixels)
        txt8 = model_int8.encode_text(text.input_ids, text.attention_mask)
    sim = img @ txt.T

    console.print("4/4 results")
    for j, c in enumerate(captions):
        console.print(f"  c{j}: {c}")
    table = Table(title="cosine similarity, image x caption (best caption per image in bold)")
    table.add_column("image")
    for j in range(len(names)):
        table.add_column(f"c{j}", justify="right")
    for i, n in enumerate(names):
        best = int(sim[i].argmax())
        table.add_row(n, *[f"[bold]{v:+.3f}[/]" if j == best else f"{v:+.3f}" for j, v in enumerate(sim[i].tolist())])
    console.print(table)
    top1 = float((sim.argmax(dim=1) == torch.arange(len(names))).float().mean())
    cos_img = float((img * img8).sum(-1).min())
    cos_txt = float((txt * txt8).sum(-1).min())
    summary = Table(title="summary")
    summary.add_column("what")
    summary.add_column("value", justify="right")
    summary.add_row("parameters", f"{model.num_parameters() / 1e6:.2f} M")
    summary.add_row("image->caption top-1 (chance 1/%d)" % len(names), f"{top1:.3f}")
    summary.add_row("fp32 embedding time, all inputs", f"{t_fp32 * 1000:.0f} ms")
    summary.add_row("int8 vs fp32 cosine, worst image", f"{cos_img:.4f}")
    summary.add_row("int8 vs fp32 cosine, worst caption", f"{cos_txt:.4f}")
    console.print(summary)
    console.print("The weights are newly initialised, so the similarities above are near chance: "
                  "this run shows the model, its checkpoint format and the embedding API end to end.")
    return {"top1": top1, "cos_img": cos_img, "cos_txt": cos_txt}
