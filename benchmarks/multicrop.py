"""DINO's multi-crop augmentation (the image-dino stage's loader work per image) against an earlier
commit's, in one process on the same JPEGs and seeds: images per core-second, and how far the
crops moved (mean absolute difference in pixel levels, the same seeds).

    python benchmarks/multicrop.py [--baseline REV] [--images 24] [--rounds 5] [--side 256] [--loader]

The images are benchmarks/loader.py's photographs (scikit-image's), resized to `--side` pixels on
their shorter side and stored as JPEGs (quality 90): each is read as a loader worker reads a
record, through each commit's `MultiCropMaker`, decoding included. Two 224-px global crops and
eight 96-px local ones per image, one thread, as a loader worker runs. Ours is timed three ways:
coloured in the worker (a CPU run), the worker's share when the colour steps run on the device (a
GPU run: decoding and crops alone; the baseline's too where it can leave them to the device), and
those steps batched (64 images) on this CPU.
`--loader` also times ours through the loader with one worker, both ways (benchmarks/loader.py's
shards read as images, batch 32): images/s and the training process's CPU ms a batch.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from loader import PHOTOS, baseline_package, make_shards, photo_dir  # noqa: E402


def jpegs(n: int, side: int) -> list[bytes]:
    """`n` photographs with `side` pixels on their shorter side, as JPEG files' bytes."""
    out = []
    for i in range(n):
        with Image.open(photo_dir() / PHOTOS[i % len(PHOTOS)]) as im:
            im = im.convert("RGB")
        f = side / min(im.size)
        buf = io.BytesIO()
        im.resize((round(im.width * f), round(im.height * f)), Image.BICUBIC).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
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
    ap.add_argument("--side", type=int, default=256, help="the JPEGs' shorter side in pixels")
    ap.add_argument("--loader", action="store_true", help="also time ours through the loader, 1 worker")
    ap.add_argument("--root", default="/tmp/flava_loader_bench/shards", help="where --loader's shards are (made once)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = jpegs(args.images, args.side)
    packages = {"ours": "flava", f"baseline {args.baseline}": baseline_package(
        args.baseline, Path(tempfile.mkdtemp(prefix="flava-multicrop-")))}
    makers, records = {}, {}
    for name, package in packages.items():
        spec = importlib.import_module(package + ".data.multicrop").MultiCropSpec(224, 96)
        makers[name] = importlib.import_module(package + ".data.samples").MultiCropMaker(spec, 0)
        blob = importlib.import_module(package + ".data.members").Blob  # each package reads its own records
        records[name] = [blob(b, ".jpg") for b in data]
    (ours, base), spec = packages, makers["ours"].spec
    # Each with the colour steps in the worker, and with the crops alone (the steps on the device)
    # where the commit can leave them to the device.
    for name in (ours, base):
        maker = makers[name]
        if "colour_on_device" in inspect.signature(type(maker)).parameters:
            makers[f"{name}, crops alone"] = type(maker)(maker.spec, 0, colour_on_device=True)
            records[f"{name}, crops alone"] = records[name]
    rates: dict[str, list[float]] = {way: [] for way in makers}
    for _ in range(args.rounds):  # alternated, medians: a shared host's drift reaches both alike
        for way, maker in makers.items():
            start = time.process_time()
            for i, image in enumerate(records[way]):
                maker("images", image, (i,))
            rates[way].append(len(data) / (time.process_time() - start))
    raw = makers[ours].collate("images", [makers["ours, crops alone"]("images", records[ours][i % len(data)], (i,))
                                          for i in range(64)])
    batched = []
    for _ in range(args.rounds):
        start = time.process_time()
        raw.to("cpu")
        batched.append(64 / (time.process_time() - start))
    diffs = []
    for i in range(len(data)):
        x, y = (makers[name]("images", records[name][i], (i,)) for name in (ours, base))
        std = torch.tensor(spec.std).view(1, 3, 1, 1) * 255  # normalised back to pixel levels
        diffs += [((x.global_crops - y.global_crops).abs() * std).mean().item(),
                  ((x.local_crops - y.local_crops).abs() * std).mean().item()]
    med = {name: float(np.median(r)) for name, r in rates.items()}
    print(f"multi-crop (2 x 224 + 8 x 96 px), {args.images} JPEGs of {args.side} px (shorter side), {args.rounds} "
          "rounds, one thread, decoding included:")
    for name, r in med.items():
        print(f"  {name:32s} {r:7.1f} images per core-second ({1e3 / r:.1f} ms an image)")
    r = float(np.median(batched))
    print(f"  {'colour steps, batched':32s} {r:7.1f} images per core-second ({1e3 / r:.1f} ms an image; "
          "on a GPU run the device does these)")
    # A GPU run's worker: the baseline's crops alone where it can leave the colour steps to the device.
    gpu_base = med.get(f"{base}, crops alone", med[base])
    print(f"  ours/baseline {med[ours] / med[base]:.2f}x in the worker (a CPU run); a GPU run's worker "
          f"{med['ours, crops alone'] / gpu_base:.2f}x; crops differ by {np.mean(diffs):.3f} pixel levels on "
          f"average (largest image mean {np.max(diffs):.3f})")
    if args.loader:
        through_loader(Path(args.root), args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
