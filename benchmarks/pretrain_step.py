"""One whole pretraining step, flava against transformers' FlavaForPreTraining.

Same config, weights and inputs, in one process: the pair losses (global contrastive, ITM with
10 % swapped captions, MMM image and text), backward, AdamW. transformers computes the image
targets with the codebook inside its step; flava is timed both ways: with the codebook in the
step, and with the targets read from the batch as `flava prepare` stores them (the same ids). Timings interleave the two and report medians; memory is the peak of
tensor memory allocated during one step (torch.profiler events), optimizer state included.

    python benchmarks/pretrain_step.py [--preset small] [--batch 16] [--steps 5] [--threads 2] [--sync-free]
                                       [--baseline REV] [--image-size PX --patch-size PX]

`--sync-free` also times the prepared step in `flava.syncs.sync_free()`, the forms the trainer runs
on a GPU (masked instead of skipped padding, losses over the host's counts), here on the CPU.
`--bf16` also times the prepared step under bfloat16 autocast on the CPU (`precision=bf16`), which
CPUs with AMX or AVX512-BF16 run in hardware.
`--baseline REV` also times both flava steps of the `src/flava` of git revision REV (imported
under another name, the same weights and inputs), interleaved with ours: a before/after ratio that
a shared machine's changing load does not skew.
`--image-size` and `--patch-size` change the preset's image grid (issue 21's check: `--preset tiny
--image-size 224 --patch-size 32 --batch 64`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import flava
from flava.data.batch import PairBatch
from flava.interop import transformers as hf_interop
from flava.objectives.pretraining import PretrainingHeads
from flava.objectives.negatives import swap_negatives
from flava.objectives.pretraining import PretrainingModel
from flava.loading import load_weights
from flava.optim import build_optimizer
from flava.syncs import sync_free

sys.path.insert(0, str(Path(__file__).parent))
from inference import peak_memory_mib  # noqa: E402
from synthetic import pair_batch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sync-free", action="store_true")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--baseline")
    ap.add_argument("--json")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--patch-size", type=int)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = grid(flava.preset(args.preset), args)
    ref = transformers.FlavaForPreTraining(
        transformers.FlavaConfig(**hf_interop.config_to_hf(cfg, with_codebook=True)))
    ref.train()
    model_sd, heads_sd, codebook_sd, unknown = hf_interop.state_dict_from_hf(ref.state_dict())
    assert not unknown
    ours = PretrainingModel(cfg, codebook=flava.FlavaImageCodebook(cfg.codebook))
    load_weights(ours.model, model_sd, "model", Path("memory"))
    load_weights(ours.heads, heads_sd, "heads", Path("memory"))
    load_weights(ours.codebook, codebook_sd, "codebook", Path("memory"))
    assert isinstance(ours.heads, PretrainingHeads)
    ours.train()

    # Inputs: captions of 8-32 tokens, BEiT block masks, BERT masking, 10 % swapped captions.
    B = args.batch
    batch = pair_batch(cfg, B)
    pixels, ids, mask, patch_mask = batch.pixel_values, batch.input_ids, batch.attention_mask, batch.patch_mask
    masked_ids, mlm_labels, codebook_pixels = batch.masked_input_ids, batch.mlm_labels, batch.codebook_pixels
    with torch.no_grad():
        targets = ours.codebook.token_ids(codebook_pixels)
    prepared = PairBatch(pixels, ids, mask, patch_mask, masked_ids, mlm_labels, image_targets=targets)

    # transformers takes its negatives as input: give it the ones our step draws.
    negatives = swap_negatives(ids, mask, 0.1, torch.Generator().manual_seed(1))
    assert (negatives.labels == 0).any()
    t_idx = negatives.text_index
    hf_inputs = dict(
        input_ids=ids[t_idx], input_ids_masked=masked_ids[t_idx], attention_mask=mask[t_idx],
        pixel_values=pixels, bool_masked_pos=patch_mask, mlm_labels=mlm_labels[t_idx],
        itm_labels=negatives.labels, codebook_pixel_values=codebook_pixels,
    )
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.1)
    opt_ours = build_optimizer(ours, lr=1e-4, weight_decay=0.1)

    def step_ref():
        loss = ref(**{k: v.clone() for k, v in hf_inputs.items()}).loss  # it writes into its labels
        loss.backward()
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)
        return loss.detach()

    def step_ours(b=batch):
        loss = ours(b, torch.Generator().manual_seed(1)).losses.total
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss.detach()

    def step_prepared():
        return step_ours(prepared)

    first_ref, first_ours = step_ref(), step_ours()  # also creates the optimizer state
    print(f"preset {args.preset} at {cfg.image.image_size} px, patch {cfg.image.patch_size}; batch {B}, "
          f"{args.threads} threads; first-step loss transformers "
          f"{first_ref:.6f}, flava {first_ours:.6f}", flush=True)
    steps = {"ref": step_ref, "ours": step_ours, "prepared": step_prepared}
    if args.sync_free:
        counted = prepared.to("cpu")  # `to` reads the masked counts the sync-free losses are sized by

        def step_sync_free():
            with sync_free():
                return step_ours(counted)

        steps["sync_free"] = step_sync_free
    if args.bf16:
        def step_bf16():
            with torch.autocast("cpu", dtype=torch.bfloat16):  # as the trainer's precision=bf16
                return step_ours(prepared)

        steps["bf16"] = step_bf16
    if args.baseline:
        steps.update(baseline_steps(args.baseline, args, ours, batch, prepared))
    times = {k: [] for k in steps}
    for _ in range(args.steps):
        for name, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {k: peak_memory_mib(fn) for k, fn in steps.items()}
    result = dict(preset=args.preset, image_size=cfg.image.image_size, patch_size=cfg.image.patch_size, batch=B,
                  threads=args.threads, transformers_s=med["ref"],
                  flava_s=med["ours"], flava_prepared_s=med["prepared"], speedup=med["ref"] / med["ours"],
                  speedup_prepared=med["ref"] / med["prepared"], memory_mib=mem,
                  first_loss_transformers=float(first_ref), first_loss_flava=float(first_ours))
    print(f"transformers            {med['ref']:.2f} s/step  peak mem {mem['ref']:.0f} MiB")
    print(f"flava, codebook in step {med['ours']:.2f} s/step  peak mem {mem['ours']:.0f} MiB  "
          f"speedup {result['speedup']:.2f}x")
    print(f"flava, prepared tokens  {med['prepared']:.2f} s/step  peak mem {mem['prepared']:.0f} MiB  "
          f"speedup {result['speedup_prepared']:.2f}x")
    if args.sync_free:
        result["flava_sync_free_s"] = med["sync_free"]
        print(f"flava, prepared, sync_free {med['sync_free']:.2f} s/step  peak mem {mem['sync_free']:.0f} MiB  "
              f"{med['sync_free'] / med['prepared']:.2f}x the prepared step's time")
    if args.bf16:
        result["flava_bf16_s"] = med["bf16"]
        print(f"flava, prepared, bf16 autocast {med['bf16']:.2f} s/step  peak mem {mem['bf16']:.0f} MiB  "
              f"speedup over float32 {med['prepared'] / med['bf16']:.2f}x")
    if args.baseline:
        for name in ("ours", "prepared"):
            result[f"baseline_{name}_s"] = med[f"baseline_{name}"]
            print(f"baseline {args.baseline}, {name:8s} {med[f'baseline_{name}']:.2f} s/step; ours/baseline time "
                  f"{med[name] / med[f'baseline_{name}']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def grid(cfg, args):
    """The preset with the image size and patch size asked for."""
    cfg.image.image_size = args.image_size or cfg.image.image_size
    cfg.image.patch_size = args.patch_size or cfg.image.patch_size
    return cfg


def baseline_steps(rev: str, args, ours, batch, prepared) -> dict:
    """Steps of revision `rev`'s flava with `ours`'s weights on the same batches."""
    import atexit
    import importlib
    import shutil
    import tempfile
    from dataclasses import fields

    from loader import baseline_package

    where = Path(tempfile.mkdtemp())
    atexit.register(shutil.rmtree, where, ignore_errors=True)
    name = baseline_package(rev, where)
    old = importlib.import_module(name)
    pretraining, batches = (importlib.import_module(f"{name}.{m}") for m in ("objectives.pretraining", "data.batch"))
    cfg = grid(old.preset(args.preset), args)
    model = pretraining.PretrainingModel(cfg, codebook=old.FlavaImageCodebook(cfg.codebook))
    model.load_state_dict(ours.state_dict())
    model.train()
    opt = importlib.import_module(f"{name}.optim").build_optimizer(model, lr=1e-4, weight_decay=0.1)

    def as_old(b):  # the old batch type, with the fields it has
        names = {f.name for f in fields(batches.PairBatch)}
        return batches.PairBatch(**{f.name: getattr(b, f.name) for f in fields(b) if f.name in names})

    def step(b):
        loss = model(b, torch.Generator().manual_seed(1)).losses.total
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    old_batch, old_prepared = as_old(batch), as_old(prepared)
    step(old_batch)  # the optimizer state
    return {"baseline_ours": lambda: step(old_batch), "baseline_prepared": lambda: step(old_prepared)}


if __name__ == "__main__":
    sys.exit(main())
