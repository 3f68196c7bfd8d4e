"""The GPU figures, measured by the project on one CUDA host in one run.

Sections, in the order they run (each written to OUT/gpu.json as it finishes; a failed one is
recorded and the rest run): the quick ones (clip, embed: half a minute) before the real command
(minutes), so one device call brings them back. No TF32 anywhere: the bare step, the command's
processes and the references compute alike.
  env      torch, transformers, the GPU, and a bf16 matmul peak measured now (8192^3, the best of
           three trials of 100 products)
  step     the base pretraining step (pairs: contrastive, ITM, MMM image + text; backward;
           AdamW), bf16 autocast, batch 64 and 256: transformers vs flava (codebook in the step)
           vs flava with prepared image tokens (also with the CPU's syncing forms, outside
           `flava.syncs.sync_free`, to show what it gains); samples/s, peak GiB, MFU from
           torch.utils.flop_counter against the peak above; a torch.profiler summary of the
           prepared step at the larger batch (OUT/profile_step.txt)
  clip     contrastive-only step, batch 256, 77 tokens: flava's encoders vs open_clip ViT-B-16
  embed    image embedding, bf16, batch 512: flava vs transformers get_image_features
  command  the real `flava pretrain` on WebDataset shards of 256-px photo JPEGs at batch 256 and
           64 (its own metrics.jsonl; the loader workers it chose itself) beside the bare step's
           samples/s; `flava train-codebook`'s
           images/s on the GPU against a few steps on the host's CPU, from its logged rows
  loader   loader-only samples/s at the host's core count once the workers' queue is drained
           (benchmarks/loader.py's shards and figures)
  dino     the image-dino stage's feed: loader-only images/s of its multi-crops (2 x 224 + 8 x 96
           px) with 8 workers (a kind's most by default), moved to the device as the trainer moves
           them, with the colour steps in the workers (as on a CPU) and on the device (a GPU
           run's), then the real `flava pretrain --set stage=image-dino` at batch 64 (images/s
           from its metrics.jsonl)

    python benchmarks/gpu.py OUT [--quick] [--skip=step,clip] [--fresh] [--back=DIR] [--deadline=EPOCH_S]

`--quick` runs every section at the tiny preset on whatever device there is (a check of the
script itself, minutes on a CPU). A run keeps the sections an earlier run finished into the same
OUT (a device call cut off at its time limit is continued by the next), unless `--fresh`;
`benchmarks/gpu_session.sh` is the device machine's whole call.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from loader import make_shards, measure_loader  # noqa: E402
from synthetic import pair_batch  # noqa: E402


def _arguments():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="sections: env, step, clip, embed, "
                                 "command, loader, dino (see the module's docstring)")
    ap.add_argument("out", nargs="?", default="gpu-out", help="the results' folder (default gpu-out)")
    ap.add_argument("--quick", action="store_true", help="every section at the tiny preset on whatever device there is")
    ap.add_argument("--skip", default="", help="sections to leave out, comma-separated")
    ap.add_argument("--fresh", action="store_true", help="measure again the sections an earlier run finished")
    ap.add_argument("--back", help="a second folder every result is also written to as it is made (the device "
                    "call's $OUT)")
    ap.add_argument("--deadline", type=float, default=float("inf"),
                    help="when the call ends (seconds since the epoch): a command started later must end before it")
    return ap.parse_args()


ARGS = _arguments()
OUT = Path(ARGS.out)
BACK = Path(ARGS.back) if ARGS.back else None
DEADLINE = ARGS.deadline
QUICK = ARGS.quick
SKIP = {s for s in ARGS.skip.split(",") if s}
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PRESET = "tiny" if QUICK else "base"
RESULT: dict = {}
if not ARGS.fresh and (OUT / "gpu.json").is_file():
    RESULT.update(json.loads((OUT / "gpu.json").read_text()))
T0 = time.time()


def write(name: str, text: str) -> None:
    for folder in (OUT, BACK) if BACK else (OUT,):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def save() -> None:
    write("gpu.json", json.dumps(RESULT, indent=2, default=str))


def section(name):
    def run(fn):
        if name in SKIP:
            return fn
        if isinstance(RESULT.get(name), dict) and "error" not in RESULT[name]:
            print(f"== {name}: kept from an earlier run into {OUT}", flush=True)
            return fn
        t = time.time()
        print(f"== {name} at {t - T0:.0f} s", flush=True)
        try:
            RESULT[name] = fn()
        except Exception as e:  # recorded; the next section runs
            RESULT[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
        RESULT[name + "_s"] = round(time.time() - t, 1)
        print(json.dumps(RESULT[name], default=str)[:3000], flush=True)
        save()
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
        return fn
    return run


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, warm: int = 3, reps: int = 10) -> float:
    for _ in range(warm):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t) / reps


def peak_gib(fn) -> float | None:
    if DEV.type != "cuda":
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def flops_of(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def figures(fn, batch: int, reps: int) -> dict:
    fn()  # optimizer state
    f = flops_of(fn)
    s = timed(fn, 2, reps)
    return {"step_s": round(s, 4), "samples_s": round(batch / s, 1), "peak_gib": peak_gib(fn),
            "tflop_per_step": round(f / 1e12, 3), "mfu": round(f / s / RESULT["env"]["peak_flops"], 3)}


@section("env")
def _env():
    import transformers

    d = {"torch": torch.__version__, "transformers": transformers.__version__, "device": str(DEV),
         "cores": os.cpu_count()}
    n = 1024 if QUICK else 8192
    dtype = torch.bfloat16 if DEV.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=DEV, dtype=dtype) for _ in range(2))
    # Ten 8192-cube products take about 14 ms on an H200: too short for its clocks to settle.
    reps = 10 if QUICK or DEV.type != "cuda" else 100
    s = min(timed(lambda: a @ b, 3, reps) for _ in range(3))
    d["matmul_tflops"] = round(2 * n**3 / s / 1e12, 2)
    d["peak_flops"] = 2 * n**3 / s
    if DEV.type == "cuda":
        d["gpu"] = torch.cuda.get_device_name()
    return d


def build(B: int, L: int = 32):
    """transformers and flava pretraining models with the same weights, one batch of inputs."""
    import transformers

    import flava
    from flava.loading import load_weights
    from flava.interop import transformers as hf_interop
    from flava.objectives.negatives import swap_negatives
    from flava.objectives.pretraining import PretrainingModel

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = flava.preset(PRESET)
    with torch.device(DEV):  # random initialisation on the GPU: minutes less than on the host
        ref = transformers.FlavaForPreTraining(transformers.FlavaConfig(**hf_interop.config_to_hf(cfg, True)))
        model_sd, heads_sd, codebook_sd, _ = hf_interop.state_dict_from_hf(ref.state_dict())
        ours = PretrainingModel(cfg, codebook=flava.FlavaImageCodebook(cfg.codebook))
    for module, sd, what in ((ours.model, model_sd, "model"), (ours.heads, heads_sd, "heads"),
                             (ours.codebook, codebook_sd, "codebook")):
        load_weights(module, sd, what, Path("memory"))
    batch = pair_batch(cfg, B, L)
    ids, mask, masked, labels = batch.input_ids, batch.attention_mask, batch.masked_input_ids, batch.mlm_labels
    pixels, pmask, cpix = batch.pixel_values, batch.patch_mask, batch.codebook_pixels
    neg = swap_negatives(ids, mask, 0.1, torch.Generator().manual_seed(1))
    t = neg.text_index
    hf_in = dict(input_ids=ids[t], input_ids_masked=masked[t], attention_mask=mask[t], pixel_values=pixels,
                 bool_masked_pos=pmask, mlm_labels=labels[t], itm_labels=neg.labels, codebook_pixel_values=cpix)
    return ref, ours, batch, hf_in


def steps(ref, ours, batch, hf):
    from dataclasses import replace

    from flava.optim import build_optimizer
    from flava.syncs import sync_free

    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    opt_ours = build_optimizer(ours, lr=1e-4, weight_decay=0.1)
    with torch.no_grad():
        targets = ours.codebook.token_ids(batch.codebook_pixels)
    prepared = replace(batch, codebook_pixels=None, image_targets=targets)

    def autocast():
        return torch.autocast(DEV.type, dtype=torch.bfloat16)

    def step_ref():
        with autocast():
            loss = ref(**{k: v.clone() for k, v in hf.items()}).loss
        loss.backward()
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)

    def step_ours(b=batch, free=True):
        # As the trainer runs it on a GPU: nothing read back (flava.syncs); free=False for the CPU's forms.
        with autocast(), sync_free(free and DEV.type == "cuda"):
            loss = ours(b, torch.Generator(device=DEV).manual_seed(1)).losses.total
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    return {"transformers": step_ref, "flava": step_ours, "flava_prepared": lambda: step_ours(prepared),
            "flava_prepared_syncing": lambda: step_ours(prepared, free=False)}


@section("step")
def _step():
    out = {}
    for B in ([4] if QUICK else [64, 256]):
        ref, ours, batch, hf_in = build(B)
        ref.to(DEV).train(), ours.to(DEV).train()
        fns = steps(ref, ours, batch.to(DEV), {k: v.to(DEV) for k, v in hf_in.items()})
        row = {}
        for name, fn in fns.items():
            try:
                row[name] = figures(fn, B, 3 if QUICK else 8)
            except Exception as e:
                row[name] = {"error": f"{type(e).__name__}: {e}"[:400]}
            print(B, name, row[name], flush=True)
        if B == (4 if QUICK else 256):  # where the time of the prepared step goes
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV.type == "cuda" else [])
            with profile(activities=activities) as prof:
                for _ in range(3):
                    fns["flava_prepared"]()
                sync()
            key = "cuda_time_total" if DEV.type == "cuda" else "cpu_time_total"
            table = prof.key_averages().table(sort_by=key, row_limit=30)
            write("profile_step.txt", table)
            row["profile"] = "profile_step.txt"
        out[f"batch_{B}"] = row
        del ref, ours, fns
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
    return out


def shards() -> str:
    return make_shards(OUT / "shards", shards=4 if QUICK else 16, per=64 if QUICK else 512)


def _flava(args: list[str], timeout: int) -> tuple[subprocess.CompletedProcess, float]:
    """The command, ended (killed, as subprocess.run kills at its timeout) before the call's deadline."""
    left = min(timeout, DEADLINE - time.time() - 15)
    if left < 30:
        raise TimeoutError("too little of the call left to start it; the next call runs it")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    t = time.time()
    done = subprocess.run([sys.executable, "-m", "flava.cli", *args], capture_output=True, text=True,
                          timeout=left, env=env)
    return done, time.time() - t


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


@section("clip")
def _clip():
    import torch.nn.functional as F

    import flava
    from flava.config import ObjectivesConfig
    from flava.data.batch import PairBatch
    from flava.objectives.pretraining import PretrainingModel
    from flava.optim import build_optimizer
    from flava.syncs import sync_free

    # open_clip's context length (the tiny preset's text encoder takes fewer positions)
    B, L = (8 if QUICK else 256), min(77, flava.preset(PRESET).text.max_position_embeddings)

    def flava_figures() -> dict:  # its model and optimizer state are freed on return, before open_clip's
        cfg = flava.preset(PRESET)
        only = ObjectivesConfig(itm_weight=0, mmm_image_weight=0, mmm_text_weight=0, mim_weight=0, mlm_weight=0)
        ours = PretrainingModel(cfg, only).to(DEV).train()
        ids = torch.randint(1000, 30000, (B, L), device=DEV)
        batch = PairBatch(torch.randn(B, 3, cfg.image.image_size, cfg.image.image_size, device=DEV), ids,
                          torch.ones_like(ids), torch.zeros(B, cfg.image.num_patches, dtype=torch.bool, device=DEV),
                          ids, torch.full_like(ids, -100))
        opt = build_optimizer(ours, lr=1e-4, weight_decay=0.1)

        def step_ours():  # as the trainer runs it on a GPU: nothing read back (flava.syncs)
            with torch.autocast(DEV.type, dtype=torch.bfloat16), sync_free(DEV.type == "cuda"):
                loss = ours(batch, torch.Generator(device=DEV).manual_seed(1)).losses.total
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return figures(step_ours, B, 8)

    res = {"flava": flava_figures()}
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
    try:
        import open_clip
    except ImportError as e:  # open_clip needs torchvision and timm, which the GPU host has
        res["open_clip_vit_b16"] = {"error": f"open_clip could not be imported: {e}"}
        return res
    model = open_clip.create_model("ViT-B-16", pretrained=None, output_dict=True).to(DEV).train()
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    tokens, pixels = torch.randint(1000, 30000, (B, 77), device=DEV), torch.randn(B, 3, 224, 224, device=DEV)

    def step_open_clip():
        with torch.autocast(DEV.type, dtype=torch.bfloat16):
            out = model(pixels, tokens)
            logits = out["logit_scale"] * out["image_features"] @ out["text_features"].t()
            labels = torch.arange(B, device=DEV)
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        loss.backward()
        opt2.step()
        opt2.zero_grad(set_to_none=True)

    res["open_clip_vit_b16"] = figures(step_open_clip, B, 8)
    return res


@section("embed")
def _embed():
    import transformers

    import flava
    from flava.interop import transformers as hf_interop
    from flava.model.flava import FlavaModel

    B = 8 if QUICK else 512
    cfg = flava.preset(PRESET)
    dtype = torch.bfloat16 if DEV.type == "cuda" else torch.float32
    ref = transformers.FlavaModel(transformers.FlavaConfig(**hf_interop.config_to_hf(cfg, False))).to(DEV, dtype).eval()
    ours = FlavaModel(cfg).to(DEV, dtype).eval()
    pixels = torch.randn(B, 3, cfg.image.image_size, cfg.image.image_size, device=DEV, dtype=dtype)
    res = {}
    with torch.inference_mode():
        for name, fn in (("transformers", lambda: ref.get_image_features(pixel_values=pixels)),
                         ("flava", lambda: ours.encode_image(pixels))):
            res[name] = {"images_s": round(B / timed(fn, 2, 6), 1)}
    return res


@section("command")
def _command():
    """Each sub-run is kept in RESULT as it ends (a call cut off keeps what finished, and the next
    call runs only the rest); one that failed or did not finish starts again from an empty folder
    on the next call."""
    import shutil

    res = RESULT.setdefault("command_parts", {})
    work = OUT / "command"
    device = "cuda" if DEV.type == "cuda" else "cpu"
    vocab = "codebook.vocab_size=512" if QUICK else "codebook.vocab_size=8192"

    def part(name: str, fn) -> None:
        if name in res and "error" not in res[name]:
            return
        shutil.rmtree(work / name, ignore_errors=True)
        try:
            res[name] = fn(work / name)
            if res[name]["rc"] != 0:
                res[name]["error"] = f"exit status {res[name]['rc']}"
        except Exception as e:
            res[name] = {"error": f"{type(e).__name__}: {e}"[:600]}
        print(name, json.dumps(res[name], default=str)[:1500], flush=True)
        save()

    def codebook(where: str, steps: int, batch: int):
        def run(out: Path) -> dict:
            # Images/s from the logged rows after the first (which holds the start-up): the
            # evaluations before and after, on a small sample here, are not training.
            done, wall = _flava(["train-codebook", "--pairs", shards(), "--config", PRESET, "--steps", str(steps),
                                 "--batch-size", str(batch), "--device", where, "--output", str(out),
                                 "--log-every", "1" if steps < 8 else "4", "--eval-images", str(batch),
                                 "--set", vocab], 400)
            rates = [r["images_per_s"] for r in _rows(out / "codebook_metrics.jsonl")[1:] if "images_per_s" in r]
            return {"rc": done.returncode, "wall_s": round(wall, 1), "steps": steps, "batch": batch,
                    "images_s_median": round(float(np.median(rates)), 2) if rates else None,
                    "tail": (done.stdout + done.stderr)[-600:]}
        return run

    def pretrain(batch: int, steps: int):
        def run(out: Path) -> dict:
            cb = work / f"codebook_{device}"
            args = ["pretrain", "--output", str(out), "--config", PRESET, "--max-steps", str(steps),
                    "--set", f'data.pairs=["{shards()}"]', "--set", f"data.batch_size={batch}",
                    "--set", f"device={device}",  # the loader workers a user gets: data.num_workers' default
                    "--set", "precision=bf16" if device == "cuda" else "precision=fp32", "--set", "log_every=5",
                    "--set", f"save_every={steps}", "--set", "data.mixing=[1,0,0]", "--set", "tensorboard=false"]
            args += ["--set", f"codebook={cb}"] if (cb / "model.safetensors").is_file() else \
                ["--set", "objectives.mim_weight=0", "--set", "objectives.mmm_image_weight=0"]
            done, wall = _flava(args, 400)
            rates = [r["samples_per_s"] for r in _rows(out / "metrics.jsonl")[1:]]
            said = re.search(r"loader workers per process: pairs (\d+)", " ".join((done.stdout + done.stderr).split()))
            row = {"rc": done.returncode, "wall_s": round(wall, 1), "codebook_in_step": f"codebook={cb}" in args,
                   "loader_workers": int(said.group(1)) if said else None,
                   "samples_s_median": round(float(np.median(rates)), 1) if rates else None,
                   "tail": (done.stdout + done.stderr)[-800:]}
            bare = RESULT.get("step", {}).get(f"batch_{batch}", {}).get("flava", {}).get("samples_s")
            if bare and rates:
                row["bare_step_samples_s"], row["of_bare_step"] = bare, round(float(np.median(rates)) / bare, 3)
            return row
        return run

    # The codebook first: the pretraining runs then put it in the step, as the bare step measured.
    part(f"codebook_{device}", codebook(device, 6 if QUICK else 24, 8 if QUICK else 64))
    for batch in ([8] if QUICK else [256, 64]):  # the bare step's batch sizes
        part(f"pretrain_b{batch}", pretrain(batch, 12 if QUICK else 30))
    if device == "cuda":  # the CPU beside it, in the same run: a few steps at a smaller batch
        part("codebook_cpu", codebook("cpu", 3, 16))
        gpu, cpu = (res.get(f"codebook_{w}", {}).get("images_s_median") for w in (device, "cpu"))
        if gpu and cpu:
            res["codebook_speedup_images_s"] = round(gpu / cpu, 1)
    failed = [name for name, r in res.items() if isinstance(r, dict) and "error" in r]
    return {**res, "error": f"{', '.join(failed)} to run again"} if failed else dict(res)


def steady_rate(stream, workers: int, draws: int, move=None) -> float:
    """Samples/s of `stream` once its workers' queue is drained (each prefetches 4 batches, which
    a short timing would count at no cost), each batch passed to `move` (then the device synced)."""
    for _ in range(4 * workers + 2):
        stream.next_batch()
    sync()
    t = time.perf_counter()
    for _ in range(draws):
        batch = stream.next_batch()
        if move is not None:
            batch = move(batch)
    sync()
    return round(draws * len(batch) / (time.perf_counter() - t), 1)


@section("loader")
def _loader():
    """Loader-only samples/s at the base sizes (224-px crops, 112-px codebook views), per worker count."""
    import flava
    import flava.data.pipeline as pipeline
    import flava.data.samples as samples
    from flava.data.registry import open_source

    cores = os.cpu_count() or 2
    res = {}
    cfg = flava.preset(PRESET)
    spec = samples.SampleSpec.for_model(cfg, flava.config.ObjectivesConfig(), 64, 0.9)
    for workers in sorted({0, 1, max(1, cores // 2), max(1, cores - 1)}):
        stream = pipeline.BatchStream("pairs", open_source("pairs", shards()), samples.SampleMaker(spec, 0),
                                      128, seed=0, num_workers=workers)
        res[f"workers_{workers}"] = steady_rate(stream, workers, 4 if QUICK else 16)
        stream._it = None
    res["tiny_224_figures"] = {f"workers_{w}": measure_loader("flava", shards(), w, 64, 6)
                               for w in (0, 1, 2)}
    return res


@section("dino")
def _dino():
    from flava.data.multicrop import MultiCropSpec
    from flava.data.pipeline import BatchStream
    from flava.data.registry import open_source
    from flava.data.samples import MultiCropMaker

    cores = os.cpu_count() or 2
    workers = max(1, min(8, cores - 1))  # a kind's default at most; each worker holds 4 batches (shared memory)
    size, local = (64, 32) if QUICK else (224, 96)
    res: dict = {"workers": workers}
    for where, on_device in (("workers", False), ("device", True)):
        maker = MultiCropMaker(MultiCropSpec(size, local), 0, colour_on_device=on_device)
        stream = BatchStream("images", open_source("images", shards()), maker, 64, seed=0, num_workers=workers)
        # Moved as the trainer moves a batch: pinned, without waiting, then coloured on the device.
        pinned = DEV.type == "cuda"
        res[f"loader_colour_in_{where}_images_s"] = steady_rate(stream, workers, 3 if QUICK else 16, lambda b: (
            b.pin_memory() if pinned else b).to(DEV, non_blocking=pinned, mean=maker.spec.mean, std=maker.spec.std))
        stream._it = None
    out = OUT / "dino_run"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    device = "cuda" if DEV.type == "cuda" else "cpu"
    done, wall = _flava(["pretrain", "--output", str(out), "--config", PRESET, "--max-steps", "6" if QUICK else "30",
                         "--set", "stage=image-dino", "--set", f'data.images=["{shards()}"]',
                         "--set", "data.batch_size=8" if QUICK else "data.batch_size=64", "--set", f"device={device}",
                         "--set", "precision=bf16" if device == "cuda" else "precision=fp32",
                         "--set", "log_every=2" if QUICK else "log_every=5", "--set", "save_every=1000",
                         "--set", "tensorboard=false"], 300)
    rates = [r["samples_per_s"] for r in _rows(out / "metrics.jsonl")[1:]]
    res["command"] = {"rc": done.returncode, "wall_s": round(wall, 1),
                      "images_s_median": round(float(np.median(rates)), 1) if rates else None,
                      "tail": (done.stdout + done.stderr)[-800:]}
    if done.returncode != 0:
        res["error"] = f"the command's exit status {done.returncode}"
    return res


if __name__ == "__main__":
    print(json.dumps({k: v for k, v in RESULT.items() if not isinstance(v, dict) or "trace" not in v},
                     indent=1, default=str)[:10000])
