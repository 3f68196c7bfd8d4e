"""DINO's multi-crop augmentation (the image-dino stage's loader work per image) against an earlier
commit's, in one process on the same photographs and seeds: images per core-second, and how far
the crops moved (mean absolute difference in pixel levels, the same seeds).

    python benchmarks/multicrop.py [--baseline REV] [--images 24] [--rounds 5]

The photographs are benchmarks/loader.py's (scikit-image's colour photographs, shorter side 256).
Two 224-px global crops and eight 96-px local ones per image, one thread, as a loader worker runs.
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
from loader import PHOTOS, baseline_package, photo_dir  # noqa: E402


def photographs(n: int) -> list[Image.Image]:
    out = []
    for i in range(n):
        with Image.open(photo_dir() / PHOTOS[i % len(PHOTOS)]) as im:
            im = im.convert("RGB")
        f = 256 / min(im.size)
        out.append(im.resize((round(im.width * f), round(im.height * f)), Image.BICUBIC))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="HEAD~1", help="git revision of the augmentation to compare with")
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    images = photographs(args.images)
    modules = {"ours": importlib.import_module("flava.data.multicrop"),
               f"baseline {args.baseline}": importlib.import_module(
                   baseline_package(args.baseline, Path(tempfile.mkdtemp(prefix="flava-multicrop-")))
                   + ".data.multicrop")}
    specs = {name: m.MultiCropSpec(224, 96) for name, m in modules.items()}
    rates: dict[str, list[float]] = {name: [] for name in modules}
    for _ in range(args.rounds):  # alternated, medians: a shared host's drift reaches both alike
        for name, m in modules.items():
            start = time.process_time()
            for i, image in enumerate(images):
                m.multi_crop(image, specs[name], np.random.default_rng([0, i]))
            rates[name].append(len(images) / (time.process_time() - start))
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
    print(f"  ours/baseline {med[ours] / med[base]:.2f}x; crops differ by {np.mean(diffs):.3f} pixel levels on "
          f"average (largest image mean {np.max(diffs):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
