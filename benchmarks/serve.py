"""Serving: embedding throughput, and search latency of the running `flava serve`.

(a) Images per second from JPEG files to L2-normalised embeddings, batch by batch: flava's
    `Embedder` (fp32 and int8) against transformers' FlavaImageProcessor + get_image_features,
    all holding the same random weights (a transformers FlavaModel of the preset, converted to
    ours). Each side uses its own preprocessing, timed also on its own; the contenders alternate
    and the median pass counts. Agreement is checked on identical pixels.
(b) Search latency (p50/p99, client side) and queries per second of `flava serve` on 127.0.0.1
    (a subprocess; the client here, with 1 and several concurrent keep-alive connections) over
    synthetic indexes of 10k and 1M vectors of the model's projection size, built by
    `index_from_arrays` as `flava index` builds them (10k: exact; 1M: IVF, vectors in the lists):
    `GET /search?q=` (text encoding + search) and `POST /search` with an embedding (search only),
    beside `VectorIndex.search` called directly in one process (no HTTP).

    python benchmarks/serve.py [--size base] [--images 64] [--batch 16] [--vectors 10000,1000000]
                               [--seconds 6] [--workers 1,4] [--workdir DIR] [--json FILE]

The 1M index takes minutes to train and fill on 2 cores; `--workdir DIR` keeps the built indexes
(and the model) there and reuses them on the next run.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import flava
from flava.loading import load_weights
from flava.interop import transformers as hf_interop
from flava.retrieval.embed import Embedder
from flava.retrieval.index import VectorIndex, index_from_arrays

sys.path.insert(0, str(Path(__file__).parent))
from inference import matmul_gflops  # noqa: E402

QUERIES = ["a dog running on the beach", "two people riding bicycles", "a red car parked on a street",
           "a plate of food with vegetables", "a cat sleeping on a sofa", "mountains under a cloudy sky",
           "a man playing guitar on stage", "children playing football in a park", "a bowl of fruit",
           "an airplane flying over the city", "a boat on a lake at sunset", "a kitchen with wooden cabinets"]


def photo_like(rng: np.random.Generator, h: int = 256, w: int = 320) -> Image.Image:
    """Smooth colour gradients, a few blobs and noise: JPEG-compressible like a photo."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.sin(x * rng.uniform(2, 8) + rng.uniform(0, 6)) * np.cos(y * rng.uniform(2, 8))
                    for _ in range(3)], -1)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1.25), rng.uniform(0.05, 0.2)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(-1, 1, 3)
    img = (img + 1) * 127 + rng.normal(0, 6, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def build_models(size: str, workdir: Path):
    """(transformers model, our checkpoint dir): the same random weights on both sides."""
    import transformers

    cfg = flava.preset(size)
    torch.manual_seed(0)
    ref = transformers.FlavaModel(transformers.FlavaConfig(**hf_interop.config_to_hf(cfg, with_codebook=False)))
    ref.eval()
    ours = flava.FlavaModel(cfg)
    load_weights(ours, hf_interop.state_dict_from_hf(ref.state_dict())[0], "model", Path("(transformers)"))
    model_dir = workdir / f"model-{size}"
    ours.save_pretrained(model_dir)
    return ref, model_dir


def bench_embedding(args, workdir: Path) -> dict:
    import transformers
    from transformers import FlavaImageProcessor

    transformers.logging.set_verbosity_error()
    ref, model_dir = build_models(args.size, workdir)
    fp32 = flava.load(model_dir)
    int8 = flava.load(model_dir, quantize="int8")
    rng = np.random.default_rng(0)
    folder = workdir / "images"
    folder.mkdir(exist_ok=True)
    paths = [folder / f"{i:04d}.jpg" for i in range(args.images)]
    for p in paths:
        if not p.is_file():
            photo_like(rng).save(p, quality=90)
    side = {"height": fp32.config.image.image_size, "width": fp32.config.image.image_size}
    processor = FlavaImageProcessor(size=side, crop_size=side)
    batches = [paths[i:i + args.batch] for i in range(0, len(paths), args.batch)]

    def transformers_embed(batch):
        pixels = processor([Image.open(p).convert("RGB") for p in batch], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            return F.normalize(ref.get_image_features(pixel_values=pixels).pooler_output[:, 0], dim=-1)

    contenders = {
        "transformers": lambda: [transformers_embed(b) for b in batches],
        "flava fp32": lambda: Embedder(fp32, args.batch).images(paths),
        "flava int8": lambda: Embedder(int8, args.batch).images(paths),
    }
    prep = {
        "transformers": lambda: [processor([Image.open(p).convert("RGB") for p in b], return_tensors="pt")
                                 for b in batches],
        "flava fp32": lambda: [fp32.processor.images(b) for b in batches],
    }
    prep["flava int8"] = prep["flava fp32"]

    # Agreement on identical pixels (ours), before any timing.
    pixels = fp32.processor.images(batches[0])
    with torch.inference_mode():
        want = F.normalize(ref.get_image_features(pixel_values=pixels).pooler_output[:, 0], dim=-1)
        got, got8 = fp32.encode_image(pixels), int8.encode_image(pixels)
    max_diff = float((got - want).abs().max())
    min_cos8 = float(F.cosine_similarity(got8, got, dim=-1).min())

    with torch.inference_mode():
        Embedder(fp32, args.batch).images(batches[0])  # warm-up: one batch each
        Embedder(int8, args.batch).images(batches[0])
        transformers_embed(batches[0])
        times = {k: [] for k in contenders}
        for _ in range(args.repeats):
            for name, fn in contenders.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        prep_s = {}
        for name, fn in prep.items():
            t = time.perf_counter()
            fn()
            prep_s[name] = time.perf_counter() - t
    out = {"images": len(paths), "batch": args.batch, "size": args.size, "max_abs_diff_fp32": max_diff,
           "min_cosine_int8": min_cos8, "contenders": {}}
    base = statistics.median(times["transformers"])
    print(f"\n(a) image embeddings from {len(paths)} JPEG files (256x320) to vectors, {args.size} preset "
          f"({fp32.config.image.image_size} px), batch {args.batch}, median of {args.repeats} passes")
    print(f"    {'':14s} {'images/s':>9s} {'vs transformers':>16s} {'preprocessing':>14s}")
    for name, ts in times.items():
        s = statistics.median(ts)
        out["contenders"][name] = {"seconds": s, "images_per_s": len(paths) / s, "speedup": base / s,
                                   "preprocessing_s": prep_s[name]}
        print(f"    {name:14s} {len(paths) / s:9.2f} {base / s:15.2f}x {prep_s[name] / s:13.0%}")
    print(f"    same pixels: max|flava fp32 - transformers| {max_diff:.1e}; min cosine int8 to fp32 {min_cos8:.4f}")
    return out


# --------------------------------------------------------------------------- search


def synthetic_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around n/50 random centres: clustered, as embeddings of a collection are."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 50), dim), dtype=np.float32)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        block = centres[rng.integers(0, len(centres), stop - start)]
        block += 0.6 * rng.standard_normal(block.shape, dtype=np.float32)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def get_index(n: int, dim: int, model_dir: Path, workdir: Path) -> tuple[Path, float | None, np.ndarray]:
    """(index directory, seconds to build it or None when reused, 256 indexed vectors to query with)."""
    path, sample = workdir / f"index-{n}-{dim}", workdir / f"queries-{n}-{dim}.npy"
    if (path / "index.json").is_file() and sample.is_file():
        return path, None, np.load(sample)
    shutil.rmtree(path, ignore_errors=True)
    vectors = synthetic_vectors(n, dim)
    np.save(sample, vectors[np.random.default_rng(1).integers(0, n, 256)])
    t = time.perf_counter()
    index_from_arrays(vectors, [f"/synthetic/{i:07d}.jpg" for i in range(n)], path, model=str(model_dir),
                      modality="image")
    return path, time.perf_counter() - t, np.load(sample)


def start_server(model_dir: Path, index: Path, threads: int | None) -> tuple[subprocess.Popen, str, int]:
    cmd = [sys.executable, "-m", "flava.cli", "serve", "--model", str(model_dir), "--index", str(index),
           "--port", "0"] + (["--threads", str(threads)] if threads else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "listening on http://" in line:
            host, port = line.split("http://")[1].split("/")[0].rsplit(":", 1)
            # Drain the rest of its output so a full pipe never blocks it.
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, host, int(port)
    raise SystemExit("flava serve did not start:\n" + "".join(lines))


def load_run(host: str, port: int, requests: list[tuple[str, str, bytes | None]], workers: int,
             seconds: float) -> dict:
    """Each worker sends the requests round-robin over its own keep-alive connection for `seconds`."""
    stop = time.perf_counter() + seconds

    def worker(offset: int) -> list[float]:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        lat, i = [], offset
        while time.perf_counter() < stop:
            method, path, body = requests[i % len(requests)]
            headers = {"Content-Type": "application/json"} if body else {}
            t = time.perf_counter()
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            lat.append(time.perf_counter() - t)
            if resp.status != 200:
                raise SystemExit(f"{method} {path}: {resp.status} {data[:200]!r}")
            i += 1
        conn.close()
        return lat

    t = time.perf_counter()
    with cf.ThreadPoolExecutor(workers) as pool:
        lats = [x for part in pool.map(worker, range(workers)) for x in part]
    wall = time.perf_counter() - t
    ms = np.asarray(lats) * 1e3
    return {"requests": len(lats), "qps": len(lats) / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def bench_search(args, workdir: Path) -> dict:
    model_dir = workdir / f"model-{args.size}"
    dim = flava.preset(args.size).projection_dim
    out = {"dim": dim, "indexes": {}}
    threads = f"--threads {args.server_threads}" if args.server_threads else "default threads"
    print(f"\n(b) flava serve ({threads}) on 127.0.0.1, {dim}-dimensional vectors, client and server on this "
          f"machine; {args.seconds:g} s per row")
    print(f"    {'vectors':>9s} {'index':>16s} {'request':28s} {'conns':>5s} {'p50 ms':>8s} {'p99 ms':>8s} "
          f"{'queries/s':>10s}")
    for n in args.vectors:
        path, build_s, queries = get_index(n, dim, model_dir, workdir)
        index = VectorIndex.open(path)
        # Near, not on, indexed vectors: queries like a user's, for which the IVF probes matter.
        queries = queries + 0.05 * np.random.default_rng(1).standard_normal(queries.shape).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        torch.set_num_threads(args.server_threads or os.cpu_count())  # FAISS shares torch's OpenMP threads
        lat = []
        for q in queries[:200]:
            t = time.perf_counter()
            index.search(q[None], 10)
            lat.append(time.perf_counter() - t)
        direct = {"p50_ms": float(np.percentile(lat, 50) * 1e3), "p99_ms": float(np.percentile(lat, 99) * 1e3),
                  "qps": len(lat) / sum(lat)}
        factory = index.factory
        torch.set_num_threads(args.threads)
        del index
        entry = {"factory": factory, "build_s": build_s, "direct": direct, "runs": []}
        label = f"{n:>9,d} {factory:>16s}"
        print(f"    {label} {'VectorIndex.search (no HTTP)':28s} {1:5d} {direct['p50_ms']:8.2f} "
              f"{direct['p99_ms']:8.2f} {direct['qps']:10.1f}", flush=True)
        proc, host, port = start_server(model_dir, path, args.server_threads)
        try:
            text = [("GET", f"/search?q={quote(q)}&k=10", None) for q in QUERIES]
            emb = [("POST", "/search", json.dumps({"embedding": q.tolist(), "k": 10}).encode()) for q in queries]
            load_run(host, port, text[:3] + emb[:3], 1, 1.0)  # warm-up
            for what, reqs in (("GET /search?q= (text)", text), ("POST /search (embedding)", emb)):
                for workers in args.workers:
                    r = load_run(host, port, reqs, workers, args.seconds)
                    entry["runs"].append({"request": what, "connections": workers, **r})
                    print(f"    {label} {what:28s} {workers:5d} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
                          f"{r['qps']:10.1f}", flush=True)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if build_s is not None:
            print(f"    {'':9s} (index built in {build_s:.0f} s)")
        out["indexes"][n] = entry
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="base", help="model preset: tiny, small or base")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes over the images per contender")
    ap.add_argument("--vectors", default="10000,1000000", help="index sizes for (b); empty skips (b)")
    ap.add_argument("--seconds", type=float, default=6.0, help="duration of each load run")
    ap.add_argument("--workers", default="1,4", help="concurrent connections per load run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--server-threads", dest="server_threads", type=int,
                    help="flava serve --threads (default: its own default, one per core)")
    ap.add_argument("--skip-embedding", dest="skip_embedding", action="store_true", help="run (b) only")
    ap.add_argument("--workdir", help="keep the model, images and indexes here and reuse them (default: a "
                    "temporary directory, removed at the end)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    args.vectors = [int(v) for v in args.vectors.split(",") if v.strip()]
    args.workers = [int(w) for w in args.workers.split(",")]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import faiss
    import transformers

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="flava-bench-serve-"))
    workdir.mkdir(parents=True, exist_ok=True)
    peak = matmul_gflops()
    print(f"machine: {os.cpu_count()} cores, fp32 matmul {peak:.0f} GFLOP/s on {args.threads} threads; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, faiss {faiss.__version__}",
          flush=True)
    results = {"matmul_gflops": peak, "threads": args.threads}
    try:
        if args.skip_embedding:
            build_models(args.size, workdir)
        else:
            results["embedding"] = bench_embedding(args, workdir)
        if args.vectors:
            results["search"] = bench_search(args, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
