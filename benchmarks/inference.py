"""Inference speed and memory: flava (fp32 and int8) against transformers' FLAVA.

Both models hold the same weights and see the same inputs, in one process. Timings interleave
the contenders and report medians; memory is the peak of tensor memory allocated during one call,
replayed from torch.profiler's allocation and free events (independent of malloc caching).

    python benchmarks/inference.py [--preset base] [--repeats 7] [--threads 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import flava
from flava.interop import transformers as hf_interop
from flava.model.flops import image_flops, multimodal_flops, text_flops
from flava.model.quantize import quantize_int8
from flava.loading import load_weights


def peak_memory_mib(fn) -> float:
    """Peak of live tensor memory allocated while `fn` runs, in MiB."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak / 2**20


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def interleaved_medians(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    times = {k: [] for k in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="base")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import transformers

    transformers.logging.set_verbosity_error()
    peak = matmul_gflops()
    print(f"machine: fp32 matmul {peak:.0f} GFLOP/s on {args.threads} threads; torch {torch.__version__}, "
          f"transformers {transformers.__version__}", flush=True)

    cfg = flava.preset(args.preset)
    ref = transformers.FlavaModel(transformers.FlavaConfig(**hf_interop.config_to_hf(cfg, with_codebook=False)))
    ref.eval()
    model_sd, _, _, _ = hf_interop.state_dict_from_hf(ref.state_dict())
    ours = flava.FlavaModel(cfg)
    load_weights(ours, model_sd, "model", Path("(transformers in memory)"))
    ours.eval()
    ours8 = quantize_int8(ours)

    g = torch.Generator().manual_seed(0)
    size = cfg.image.image_size
    img8 = torch.randn(8, 3, size, size, generator=g)
    lengths = torch.randint(8, 33, (32,), generator=g)
    ids32 = torch.randint(1000, cfg.text.vocab_size, (32, 32), generator=g)
    mask32 = (torch.arange(32)[None] < lengths[:, None]).long()
    ids32[mask32 == 0] = 0
    ids8, mask8 = ids32[:8], mask32[:8]
    full32 = torch.ones_like(mask32)

    def ref_image():
        return F.normalize(ref.get_image_features(pixel_values=img8).pooler_output[:, 0], dim=-1)

    def ref_text():
        out = ref.get_text_features(input_ids=ids32, attention_mask=mask32)
        return F.normalize(out.pooler_output[:, 0], dim=-1)

    def ref_mm():
        return ref(input_ids=ids8, pixel_values=img8, attention_mask=mask8).multimodal_embeddings

    workloads = {
        "image embeddings (batch 8)": dict(
            ref=ref_image, ours=lambda: ours.encode_image(img8), int8=lambda: ours8.encode_image(img8),
            flops=8 * image_flops(cfg)),
        "text embeddings, lengths 8-32 padded (batch 32 x 32 tokens)": dict(
            ref=ref_text, ours=lambda: ours.encode_text(ids32, mask32), int8=lambda: ours8.encode_text(ids32, mask32),
            flops=32 * text_flops(cfg, 32)),
        "text embeddings, no padding (batch 32 x 32 tokens)": dict(
            ref=lambda: F.normalize(ref.get_text_features(input_ids=ids32, attention_mask=full32).pooler_output[:, 0],
                                    dim=-1),
            ours=lambda: ours.encode_text(ids32, full32), int8=lambda: ours8.encode_text(ids32, full32),
            flops=32 * text_flops(cfg, 32)),
        "multimodal forward (batch 8)": dict(
            ref=ref_mm, ours=lambda: ours(img8, ids8, mask8).multimodal.last_hidden_state,
            int8=lambda: ours8(img8, ids8, mask8).multimodal.last_hidden_state,
            flops=8 * multimodal_flops(cfg, 32)),
    }
    results = {"matmul_gflops": peak, "preset": args.preset, "threads": args.threads, "workloads": {}}
    with torch.inference_mode():
        for name, w in workloads.items():
            want, got, got8 = w["ref"](), w["ours"](), w["int8"]()
            err = float((got - want).abs().max())
            cos8 = float(F.cosine_similarity(got8.flatten(1) if got8.dim() == 2 else got8.reshape(-1, got8.shape[-1]),
                                             got.flatten(1) if got.dim() == 2 else got.reshape(-1, got.shape[-1]),
                                             dim=-1).min())
            t = interleaved_medians({k: w[k] for k in ("ref", "ours", "int8")}, args.repeats)
            mem = {k: peak_memory_mib(w[k]) for k in ("ref", "ours", "int8")}
            r = dict(
                transformers_ms=t["ref"] * 1e3, flava_ms=t["ours"] * 1e3, flava_int8_ms=t["int8"] * 1e3,
                speedup_fp32=t["ref"] / t["ours"], speedup_int8=t["ref"] / t["int8"],
                peak_fraction_transformers=w["flops"] / t["ref"] / 1e9 / peak,
                peak_fraction_flava=w["flops"] / t["ours"] / 1e9 / peak,
                memory_mib=mem, max_abs_diff_fp32=err, min_cosine_int8=cos8,
            )
            results["workloads"][name] = r
            print(f"\n{name}: {w['flops'] / 1e9:.1f} GFLOP per call", flush=True)
            print(f"  transformers {r['transformers_ms']:8.1f} ms  ({r['peak_fraction_transformers']:.0%} of peak)"
                  f"  peak mem {mem['ref']:.0f} MiB")
            print(f"  flava fp32   {r['flava_ms']:8.1f} ms  ({r['peak_fraction_flava']:.0%} of peak)"
                  f"  peak mem {mem['ours']:.0f} MiB  speedup {r['speedup_fp32']:.2f}x  max|diff| {err:.1e}")
            print(f"  flava int8   {r['flava_int8_ms']:8.1f} ms"
                  f"                  peak mem {mem['int8']:.0f} MiB  speedup {r['speedup_int8']:.2f}x"
                  f"  min cosine to fp32 {cos8:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
