"""Peak memory and step time of a pretraining step with `optim.contrastive_chunks` = 1, 4, 16.

One configuration per child process (a clean memory high-water mark): a PretrainingModel of the
preset, a pair batch (224-px images, captions of 8-32 tokens, BEiT block masks, BERT masking, image
tokens given as `flava prepare` stores them), the pretraining stage's forward (whole or
`forward_chunks`), backward and fused AdamW. Memory is the growth of the process's peak resident
set (Linux VmHWM, reset through /proc/self/clear_refs) over the resident set before the step, with
the weights, their gradients' first allocation and AdamW's state already in place: everything the
step allocates, tensors and allocator scratch alike. Time is the median of `--steps` steps after
a warm-up step on the batch's first 16 rows (the same in every configuration, so the
measured steps' losses must agree).

A configuration whose predicted need (from two calibration runs, batch 16 and 32) exceeds the
memory budget is not run, and is reported with its prediction; the script also runs the largest
power-of-two batch that fits unchunked, with every chunk count, for ratios at one batch.

    python benchmarks/contrastive_chunks.py [--preset small] [--batch 1024] [--chunks 1,4,16]
        [--objectives contrastive|pairs] [--threads 2] [--steps 1] [--budget-gib auto] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import flava
from flava.config import ObjectivesConfig
from flava.data.batch import PairBatch
from flava.objectives.pretraining import PretrainingModel
from flava.optim import build_optimizer
from flava.train.config import TrainConfig
from flava.train.pretraining import PretrainingStage

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import pair_batch  # noqa: E402

CALIBRATION_BATCH = 16


def memory_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status (this benchmark needs Linux)")


def prepared_pair_batch(cfg, B: int, seed: int = 0) -> PairBatch:
    """The shared synthetic pair batch with random image tokens instead of codebook pixels."""
    b = pair_batch(cfg, B, seed=seed)
    targets = torch.randint(0, cfg.image.vocab_size, b.patch_mask.shape, generator=torch.Generator().manual_seed(seed))
    return replace(b, codebook_pixels=None, image_targets=targets)


def objectives(which: str) -> ObjectivesConfig:
    if which == "contrastive":
        return ObjectivesConfig(itm_weight=0, mmm_image_weight=0, mmm_text_weight=0, mim_weight=0, mlm_weight=0)
    return ObjectivesConfig(mim_weight=0, mlm_weight=0)  # contrastive, ITM (10 % swapped), MMM image + text


def child(args) -> dict:
    """One configuration: its peak memory growth and step times."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = flava.preset(args.preset)
    pm = PretrainingModel(cfg, objectives(args.objectives)).train()
    stage = PretrainingStage(TrainConfig(model=cfg))
    stage.model = pm
    opt = build_optimizer(pm, lr=1e-4, weight_decay=0.1)
    batch, chunks = prepared_pair_batch(cfg, args.batch), args.chunks

    def step(b, n):
        generator = torch.Generator().manual_seed(1)
        size = len(b) // n
        outputs = [stage.forward(pm, b, generator, 0)] if n == 1 else \
            stage.forward_chunks(pm, [b.rows(slice(i * size, (i + 1) * size)) for i in range(n)], generator, 0)
        loss = 0.0
        for out in outputs:  # each chunk's backward before the next chunk's forward
            out.total.backward()
            loss += float(out.total)
        opt.step()
        opt.zero_grad(set_to_none=True)
        pm.model.clamp_logit_scale()
        return loss

    # Warm-up (AdamW's state, kernels) on the same rows in every configuration, so the measured
    # steps start from the same weights and their losses must agree.
    step(batch.rows(slice(0, CALIBRATION_BATCH)), 1)
    times, peaks, loss = [], [], None
    for _ in range(args.steps):
        base = memory_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from here
        t = time.perf_counter()
        loss = step(batch, chunks)
        times.append(time.perf_counter() - t)
        peaks.append(memory_kib("VmHWM") - base)
    return dict(batch=args.batch, chunks=chunks, seconds=statistics.median(times), peak_mib=max(peaks) / 1024,
                loss=loss)


def run_child(args, batch: int, chunks: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--preset", args.preset, "--batch", str(batch), "--chunks",
           str(chunks), "--objectives", args.objectives, "--threads", str(args.threads), "--steps", str(args.steps)]
    # Blocks of 64 KiB and more are mapped and unmapped one by one (no dynamic threshold), so the
    # resident set follows the live tensors instead of what malloc keeps for reuse.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"batch {batch}, chunks {chunks} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  batch {batch:5d} chunks {chunks:3d}: {result['seconds']:8.1f} s  peak +{result['peak_mib']:8.0f} MiB  "
          f"loss {result['loss']:.5f}", flush=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--chunks", default="1,4,16")
    ap.add_argument("--objectives", choices=["contrastive", "pairs"], default="contrastive")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--budget-gib", default="auto", help="most memory a step may take (auto: half of MemAvailable)")
    ap.add_argument("--json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.chunks = int(args.chunks)
        print(json.dumps(child(args)))
        return 0
    chunk_counts = [int(c) for c in args.chunks.split(",")]
    if args.budget_gib == "auto":
        available = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines()
                         if x.startswith("MemAvailable:"))
        budget = available * 1024 / 2
    else:
        budget = float(args.budget_gib) * 2**30
    print(f"preset {args.preset}, {args.objectives}, {args.threads} threads, memory budget {budget / 2**30:.1f} GiB",
          flush=True)
    # Growth = fixed (gradients, AdamW's scratch) + per sample x chunk size: two points fix both.
    calibration = [run_child(args, n, 1) for n in (CALIBRATION_BATCH, 2 * CALIBRATION_BATCH)]
    per_sample = (calibration[1]["peak_mib"] - calibration[0]["peak_mib"]) * 2**20 / CALIBRATION_BATCH
    fixed = max(0.0, calibration[0]["peak_mib"] * 2**20 - per_sample * CALIBRATION_BATCH)

    def need(batch, chunks):
        return fixed + per_sample * batch / chunks

    def fits(batch, chunks):
        return need(batch, chunks) <= budget

    fit = max((2**k for k in range(4, 20) if 2**k <= args.batch and fits(2**k, 1)), default=CALIBRATION_BATCH)
    rows, skipped = [], []
    for batch in dict.fromkeys([args.batch, fit]):
        for chunks in chunk_counts:
            if batch % chunks:
                continue
            if not fits(batch, chunks):
                skipped.append(dict(batch=batch, chunks=chunks, predicted_mib=need(batch, chunks) / 2**20))
                print(f"  batch {batch:5d} chunks {chunks:3d}: not run, needs about "
                      f"{skipped[-1]['predicted_mib']:,.0f} MiB (over the budget)", flush=True)
                continue
            rows.append(run_child(args, batch, chunks))
    print("\n| batch | chunks | step time | vs chunks 1 | peak memory growth | vs chunks 1 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        one = next((x for x in rows if x["batch"] == r["batch"] and x["chunks"] == 1), None)
        t = f"{r['seconds'] / one['seconds']:.2f}x" if one else "-"
        m = f"{r['peak_mib'] / one['peak_mib']:.2f}x" if one else "-"
        print(f"| {r['batch']} | {r['chunks']} | {r['seconds']:.1f} s | {t} | {r['peak_mib']:,.0f} MiB | {m} |")
    for s in skipped:
        print(f"| {s['batch']} | {s['chunks']} | not run | | ~{s['predicted_mib']:,.0f} MiB predicted | |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(preset=args.preset, objectives=args.objectives,
                                                   threads=args.threads, budget_gib=budget / 2**30,
                                                   calibration=calibration, rows=rows, skipped=skipped), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
