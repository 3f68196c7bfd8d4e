"""Does DINO learn at the CPU demo's scale? Trains `DinoModel` (the tiny preset's image encoder)
on the packaged demo images with DINO's multi-crop views and prints the collapse metrics every
10 steps: teacher entropy (log K is uniform collapse), KL(teacher || student), the share of
output dimensions in use, and the spread across images of the teacher's CLS features and
logits (near 0: every image gives the same output).

    python benchmarks/dino_demo_scale.py [--steps 150] [--lr 5e-4] [--momentum 0.996] \
        [--set out_dim=4096 --set local_crops=4 ...]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from flava.config import preset
from flava.data.demo import demo_images
from flava.data.multicrop import collate_multicrop, multi_crop
from flava.objectives.dino import DinoConfig, DinoModel, momentum_schedule


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--weight-decay", type=float, default=0.04)
    ap.add_argument("--momentum", type=float, default=0.996, help="teacher momentum at step 0 (cosine to 1)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a DinoConfig field")
    args = ap.parse_args()
    fields = {"out_dim": 4096, "local_crops": 4}
    for item in args.set:
        key, value = item.split("=", 1)
        default = getattr(DinoConfig, key)
        fields[key] = value == "1" if isinstance(default, bool) else type(default)(value)
    config = DinoConfig(**fields)
    torch.manual_seed(0)
    image = preset("tiny").image
    images = demo_images()
    model = DinoModel(config, image)
    spec = config.crop_spec(image)
    params = [p for p in model.student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    momentum = momentum_schedule(args.momentum, 1.0, args.steps)
    rng = np.random.default_rng(0)
    per_epoch = max(1, len(images) // args.batch)
    print(f"{len(images)} images, K = {config.out_dim} (uniform entropy {math.log(config.out_dim):.2f}), "
          f"{config.local_crops} local crops, lr {args.lr}, momentum {args.momentum} -> 1 over {args.steps} steps")
    start = time.perf_counter()
    for step in range(args.steps):
        batch = collate_multicrop([multi_crop(images[i], spec, rng)
                                   for i in rng.choice(len(images), args.batch, replace=False)])
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        epoch = step / per_epoch
        out = model(batch.global_crops, batch.local_crops, epoch=epoch)
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        model.cancel_last_layer_grad(epoch)
        optimizer.step()
        model.step_teacher(float(momentum[step]))
        if step % 10 == 0 or step == args.steps - 1:
            with torch.no_grad():
                features = model.teacher.features(batch.global_crops, False)
                logits = model.teacher(batch.global_crops)
            m = out.metrics
            print(f"step {step:4d}  loss {out.loss.item():.3f}  teacher entropy {m['teacher_entropy']:.3f}  "
                  f"KL {m['kl_teacher_student']:.3f}  dims in use {100 * m['dims_in_use']:.2f} %  "
                  f"feature spread {features.std(0).mean():.4f}  logit spread {logits.std(0).mean():.4f}", flush=True)
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
