"""Is the data path fast enough? Samples per second of decoding + transforms + tokenization +
masking on ONE core, against the samples per second the `tiny` training step consumes.

Both on the packaged demo data, in one process; the target is a ratio of at least 4 for every
data kind, so the model never waits for data.

    python benchmarks/data.py [--batch 32] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import flava
from flava.data import demo
from flava.data.pipeline import BatchStream
from flava.data.samples import SampleMaker, SampleSpec
from flava.objectives.pretraining import PretrainingModel
from flava.optim import build_optimizer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args()
    cfg = flava.preset("tiny")
    spec = SampleSpec(image_size=cfg.image.image_size, codebook_image_size=cfg.codebook_image_size,
                      grid=cfg.image.grid_size, max_text_length=64)
    sources = {"pairs": demo.easy_vqa_pairs(), "images": demo.demo_image_source(), "text": demo.bbc_news_text()}

    torch.set_num_threads(1)  # the data path gets one core
    produce = {}
    batches = {}
    for kind, src in sources.items():
        stream = BatchStream(kind, src, SampleMaker(spec, 0), args.batch, seed=0)
        stream.next_batch()  # warm caches
        t = time.perf_counter()
        for _ in range(args.steps):
            batches[kind] = stream.next_batch()
        produce[kind] = args.steps * args.batch / (time.perf_counter() - t)

    torch.set_num_threads(2)  # the training step gets the machine
    torch.manual_seed(0)
    model = PretrainingModel(cfg, codebook=flava.FlavaImageCodebook(cfg.codebook)).train()
    opt = build_optimizer(model, 1e-4, 0.1)
    consume = {}
    for kind, batch in batches.items():
        def step():
            model(batch, torch.Generator().manual_seed(0)).losses.total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        t = time.perf_counter()
        n = max(3, args.steps // 4)
        for _ in range(n):
            step()
        consume[kind] = n * args.batch / (time.perf_counter() - t)

    result = {}
    print(f"tiny preset, batch {args.batch}: data path on 1 core vs training step on 2 threads")
    for kind in sources:
        ratio = produce[kind] / consume[kind]
        result[kind] = {"data_samples_per_s": produce[kind], "step_samples_per_s": consume[kind], "ratio": ratio}
        print(f"  {kind:6s}  data {produce[kind]:7.0f} samples/s   step {consume[kind]:6.0f} samples/s   "
              f"ratio {ratio:5.1f}x {'ok' if ratio >= 4 else 'BELOW 4x'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
