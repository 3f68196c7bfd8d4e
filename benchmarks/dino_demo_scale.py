"""Does the `image-dino` stage learn at the CPU demo's scale? Runs the stage itself (the training
loop, as `flava pretrain --set stage=image-dino --max-steps 600` does: the packaged demo images,
the tiny preset and its DINO settings, batch 32) for each seed, then measures what it learnt:

- collapse: the teacher's entropy (nats) over the steps against log K (the uniform distribution),
  the share of output dimensions in use;
- a digits probe: the teacher's encoder (what the stage hands on) against the same encoder
  untrained (the run's own initialisation), by a weighted 20-NN classifier on cosine similarity
  (DINO's k-NN evaluation, T = 0.07) and by the evaluation suite's linear probe, both on
  scikit-learn's digits split as the demo suite splits them (train: the 1,347 digits the demo
  pretrains on, unlabelled; test: 450 it never sees).

    python benchmarks/dino_demo_scale.py [--seeds 0 1] [--steps N] [--set KEY=VALUE ...] [--no-linear]

`--set` takes `flava pretrain` settings (`dino.out_dim=1024`, `optim.lr=1e-3`, ...).
"""

from __future__ import annotations

import argparse
import copy
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flava.data.transforms import eval_transform
from flava.evaluate.packaged import digits
from flava.evaluate.probe import linear_probe
from flava.train.presets import DEMO_DINO_STEPS, demo_config
from flava.train.trainer import Trainer
from flava.typed import apply_overrides

KNN_K, KNN_T = 20, 0.07


@torch.no_grad()
def cls_features(encoder: torch.nn.Module, images: list, size: int, batch: int = 256) -> np.ndarray:
    """The encoder's CLS after its final LayerNorm on eval-transformed images (what the suite's
    image probes read)."""
    encoder.eval()
    out = []
    for i in range(0, len(images), batch):
        pixels = torch.stack([eval_transform(im, size) for im in images[i:i + batch]])
        out.append(encoder(pixels, cls_only=True).last_hidden_state[:, 0].float().numpy())
    return np.concatenate(out)


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 k: int = KNN_K, t: float = KNN_T) -> float:
    """DINO's weighted k-NN (`eval_knn.py`): cosine similarity, the k nearest vote with weight
    exp(similarity / t)."""
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    b = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    sim = b @ a.T
    top = np.argsort(-sim, axis=1)[:, :k]
    weights = np.exp(np.take_along_axis(sim, top, 1) / t)
    classes = int(train_y.max()) + 1
    votes = np.zeros((len(b), classes))
    np.add.at(votes, (np.arange(len(b))[:, None].repeat(k, 1), train_y[top]), weights)
    return float((votes.argmax(1) == test_y).mean() * 100)


def probes(encoder, data, size: int, linear: bool) -> dict[str, float]:
    xtr, ytr, xte, yte = data
    ftr, fte = cls_features(encoder, xtr, size), cls_features(encoder, xte, size)
    out = {"knn": knn_accuracy(ftr, ytr, fte, yte)}
    if linear:
        out["linear"] = linear_probe(ftr, ytr, fte, yte).accuracy * 100
    return out


def run(seed: int, steps: int, overrides: list[str], data, linear: bool, root: Path) -> dict:
    cfg = demo_config(stage="image-dino", seed=seed, max_steps=steps)
    cfg.save_every = cfg.max_steps
    cfg.tensorboard = False
    apply_overrides(cfg, overrides)
    trainer = Trainer(cfg, root / f"seed{seed}")
    untrained = copy.deepcopy(trainer.model.dino.teacher.backbone)
    start = time.perf_counter()
    rows = trainer.fit()
    seconds = time.perf_counter() - start
    entropy = [r["metrics"]["teacher_entropy"] for r in rows]
    dims = [r["metrics"]["dims_in_use"] for r in rows]
    size = cfg.model.image.image_size
    return {"log_k": math.log(cfg.dino.out_dim), "entropy": entropy, "dims": dims, "seconds": seconds,
            "steps": cfg.max_steps, "untrained": probes(untrained, data, size, linear),
            "teacher": probes(trainer.model.dino.teacher.backbone, data, size, linear)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=DEMO_DINO_STEPS, help="the stage's steps")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a flava pretrain setting")
    ap.add_argument("--no-linear", dest="linear", action="store_false", help="the k-NN probe alone (faster)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = digits()
    root = Path(tempfile.mkdtemp(prefix="dino-demo-"))
    try:
        for seed in args.seeds:
            r = run(seed, args.steps, args.set, data, args.linear, root)
            e = r["entropy"]
            marks = sorted({0, 9, *range(24, len(e), 25), len(e) - 1})
            trace = "  ".join(f"{i + 1}:{e[i]:.2f}" for i in marks)
            last = float(np.mean(e[-10:]))
            print(f"seed {seed}: {r['steps']} steps in {r['seconds']:.0f} s; teacher entropy (log K = {r['log_k']:.2f}) "
                  f"{trace}; last 10 steps {last:.2f} ({last / r['log_k']:.0%} of log K); dims in use "
                  f"{100 * float(np.mean(r['dims'][-10:])):.1f} %", flush=True)
            for name in r["untrained"]:
                print(f"  digits {name}: untrained {r['untrained'][name]:.2f}, teacher {r['teacher'][name]:.2f} "
                      f"({r['teacher'][name] - r['untrained'][name]:+.2f})", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
