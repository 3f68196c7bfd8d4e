"""Is the loader fast enough to feed the step? The streamed data path against the loader of an
earlier commit, in one process on the same shards, and the training step fed by the loader
against the same step on cached batches (SPDL's head-room method).

The shards are what img2dataset writes: WebDataset tars of 256-px JPEG photographs (random crops
and scales of scikit-image's colour photographs, shorter side 256) with captions. Each sample
becomes a 224-px random crop, the codebook's view of it (56 px: the `tiny` preset at patch 32),
block masks, and tokenised, masked captions.

Figures (per loader worker count):
- samples/s: batches drawn one after another, as a training loop that waits for nothing else;
- samples/s per core: samples over the CPU seconds every process of the loader used (the
  training process and its workers), so 2 workers on 2 cores are not counted as one core;
- main ms/batch: CPU milliseconds the training process spends per batch (receiving, merging).

    python benchmarks/loader.py [--baseline 699a62c] [--workers 0,1,2] [--batch 64] [--rounds 3]
    python benchmarks/loader.py --pretrain   # also `flava pretrain` itself, baseline and ours

The baseline is the `src/flava` tree of `--baseline` (a git revision of this repository),
imported under another name; `--baseline none` measures ours alone.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "ihc.png", "hubble_deep_field.jpg",
          "retina.jpg", "motorcycle_left.png")
"""scikit-image's colour photographs (skimage.data's astronaut, ..., stereo_motorcycle), read as files."""
WORDS = ("a photograph of the red cat sitting on a wooden table near the window in the morning light with "
         "two people walking past an old building under a cloudy sky").split()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def photo_dir() -> Path:
    """Where PHOTOS are: scikit-image's data folder, else .whl/photos (the GPU host has no
    scikit-image; benchmarks/gpu_kit.sh copies them there)."""
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    for folder in ([Path(spec.origin).parent / "data"] if spec and spec.origin else []) + [REPO / ".whl" / "photos"]:
        if all((folder / name).is_file() for name in PHOTOS):
            return folder
    raise SystemExit("the shards' photographs are missing: install scikit-image (make install) or run "
                     "bash benchmarks/gpu_kit.sh")


def make_shards(root: Path, shards: int, per: int) -> str:
    """WebDataset shards of 256-px photo JPEGs (~20-40 KB, as img2dataset writes them) + captions."""
    if (root / "done").is_file():
        return str(root) + "/{00000..%05d}.tar" % (shards - 1)
    root.mkdir(parents=True, exist_ok=True)
    photos = []
    for name in PHOTOS:
        with Image.open(photo_dir() / name) as im:
            photos.append(im.convert("RGB"))
    rng = np.random.default_rng(0)
    for k in range(shards):
        with tarfile.open(root / f"{k:05d}.tar", "w") as tar:
            for i in range(per):
                photo = photos[int(rng.integers(len(photos)))]
                # A random window of a random scale, stored with its shorter side at 256 px.
                side = int(rng.integers(min(photo.size) // 2, min(photo.size) + 1))
                aspect = float(rng.uniform(1.0, 1.5))
                w, h = (int(side * aspect), side) if rng.random() < 0.5 else (side, int(side * aspect))
                w, h = min(w, photo.width), min(h, photo.height)
                x0, y0 = int(rng.integers(photo.width - w + 1)), int(rng.integers(photo.height - h + 1))
                crop = photo.crop((x0, y0, x0 + w, y0 + h))
                f = 256 / min(w, h)
                crop = crop.resize((round(w * f), round(h * f)), Image.BICUBIC)
                buf = io.BytesIO()
                crop.save(buf, "JPEG", quality=90)
                key = f"{k:05d}{i:05d}"
                _add(tar, f"{key}.jpg", buf.getvalue())
                caption = " ".join(rng.choice(WORDS, int(rng.integers(6, 24))))
                _add(tar, f"{key}.txt", caption.encode())
    (root / "done").write_text("")
    return str(root) + "/{00000..%05d}.tar" % (shards - 1)


def baseline_package(rev: str, where: Path) -> str:
    """`src/flava` at git revision `rev`, importable as `flava_baseline`."""
    target = where / "flava_baseline"
    if not target.is_dir():
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src/flava"], check=True,
                                 capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(where / "tree", filter="data")
        (where / "tree" / "src" / "flava").rename(target)
    sys.path.insert(0, str(where))
    return "flava_baseline"


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of live processes (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def tiny_224(flava):
    cfg = flava.preset("tiny")
    cfg.image.image_size, cfg.image.patch_size = 224, 32
    return cfg


def measure_loader(package: str, shards: str, workers: int, batch: int, draws: int, patch: int = 32) -> dict:
    """`patch` sizes the codebook's view: 224 // patch * 8 px (32: 56 px; 16, the `base` preset's: 112)."""
    flava = importlib.import_module(package)
    pipeline = importlib.import_module(f"{package}.data.pipeline")
    try:
        samples = importlib.import_module(f"{package}.data.samples")
    except ModuleNotFoundError:  # earlier commits kept the sample makers in the pipeline module
        samples = pipeline
    registry = importlib.import_module(f"{package}.data.registry")
    cfg = tiny_224(flava)
    cfg.image.patch_size = patch
    spec = samples.SampleSpec.for_model(cfg, flava.config.ObjectivesConfig(), 64, 0.9)
    stream = pipeline.BatchStream("pairs", registry.open_source("pairs", shards), samples.SampleMaker(spec, 0),
                                  batch, seed=0, num_workers=workers)
    for _ in range(2):  # worker start-up and the first shards' indexing
        stream.next_batch()
    pids = [os.getpid(), *(p.pid for p in multiprocessing.active_children())]
    cpu0, main0, t0 = _cpu_seconds(pids), time.process_time(), time.perf_counter()
    for _ in range(draws):
        stream.next_batch()
    wall, main = time.perf_counter() - t0, time.process_time() - main0
    cpu = _cpu_seconds(pids) - cpu0
    stream._it = None  # ends the workers
    return {"samples_per_s": draws * batch / wall, "samples_per_core_s": draws * batch / max(cpu, 1e-9),
            "main_ms_per_batch": 1e3 * main / draws}


def measure_headroom(package: str, shards: str, batch: int, steps: int) -> dict:
    """`package`'s `tiny` step at 224 px (patch 32, pairs: contrastive, ITM, MMM with a codebook)
    on cached batches, and the same step fed by its loader with 1 worker."""
    flava = importlib.import_module(package)
    pipeline = importlib.import_module(f"{package}.data.pipeline")
    try:
        samples = importlib.import_module(f"{package}.data.samples")
    except ModuleNotFoundError:
        samples = pipeline
    registry = importlib.import_module(f"{package}.data.registry")
    pretraining = importlib.import_module(f"{package}.objectives.pretraining")
    build_optimizer = importlib.import_module(f"{package}.optim").build_optimizer

    cfg = tiny_224(flava)
    torch.manual_seed(0)
    pm = pretraining.PretrainingModel(cfg, flava.config.ObjectivesConfig(mim_weight=0, mlm_weight=0),
                                      codebook=flava.FlavaImageCodebook(cfg.codebook).eval())
    opt = build_optimizer(pm, 1e-4, 0.01, (0.9, 0.98), 1e-6)
    spec = samples.SampleSpec.for_model(cfg, flava.config.ObjectivesConfig(), 64, 0.9)
    stream = pipeline.BatchStream("pairs", registry.open_source("pairs", shards), samples.SampleMaker(spec, 0), batch,
                                  seed=0, num_workers=1)

    def step(host_batch, i):
        out = pm(host_batch.to("cpu"), torch.Generator().manual_seed(i))
        out.losses.total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    cached = [stream.next_batch() for _ in range(4)]
    for i in range(2):
        step(cached[i], i)
    t = time.perf_counter()
    for i in range(steps):
        step(cached[i % len(cached)], i)
    cached_rate = steps * batch / (time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(steps):
        step(stream.next_batch(), i)
    fed_rate = steps * batch / (time.perf_counter() - t)
    stream._it = None
    return {"cached_samples_per_s": cached_rate, "fed_samples_per_s": fed_rate, "fed_over_cached": fed_rate / cached_rate}


def random_codebook(package: str, directory: Path) -> Path:
    """A seeded random codebook for the `tiny` preset at 224 px, saved by `package`."""
    flava = importlib.import_module(package)
    to_dict = importlib.import_module(f"{package}.config").to_dict
    save_checkpoint = importlib.import_module(f"{package}.io.checkpoint").save_checkpoint
    cfg = tiny_224(flava)
    torch.manual_seed(0)
    save_checkpoint(directory, to_dict(cfg), {"codebook": flava.FlavaImageCodebook(cfg.codebook).state_dict()})
    return directory


def pretrain_rate(pythonpath: str, shards: str, codebook: Path, out: Path, batch: int, steps: int) -> float:
    """samples/s of `flava pretrain` (median of its logged steps after the first two)."""
    args = [sys.executable, "-m", "flava.cli", "pretrain", "--output", str(out), "--config", "tiny",
            "--max-steps", str(steps), "--set", "model.image.image_size=224", "--set", "model.image.patch_size=32",
            "--set", f"codebook={codebook}", "--set", f'data.pairs=["{shards}"]', "--set", f"data.batch_size={batch}",
            "--set", "data.num_workers=1", "--set", "log_every=1", "--set", f"save_every={steps}",
            "--set", "tensorboard=false"]
    env = {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"flava pretrain failed ({pythonpath}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return float(np.median([r["samples_per_s"] for r in rows[2:]]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/flava_loader_bench")
    ap.add_argument("--baseline", default="699a62c", help="git revision of the loader to compare with, or none")
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--draws", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=1, help="measurements per loader and worker count, alternated")
    ap.add_argument("--steps", type=int, default=12, help="the head-room's steps (0: loader figures only)")
    ap.add_argument("--pretrain", action="store_true", help="also time `flava pretrain`, baseline and ours")
    ap.add_argument("--main-threads", dest="main_threads", type=int, default=1,
                    help="torch threads of the training process (1: one core for it, the other for a worker; "
                         "2: what `flava pretrain` without workers has on 2 cores)")
    ap.add_argument("--loader-patch", dest="loader_patch", type=int, default=32,
                    help="the loader figures' patch size, which sizes the codebook's view (32: 56 px; 16: the base "
                         "preset's 112 px); the step's stays 32")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    torch.set_num_threads(args.main_threads)
    root = Path(args.root)
    shards = make_shards(root / "shards", shards=8, per=256)
    work = Path(tempfile.mkdtemp(prefix="flava-loader-"))
    impls = {"ours": "flava"}
    if args.baseline != "none":
        impls[f"baseline {args.baseline}"] = baseline_package(args.baseline, work)
    result: dict = {"loader": {}}
    print(f"loader: 256-px photo JPEG shards -> 224-px crops + {224 // args.loader_patch * 8}-px codebook views, "
          "masks, captions; "
          f"batch {args.batch}, {os.cpu_count()} cores, {args.main_threads} torch thread(s) in the training process")
    print(f"  {'loader':22s} {'workers':>7s} {'samples/s':>10s} {'per core':>9s} {'main ms/batch':>14s}")
    for workers in (int(w) for w in args.workers.split(",")):
        # Rounds alternate the loaders, so that a shared host's drift reaches both alike; medians.
        rounds: dict[str, list[dict]] = {name: [] for name in impls}
        for _ in range(args.rounds):
            for name, package in impls.items():
                rounds[name].append(measure_loader(package, shards, workers, args.batch, args.draws,
                                                   args.loader_patch))
        for name in impls:
            r = {k: float(np.median([x[k] for x in rounds[name]])) for k in rounds[name][0]}
            result["loader"][f"{name}/{workers}"] = r
            print(f"  {name:22s} {workers:7d} {r['samples_per_s']:10.1f} {r['samples_per_core_s']:9.1f} "
                  f"{r['main_ms_per_batch']:14.1f}", flush=True)
        if len(impls) > 1:
            ours, base = result["loader"][f"ours/{workers}"], result["loader"][f"baseline {args.baseline}/{workers}"]
            print(f"  {'ratio ours/baseline':22s} {workers:7d} {ours['samples_per_s'] / base['samples_per_s']:9.2f}x "
                  f"{ours['samples_per_core_s'] / base['samples_per_core_s']:8.2f}x "
                  f"{ours['main_ms_per_batch'] / max(base['main_ms_per_batch'], 1e-9):13.2f}x", flush=True)
    result["headroom"] = {}
    if args.steps > 0:
        print(f"step (tiny, 224 px, patch 32, pairs, batch {args.batch}) on cached batches and fed by the loader "
              "(1 worker):")
    for name, package in impls.items() if args.steps > 0 else ():
        h = result["headroom"][name] = measure_headroom(package, shards, args.batch, args.steps)
        print(f"  {name:22s} cached {h['cached_samples_per_s']:6.1f} samples/s, fed {h['fed_samples_per_s']:6.1f}: "
              f"{h['fed_over_cached']:.2f} of cached", flush=True)
    if args.pretrain:
        trees = {"ours": str(REPO / "src")}
        if args.baseline != "none":
            trees[f"baseline {args.baseline}"] = str(work / "tree" / "src")
            (work / "tree" / "src" / "flava").symlink_to(work / "flava_baseline")
        rates = {}
        for i, (name, path) in enumerate(trees.items()):
            # Each tree reads its own config keys: the codebook is saved by the package that loads it.
            codebook = random_codebook(impls[name], work / f"codebook-{i}")
            rates[name] = pretrain_rate(path, shards, codebook, work / f"run-{i}", args.batch, args.steps + 4)
        result["pretrain"] = rates
        print("flava pretrain (tiny, 224 px, patch 32, pairs, batch %d, 1 worker): " % args.batch
              + ", ".join(f"{k} {v:.1f} samples/s" for k, v in rates.items())
              + (f"; ours/baseline {rates['ours'] / rates[f'baseline {args.baseline}']:.2f}x" if len(rates) > 1 else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)  # the baseline's tree, codebooks and runs; the shards stay for the next run
    return 0


if __name__ == "__main__":
    sys.exit(main())
