"""The pretraining loop: mixing, optimisation, metrics, and checkpoints that resume exactly.

Everything random is a function of (seed, step): which data kind a step trains on, each
sample's crop and masks (through the stream position), and the ITM negatives. A checkpoint
stores the model, heads, optimizer, scheduler, torch RNG and every stream's position, so a run
resumed from it repeats the uninterrupted run step for step.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..config import to_dict
from ..data.pipeline import BatchStream, SampleMaker, SampleSpec
from ..errors import ConfigError, DataError
from ..pretraining import PretrainingModel, validate_objectives
from ..storage import load_codebook, read_checkpoint, replace_dir, write_checkpoint_files, write_json_atomic
from .config import TrainConfig
from .optim import build_optimizer, warmup_cosine

KINDS = ("pairs", "images", "text")
STAGE_KINDS = {"joint": KINDS, "text-mlm": ("text",), "image-mim": ("images",)}
STATE = "trainer_state.pt"
LATEST = "latest.json"


def step_kind(seed: int, step: int, kinds: tuple[str, ...], probs: np.ndarray) -> str:
    """The data kind of `step`: the same on every process and after any restart."""
    return kinds[int(np.random.default_rng([seed, step, 7]).choice(len(kinds), p=probs))]


def build_sources(cfg: TrainConfig, kinds: tuple[str, ...]):
    from ..data import demo, sources

    def pairs(spec: str):
        return sources.csv_pairs(spec) if spec.lower().endswith((".csv", ".tsv")) else sources.tar_pairs(spec)

    makers = {"pairs": pairs, "images": sources.image_folder, "text": sources.text_file}
    defaults = {"pairs": demo.easy_vqa_pairs, "images": demo.demo_image_source, "text": demo.bbc_news_text}
    out = {}
    for kind in kinds:
        specs = getattr(cfg.data, kind)
        if specs:
            parts = [makers[kind](str(s)) for s in specs]
            src = parts[0]
            for extra in parts[1:]:
                src.records += extra.records
                src.rejected += extra.rejected
        else:
            src = defaults[kind]()
        if len(src) == 0:
            raise DataError(f"the {kind} data ({', '.join(map(str, specs)) or 'demo'}) holds no usable record")
        out[kind] = src
    return out


class Trainer:
    def __init__(self, cfg: TrainConfig, output: Path, rank: int = 0, world: int = 1, log=None):
        if cfg.stage not in STAGE_KINDS:
            raise ConfigError(f"stage {cfg.stage!r} must be one of {', '.join(STAGE_KINDS)}")
        validate_objectives(cfg.objectives)
        self.cfg, self.output, self.rank, self.world = cfg, Path(output), rank, world
        self.log = log or (lambda row: None)
        self.kinds = STAGE_KINDS[cfg.stage]
        probs = np.array([cfg.data.mixing[KINDS.index(k)] for k in self.kinds], dtype=float)
        if len(cfg.data.mixing) != 3 or probs.sum() <= 0 or (probs < 0).any():
            raise ConfigError("data.mixing needs three non-negative probabilities (pairs, images, text)")
        self.probs = probs / probs.sum()
        torch.manual_seed(cfg.seed)

        codebook = load_codebook(cfg.codebook) if cfg.codebook else None
        if cfg.init:
            from ..pretraining import pretraining_from_checkpoint

            self.model, _ = pretraining_from_checkpoint(read_checkpoint(cfg.init), cfg.objectives, codebook)
        else:
            self.model = PretrainingModel(cfg.model, cfg.objectives, codebook=codebook)
        self.model.train()
        if cfg.model.text.max_position_embeddings < cfg.data.max_text_length:
            raise ConfigError("data.max_text_length exceeds model.text.max_position_embeddings")

        self.sources = build_sources(cfg, self.kinds)
        spec = SampleSpec(
            image_size=cfg.model.image.image_size, codebook_image_size=cfg.model.codebook_image_size,
            grid=cfg.model.image.grid_size, max_text_length=cfg.data.max_text_length,
            image_mask_ratio=cfg.objectives.image_mask_ratio, text_mask_probability=cfg.objectives.text_mask_probability,
            whole_word=cfg.objectives.whole_word_masking, crop_scale=(cfg.data.crop_scale_min, 1.0),
        )
        maker = SampleMaker(spec, cfg.seed)
        self.streams = {
            k: BatchStream(k, src, maker, cfg.data.batch_size, seed=cfg.seed + 1000 * i, rank=rank, world=world,
                           num_workers=cfg.data.num_workers)
            for i, (k, src) in enumerate(self.sources.items())
        }
        o = cfg.optim
        self.optimizer = build_optimizer(self.model, o.lr, o.weight_decay, (o.beta1, o.beta2), o.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(o.warmup_steps, cfg.max_steps, o.min_lr_ratio))
        self.step = 0

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_dir(self) -> Path:
        return self.output / "checkpoints"

    def save(self) -> Path:
        """Write checkpoints/step_N atomically, point latest.json at it, keep the newest k."""
        target = self.checkpoint_dir / f"step_{self.step:08d}"
        parts = {"model": self.model.model, "heads": self.model.heads}
        if self.model.codebook is not None:
            parts["codebook"] = self.model.codebook
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        streams = {k: s.state() for k, s in self.streams.items()}

        def fill(tmp: Path) -> None:
            write_checkpoint_files(tmp, self.model.config, parts,
                                   extra={"objectives": to_dict(self.model.objectives), "train": to_dict(self.cfg)})
            torch.save(state, tmp / STATE)
            write_json_atomic(tmp / "streams.json", streams)

        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        replace_dir(target, fill)
        write_json_atomic(self.checkpoint_dir / LATEST, {"step": self.step, "path": target.name})
        kept = sorted(p for p in self.checkpoint_dir.glob("step_*") if p.is_dir())
        for old in kept[: -self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def resume(self) -> bool:
        """Load the newest checkpoint, if any; returns whether one was found."""
        pointer = self.checkpoint_dir / LATEST
        if not pointer.is_file():
            return False
        target = self.checkpoint_dir / json.loads(pointer.read_text())["path"]
        ckpt = read_checkpoint(target)
        from ..storage import load_weights

        load_weights(self.model.model, ckpt.parts["model"], "model", target)
        load_weights(self.model.heads, ckpt.parts["heads"], "heads", target)
        state = torch.load(target / STATE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        for k, s in json.loads((target / "streams.json").read_text()).items():
            self.streams[k].load_state(s)
        self.step = int(state["step"])
        # Steps logged after this checkpoint will be run again: drop their lines.
        metrics = self.output / "metrics.jsonl"
        if metrics.is_file():
            kept = [line for line in metrics.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= self.step]
            tmp = metrics.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(metrics)
        return True

    # ------------------------------------------------------------------ loop

    def skipped(self) -> dict[str, int]:
        total: Counter = Counter()
        for src in self.sources.values():
            total.update(src.rejected)
        for s in self.streams.values():
            total.update(s.skipped)
        return dict(total)

    def train_step(self) -> dict:
        cfg = self.cfg
        kind = step_kind(cfg.seed, self.step, self.kinds, self.probs)
        losses_sum: dict[str, float] = {}
        total = 0.0
        samples = 0
        for micro in range(cfg.optim.grad_accumulation):
            batch = self.streams[kind].next_batch()
            samples += len(batch)
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step * 31 + micro)
            out = self.model(batch, generator)
            (out.losses.total / cfg.optim.grad_accumulation).backward()
            total += out.losses.total.item() / cfg.optim.grad_accumulation
            for name, v in out.losses.named().items():
                losses_sum[name] = losses_sum.get(name, 0.0) + v.item() / cfg.optim.grad_accumulation
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.model.clamp_logit_scale()
        self.step += 1
        return {"step": self.step, "kind": kind, "loss": total, "losses": losses_sum, "samples": samples,
                "lr": self.scheduler.get_last_lr()[0]}

    def fit(self, max_steps: int | None = None) -> list[dict]:
        end = min(self.cfg.max_steps, max_steps if max_steps is not None else self.cfg.max_steps)
        rows = []
        metrics_path = self.output / "metrics.jsonl"
        self.output.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with metrics_path.open("a") as metrics:
            while self.step < end:
                row = self.train_step()
                row["samples_per_s"] = row["samples"] / max(1e-9, time.perf_counter() - start)
                start = time.perf_counter()
                rows.append(row)
                if self.rank == 0 and (self.step % self.cfg.log_every == 0 or self.step == end):
                    metrics.write(json.dumps({**row, "skipped": self.skipped()}) + "\n")
                    metrics.flush()
                self.log(row)
                if self.step % self.cfg.save_every == 0 or self.step == self.cfg.max_steps:
                    if self.rank == 0:
                        self.save()
        return rows
