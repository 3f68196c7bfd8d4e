"""The CPU training step with and without transparent huge pages for PyTorch's large host tensors.

Each round starts two child processes, one with THP_MEM_ALLOC_ENABLE=0 and one with =1 (PyTorch
reads it once, when it first allocates), in an order that alternates by round (ABBA), so that a
shared host's drift reaches both alike. Each child times flava's pair step (contrastive, ITM, MMM
image + text with the codebook in the step; backward; AdamW) on the same synthetic batch: wall
and CPU seconds a step, the minor page faults a step (first touches of fresh memory, which the
kernel zeroes page by page), the process's peak resident memory and its memory in huge pages.
Medians, and each round's ratio of the two (its least and greatest: the spread a host gives).

    python benchmarks/hugepages.py [--preset tiny --image-size 224 --patch-size 32] [--batch 64]
                                   [--threads 2] [--steps 6] [--rounds 6]

The defaults are issue 21's check grid (`tiny` at 224 px, patch 32, batch 64).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def child(args) -> dict:
    import resource
    import time

    import torch

    import flava
    from flava.objectives.pretraining import PretrainingModel
    from flava.optim import build_optimizer

    sys.path.insert(0, str(Path(__file__).parent))
    from synthetic import pair_batch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = flava.preset(args.preset)
    cfg.image.image_size = args.image_size or cfg.image.image_size
    cfg.image.patch_size = args.patch_size or cfg.image.patch_size
    model = PretrainingModel(cfg, codebook=flava.FlavaImageCodebook(cfg.codebook)).train()
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.1)
    batch = pair_batch(cfg, args.batch)

    def step():
        model(batch, torch.Generator().manual_seed(1)).losses.total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    faults, cpu, wall = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time(), time.perf_counter()
    for _ in range(args.steps):
        step()
    n = args.steps
    use = resource.getrusage(resource.RUSAGE_SELF)
    rollup = Path("/proc/self/smaps_rollup")
    huge = next((int(line.split()[1]) / 1024 for line in rollup.read_text().splitlines()
                 if line.startswith("AnonHugePages:")), 0.0) if rollup.is_file() else 0.0
    return {"wall_s": (time.perf_counter() - wall) / n, "cpu_s": (time.process_time() - cpu) / n,
            "faults": (use.ru_minflt - faults) / n, "peak_rss_mib": use.ru_maxrss / 1024, "huge_mib": huge}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--patch-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    runs: dict[str, list[dict]] = {"0": [], "1": []}
    for r in range(args.rounds):
        for setting in ("0", "1") if r % 2 == 0 else ("1", "0"):
            env = {**os.environ, "THP_MEM_ALLOC_ENABLE": setting, "HF_HUB_OFFLINE": "1"}
            done = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], env=env,
                                  capture_output=True, text=True, check=True)
            runs[setting].append(json.loads(done.stdout.splitlines()[-1]))
    med = {s: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for s, rows in runs.items()}
    kernel = {name: (Path("/sys/kernel/mm/transparent_hugepage") / name) for name in ("enabled", "defrag")}
    print(f"flava's pair step, {args.preset} at {args.image_size} px, patch {args.patch_size}, batch {args.batch}, "
          f"{args.threads} threads; {args.rounds} rounds of {args.steps} steps; kernel THP "
          + ", ".join(f"{k}: {f.read_text().strip() if f.is_file() else 'unknown'}" for k, f in kernel.items()))
    for s, name in (("0", "4 KiB pages"), ("1", "huge pages")):
        m = med[s]
        print(f"  {name:12s} {m['wall_s']:.3f} s a step, {m['cpu_s']:.3f} CPU s, {m['faults']:8.0f} page faults, "
              f"peak resident {m['peak_rss_mib']:.0f} MiB ({m['huge_mib']:.0f} in huge pages)")
    for key, what in (("wall_s", "the steps a second"), ("cpu_s", "less CPU")):
        ratios = [a[key] / b[key] for a, b in zip(runs["0"], runs["1"])]
        print(f"  huge pages: {med['0'][key] / med['1'][key]:.2f}x {what} (rounds: {min(ratios):.2f}x to "
              f"{max(ratios):.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
