"""What a run pays around its steps: building a new model, and writing a checkpoint's training state.

In one process, interleaved, medians of `--repeats`:
- a new `PretrainingModel` of `--preset` (default base) initialised with flava's one-pass truncated
  normal against the same build with torch's `nn.init.trunc_normal_` (which samples the same
  distribution by rejection);
- the AdamW state of that model written with `flava.io.checkpoint.save_state` against plain
  `torch.save` (which also computes the zip's CRC-32 over every byte).

    python benchmarks/startup.py [--preset base] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import flava
import flava.model.flava as model_module
from flava.io.checkpoint import save_state
from flava.objectives.pretraining import PretrainingModel


def torch_trunc_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    return nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="base")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = flava.preset(args.preset)
    ours_init = model_module.trunc_normal_

    def build(init) -> PretrainingModel:
        model_module.trunc_normal_ = init
        try:
            return PretrainingModel(cfg)
        finally:
            model_module.trunc_normal_ = ours_init

    times: dict[str, list[float]] = {"torch init": [], "flava init": [], "torch.save": [], "save_state": []}
    model = build(ours_init)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # the state a checkpoint holds: two moments a parameter
    state = {"optimizer": opt.state_dict()}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name, init in (("torch init", torch_trunc_normal_), ("flava init", ours_init)):
                t = time.perf_counter()
                build(init)
                times[name].append(time.perf_counter() - t)
            for name, save in (("torch.save", torch.save), ("save_state", save_state)):
                path = Path(tmp) / "state.pt"
                t = time.perf_counter()
                save(state, path)
                times[name].append(time.perf_counter() - t)
                size = path.stat().st_size
                path.unlink()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"preset {args.preset} ({params / 1e6:.0f} M parameters with heads and codebook), {args.threads} threads, "
          f"median of {args.repeats}")
    print(f"new model: torch's trunc_normal_ {med['torch init']:.2f} s, flava's {med['flava init']:.2f} s: "
          f"{med['torch init'] / med['flava init']:.1f}x")
    print(f"training state ({size / 2**20:.0f} MiB): torch.save {med['torch.save']:.2f} s, save_state "
          f"{med['save_state']:.2f} s: {med['torch.save'] / med['save_state']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
