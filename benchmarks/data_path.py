"""Samples per second of the streamed data path at the `base` size, per loader worker count, for
raw shards (the codebook input is cropped and resized for the step to tokenize) and prepared
shards (the stored tokens and crop boxes are read instead).

Synthetic WebDataset shards of 256 px JPEG photos-like images with captions are written once;
the prepared copy carries `.crops.npy` / `.tokens.npy` members of the shapes `flava prepare`
writes (random ids: the data path reads them the same way whatever their values, and making
real ones at base size would take the codebook about half an hour here).

    python benchmarks/data_path.py [--workers 0,1,2] [--batch 32] [--draws 12]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import flava
from flava.data.pipeline import BatchStream
from flava.data.samples import SampleMaker, SampleSpec
from flava.data.registry import open_source


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def make(root: Path, shards: int, per: int, grid: int) -> None:
    if (root / "done").is_file():
        return
    rng = np.random.default_rng(0)
    for d in ("raw", "prepared"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        with tarfile.open(root / "raw" / f"{k:05d}.tar", "w") as raw, \
                tarfile.open(root / "prepared" / f"{k:05d}.tar", "w") as prep:
            for i in range(per):
                # Smooth gradients plus noise: JPEG sizes like photographs (~20-30 KB at 256x341).
                y, x = np.mgrid[0:256, 0:341]
                base = (np.sin(x / rng.uniform(5, 40))[..., None] * 60 + y[..., None] / 2 + rng.uniform(0, 255, 3))
                arr = np.clip(base + rng.normal(0, 12, (256, 341, 3)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, "JPEG", quality=90)
                key = f"{k:05d}{i:05d}"
                caption = f"a synthetic photograph number {i} of shard {k}".encode()
                for tar in (raw, prep):
                    _add(tar, f"{key}.jpg", buf.getvalue())
                    _add(tar, f"{key}.txt", caption)
                boxes = np.array([[0, 0, 1, 1]] + [[0.02, 0.03, 0.97, 0.99]] * 3, dtype=np.float32)
                _add(prep, f"{key}.crops.npy", _npy(boxes))
                _add(prep, f"{key}.tokens.npy", _npy(rng.integers(0, 8192, (4, grid * grid)).astype(np.uint16)))
    (root / "done").write_text("")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/flava_data_path")
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--draws", type=int, default=12)
    ap.add_argument("--json")
    args = ap.parse_args()
    cfg = flava.preset("base")
    root = Path(args.root)
    make(root, shards=4, per=128, grid=cfg.image.grid_size)
    spec = SampleSpec.for_model(cfg, flava.config.ObjectivesConfig(), 64, 0.9)
    result = {}
    print(f"base sizes ({cfg.image.image_size} px, codebook {cfg.codebook_image_size} px), batch {args.batch}, "
          f"256 px JPEG shards; samples/s of the pair stream")
    for kind in ("raw", "prepared"):
        for workers in (int(w) for w in args.workers.split(",")):
            src = open_source("pairs", str(root / kind))
            s = BatchStream("pairs", src, SampleMaker(spec, 0), args.batch, seed=0, num_workers=workers)
            s.next_batch()  # worker start-up and the first shards' indexing
            t = time.perf_counter()
            for _ in range(args.draws):
                s.next_batch()
            rate = args.draws * args.batch / (time.perf_counter() - t)
            result[f"{kind}/{workers}"] = rate
            print(f"  {kind:8s} {workers} worker{'s' if workers != 1 else ' '} "
                  f"{'(in the training process)' if workers == 0 else '':26s} {rate:7.1f} samples/s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
