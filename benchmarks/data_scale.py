"""How `flava pretrain` start-up scales with the size of a WebDataset shard set.

Generates synthetic img2dataset-style shard sets (plain .tar, per sample KEY.jpg, a 32x32 JPEG,
and KEY.txt, a caption; 1,000 samples per shard) of 3, 30, 300 (and with --with-1m, 1,000) shards,
then runs a one-step, pairs-only `flava pretrain` on each in a fresh process, as a user would,
and measures the whole run's wall time and peak resident memory. A run that only needs one
batch should cost the same whatever the data's size; the per-sample slopes and their
extrapolation to 70M (LAION-sized subsets) and 2B samples show what it costs instead.

    .venv/bin/python benchmarks/data_scale.py                    # sizes 3,30,300, twice each
    .venv/bin/python benchmarks/data_scale.py --with-1m --repeat 3
    .venv/bin/python benchmarks/data_scale.py --pythonpath /tmp/other_checkout/src   # another flava

Shard sets are kept under --root and reused on reruns.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
TARGETS = {"70M": 70e6, "2B": 2e9}


def make_jpegs(n: int = 300) -> list[bytes]:
    from PIL import Image

    rng = random.Random(0)
    out = []
    for _ in range(n):
        base = [rng.randrange(192) for _ in range(3)]
        # A little noise so each JPEG is about 1 KB, like a small real thumbnail rather than a flat colour.
        img = Image.frombytes("RGB", (32, 32), bytes(base[i % 3] + rng.randrange(64) for i in range(32 * 32 * 3)))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=75)
        out.append(buf.getvalue())
    return out


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def make_shards(root: Path, shards: int, per_shard: int, jpegs: list[bytes]) -> Path:
    d = root / f"shards_{shards}"
    if (d / "done").exists():
        return d
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    t0 = time.perf_counter()
    for s in range(shards):
        with tarfile.open(d / f"{s:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(per_shard):
                n = s * per_shard + i
                key = f"{n:09d}"
                add(tar, f"{key}.jpg", jpegs[n % len(jpegs)])
                add(tar, f"{key}.txt", f"a photo of shape {n % 1000} in {COLOURS[n % len(COLOURS)]}".encode())
    (d / "done").write_text(f"{shards} shards of {per_shard}\n")
    print(f"  made {d} in {time.perf_counter() - t0:.1f}s", flush=True)
    return d


def run_once(cmd: list[str], env: dict) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child: wait4 gives that child's own rusage
    (RUSAGE_CHILDREN would be the running maximum over every child so far)."""
    with tempfile.TemporaryDirectory(prefix="flava_scale_out_") as out, open(Path(out) / "log", "w+") as log:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd + ["--output", str(Path(out) / "run")], stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            log.seek(0)
            sys.exit(f"run failed ({p.returncode}): {' '.join(cmd)}\n{log.read()[-4000:]}")
    return wall, usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line y = a + b x."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/flava_scale"))
    ap.add_argument("--sizes", default="3,30,300", help="shard counts, comma-separated")
    ap.add_argument("--with-1m", action="store_true", help="also 1,000 shards (1M samples)")
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--flava", help="a flava executable to run (default: python -m flava.cli)")
    ap.add_argument("--python", default=sys.executable, help="interpreter for python -m flava.cli")
    ap.add_argument("--pythonpath", help="PYTHONPATH for the child, e.g. another checkout's src/")
    args = ap.parse_args()

    sizes = sorted({int(s) for s in args.sizes.split(",")} | ({1000} if args.with_1m else set()))
    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    launcher = [args.flava] if args.flava else [args.python, "-m", "flava.cli"]
    if not args.flava:
        where = subprocess.run([args.python, "-c", "import flava; print(flava.__file__)"],
                               env=env, capture_output=True, text=True, check=True).stdout.strip()
        print(f"flava from {where}")

    print(f"shard sets under {args.root}", flush=True)
    jpegs = make_jpegs()
    dirs = {n: make_shards(args.root, n, args.per_shard, jpegs) for n in sizes}

    rows = []
    for n, d in dirs.items():
        cmd = launcher + ["pretrain", "--max-steps", "1", "--save-every", "1000",
                          "--set", f'data.pairs=["{d}"]', "--set", "data.batch_size=8",
                          "--set", "data.num_workers=0", "--set", "tensorboard=false",
                          "--set", "data.mixing=[1,0,0]",
                          # MIM / MMM-image need the image codebook; pairs-only without them needs none.
                          "--set", "objectives.mmm_image_weight=0", "--set", "objectives.mim_weight=0"]
        runs = [run_once(cmd, env) for _ in range(args.repeat)]
        wall, rss = min(r[0] for r in runs), min(r[1] for r in runs)
        rows.append({"shards": n, "samples": n * args.per_shard, "seconds": wall, "peak_rss_mib": rss / 2**20,
                     "all_seconds": [round(r[0], 3) for r in runs]})
        print(f"  {n} shards: {wall:.2f}s, {rss / 2**20:.0f} MiB  (runs: {', '.join(f'{r[0]:.2f}s' for r in runs)})",
              flush=True)

    base = rows[0]
    print(f"\n{'shards':>7} {'samples':>10} {'seconds':>9} {'peak MiB':>9} {'+s vs ' + str(base['shards']):>10} "
          f"{'+MiB vs ' + str(base['shards']):>11}")
    for r in rows:
        print(f"{r['shards']:>7} {r['samples']:>10,} {r['seconds']:>9.2f} {r['peak_rss_mib']:>9.0f} "
              f"{r['seconds'] - base['seconds']:>+10.2f} {r['peak_rss_mib'] - base['peak_rss_mib']:>+11.0f}")
        r["delta_seconds"] = r["seconds"] - base["seconds"]
        r["delta_mib"] = r["peak_rss_mib"] - base["peak_rss_mib"]

    xs = [r["samples"] for r in rows]
    a_t, b_t = fit(xs, [r["seconds"] for r in rows])
    a_m, b_m = fit(xs, [r["peak_rss_mib"] * 2**20 for r in rows])
    print(f"\nslope: {b_t * 1e6:.2f} s per million samples ({b_t:.3g} s/sample), "
          f"{b_m:.0f} bytes/sample; intercept {a_t:.2f}s, {a_m / 2**20:.0f} MiB")
    extra = {}
    for name, n in TARGETS.items():
        hours, gib = (a_t + b_t * n) / 3600, (a_m + b_m * n) / 2**30
        extra[name] = {"hours": hours, "gib": gib}
        print(f"extrapolated to {name} samples: {hours:.2f} h for the one-step run, {gib:.1f} GiB peak RSS")
    print(json.dumps({"rows": rows, "seconds_per_sample": b_t, "bytes_per_sample": b_m,
                      "intercept_seconds": a_t, "intercept_mib": a_m / 2**20, "extrapolated": extra}))


if __name__ == "__main__":
    main()
