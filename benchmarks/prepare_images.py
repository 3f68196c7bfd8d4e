"""`flava prepare --images` on large JPEGs against an earlier commit's, the same folder, one worker.

The folder holds benchmarks/loader.py's photographs (scikit-image's) resized to `--side` pixels
on their shorter side and stored as JPEGs (quality 90), as cameras and web crawls give them.
Each commit's `flava prepare --images DIR --size 256 --workers 1` runs in a fresh process, in
turn for `--rounds` rounds: images a second (the folder's images over the command's wall time,
start-up included), and how far the prepared images moved (mean absolute difference in pixel
levels, after each command's JPEG encoding of its output).

    python benchmarks/prepare_images.py [--baseline REV] [--images 48] [--side 2048] [--rounds 2] [--codebook]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from loader import PHOTOS, REPO, baseline_package, photo_dir, random_codebook  # noqa: E402


def folder(root: Path, n: int, side: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        with Image.open(photo_dir() / PHOTOS[i % len(PHOTOS)]) as im:
            im = im.convert("RGB")
        f = side / min(im.size)
        im.resize((round(im.width * f), round(im.height * f)), Image.BICUBIC).save(root / f"{i:04d}.jpg", quality=90)
    return root


def prepared(out: Path) -> dict[str, np.ndarray]:
    images = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    images[m.name] = np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())), dtype=np.float32)
    return images


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="HEAD~1", help="git revision to compare with")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--side", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--codebook", action="store_true",
                    help="with a seeded random codebook (the tiny preset's, saved by each tree): its tokens of "
                         "each image's crops too (`flava prepare --codebook`)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="flava-prepare-bench-"))
    source = folder(work / "images", args.images, args.side)
    baseline_package(args.baseline, work)
    (work / "tree" / "src" / "flava").symlink_to(work / "flava_baseline")  # run as `flava` from its own tree
    trees = {"ours": str(REPO / "src"), f"baseline {args.baseline}": str(work / "tree" / "src")}
    codebooks = {name: random_codebook(package, work / f"codebook-{i}")
                 for i, (name, package) in enumerate(zip(trees, ("flava", "flava_baseline")))} if args.codebook else {}
    rates: dict[str, list[float]] = {name: [] for name in trees}
    for r in range(args.rounds):
        for name, tree in trees.items():
            out = work / f"out-{name.split()[0]}"
            shutil.rmtree(out, ignore_errors=True)
            env = {**os.environ, "PYTHONPATH": tree, "HF_HUB_OFFLINE": "1"}
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "flava.cli", "prepare", "--images", str(source), "--output", str(out),
                            "--size", "256", "--workers", "1"]
                           + (["--codebook", str(codebooks[name]), "--device", "cpu"] if codebooks else []),
                           env=env, check=True, capture_output=True)
            rates[name].append(args.images / (time.perf_counter() - t))
    ours, base = (prepared(work / f"out-{name.split()[0]}") for name in trees)
    gaps = [float(np.abs(ours[k] - base[k]).mean()) for k in ours if k in base and ours[k].shape == base[k].shape]
    print(f"flava prepare --images{' --codebook' if codebooks else ''}, {args.images} JPEGs of {args.side} px "
          f"(shorter side) -> 256 px, one worker, {args.rounds} rounds:")
    med = {name: statistics.median(r) for name, r in rates.items()}
    for name, r in med.items():
        print(f"  {name:24s} {r:6.1f} images/s (start-up included)")
    (a, b) = med.values()
    print(f"  ours/baseline {a / b:.2f}x; {len(gaps)} of {len(ours)} images the same size, {np.mean(gaps):.2f} "
          f"pixel levels apart on average (largest {np.max(gaps):.2f})")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
