"""DINO's multi-crop augmentation (the image-dino stage's loader work per image) against an earlier
commit's, in one process on the same photographs and seeds: images per core-second, and how far
the crops moved (mean absolute difference in pixel levels, the same seeds).

    python benchmarks/multicrop.py [--baseline REV] [--images 24] [--rounds 5] [--loader]

The photographs are benchmarks/loader.py's (scikit-image's colour photographs, shorter side 256).
Two 224-px global crops and eight 96-px local ones per image, one thread, as a loader worker runs.
Ours is timed three ways: coloured in the worker (a CPU run), the worker's share when the colour
steps run on the device (a GPU run: crops alone), and those steps batched (64 images) on this CPU.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from loader import PHOTOS, baseline_package, make_shards, photo_dir  # noqa: E402


def photographs(n: int) -> list[Image.Image]:
    out = []
    for i in range(n):
        with Image.open(photo_dir() / PHOTOS[i % len(PHOTOS)]) as im:
            im = im.convert("RGB")
        f = 256 / min(im.size)
        out.append(im.resize((round(im.width * f), round(im.height * f)), Image.BICUBIC))
    return out


def through_loader(root: Path, rounds: int) -> None:
    from flava.data.multicrop import MultiCropSpec
    from flava.data.pipeline import BatchStream
    from flava.data.registry import open_source
    from flava.data.samples import MultiCropMaker

    shards = make_shards(root, shards=8, per=256)
    figures: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(rounds):
        for on_device in figures:
            stream = BatchStream("images", open_source("images", shards), MultiCropMaker(
                MultiCropSpec(224, 96), 0, colour_on_device=on_device), 32, seed=0, num_workers=1)
            stream.next_batch()
            main_cpu, wall, draws = time.process_time(), time.perf_counter(), 4
            for _ in range(draws):
                stream.next_batch()
            figures[on_device].append((draws * 32 / (time.perf_counter() - wall),
                                       1e3 * (time.process_time() - main_cpu) / draws))
            stream._it = None  # ends its worker
    print("through the loader, 1 worker, batch 32:")
    for on_device, rows in figures.items():
        rate, main_ms = np.median(rows, axis=0)
        print(f"  {'crops alone (a GPU run)' if on_device else 'colour steps in the worker':28s} {rate:7.1f} images/s, "
              f"{main_ms:5.1f} ms of the training process a batch")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="HEAD~1", help="git revision of the augmentation to compare with")
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--loader", action="store_true", help="also time ours through the loader, 1 worker")
    ap.add_argument("--root", default="/tmp/flava_loader_bench/shards", help="where --loader's shards are (made once)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    images = photographs(args.images)
    modules = {"ours": importlib.import_module("flava.data.multicrop"),
               f"baseline {args.baseline}": importlib.import_module(
                   baseline_package(args.baseline, Path(tempfile.mkdtemp(prefix="flava-multicrop-")))
                   + ".data.multicrop")}
    specs = {name: m.MultiCropSpec(224, 96) for name, m in modules.items()}
    # Ours with the colour steps in the worker, ours with the crops alone (the steps on the device), the baseline.
    ways = {"ours": ("ours", {}), "ours, crops alone": ("ours", {"coloured": False}),
            f"baseline {args.baseline}": (f"baseline {args.baseline}", {})}
    rates: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(args.rounds):  # alternated, medians: a shared host's drift reaches both alike
        for way, (name, kw) in ways.items():
            m = modules[name]
            start = time.process_time()
            for i, image in enumerate(images):
                m.multi_crop(image, specs[name], np.random.default_rng([0, i]), **kw)
            rates[way].append(len(images) / (time.process_time() - start))
    ours_m = modules["ours"]
    rngs = [np.random.default_rng([0, i]) for i in range(64)]
    raw = ours_m.collate_multicrop([ours_m.multi_crop(images[i % len(images)], specs["ours"], rng, coloured=False)
                                    for i, rng in enumerate(rngs)])
    batched = []
    for _ in range(args.rounds):
        start = time.process_time()
        raw.to("cpu")
        batched.append(64 / (time.process_time() - start))
    (ours, a), (base, b) = ((name, modules[name]) for name in modules)
    diffs = []
    for i, image in enumerate(images):
        x, y = (m.multi_crop(image, specs[n], np.random.default_rng([0, i])) for n, m in ((ours, a), (base, b)))
        std = torch.tensor(specs[ours].std).view(1, 3, 1, 1) * 255  # normalised back to pixel levels
        diffs += [((x.global_crops - y.global_crops).abs() * std).mean().item(),
                  ((x.local_crops - y.local_crops).abs() * std).mean().item()]
    med = {name: float(np.median(r)) for name, r in rates.items()}
    print(f"multi-crop (2 x 224 + 8 x 96 px), {args.images} photographs, {args.rounds} rounds, one thread:")
    for name, r in med.items():
        print(f"  {name:24s} {r:7.1f} images per core-second ({1e3 / r:.1f} ms an image)")
    r = float(np.median(batched))
    print(f"  {'colour steps, batched':24s} {r:7.1f} images per core-second ({1e3 / r:.1f} ms an image; "
          "on a GPU run the device does these)")
    print(f"  ours/baseline {med[ours] / med[base]:.2f}x in the worker (a CPU run); a GPU run's worker "
          f"{med['ours, crops alone'] / med[base]:.2f}x; crops differ by {np.mean(diffs):.3f} pixel levels on "
          f"average (largest image mean {np.max(diffs):.3f})")
    if args.loader:
        through_loader(Path(args.root), args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
