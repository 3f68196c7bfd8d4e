"""The pretraining loop: mixing, optimisation, metrics, and checkpoints that resume exactly.

Everything random is a function of (seed, step): which data kind a step trains on, each
sample's crop and masks (through the stream position), and the ITM negatives. A checkpoint
stores the model, heads, optimizer, scheduler, RNG and every process's stream positions, so a
run resumed from it repeats the uninterrupted run step for step.

Under torchrun the processes split each global batch into consecutive blocks, draw ITM
negatives over the global batch and average every loss over all processes' entries, so N
processes train exactly like one process with N times the batch.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..config import to_dict
from ..data.pipeline import BatchStream, SampleMaker, SampleSpec
from ..errors import CheckpointError, ConfigError, DataError
from ..losses import world
from ..model.layers import Block, Transformer
from ..pretraining import PretrainingModel, validate_objectives
from ..storage import load_codebook, read_checkpoint, replace_dir, write_checkpoint_files, write_json_atomic
from .config import TrainConfig
from .optim import build_optimizer, warmup_cosine

KINDS = ("pairs", "images", "text")
STAGE_KINDS = {"joint": KINDS, "text-mlm": ("text",), "image-mim": ("images",)}
STATE = "trainer_state.pt"
LATEST = "latest.json"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Parameters no step has used yet (e.g. poolers) have no AdamW state to restore.
FULL_OPTIM = StateDictOptions(full_state_dict=True, cpu_offload=True, strict=False)


def step_kind(seed: int, step: int, kinds: tuple[str, ...], probs: np.ndarray) -> str:
    """The data kind of `step`: the same on every process and after any restart."""
    return kinds[int(np.random.default_rng([seed, step, 7]).choice(len(kinds), p=probs))]


def build_sources(cfg: TrainConfig, kinds: tuple[str, ...]):
    from ..data import demo, hf, sources

    def pairs(spec: str):
        if hf.is_hf_spec(spec):
            return hf.hf_pairs(spec)
        return sources.csv_pairs(spec) if spec.lower().endswith((".csv", ".tsv")) else sources.tar_pairs(spec)

    def images(spec: str):
        return hf.hf_images(spec) if hf.is_hf_spec(spec) else sources.image_folder(spec)

    def text(spec: str):
        return hf.hf_text(spec) if hf.is_hf_spec(spec) else sources.text_file(spec)

    makers = {"pairs": pairs, "images": images, "text": text}
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but CUDA is not available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if name != "cpu":
        raise ConfigError(f"device {name!r} must be 'auto', 'cpu' or 'cuda'")
    return torch.device("cpu")


class Trainer:
    def __init__(self, cfg: TrainConfig, output: Path, log=None):
        if cfg.stage not in STAGE_KINDS:
            raise ConfigError(f"stage {cfg.stage!r} must be one of {', '.join(STAGE_KINDS)}")
        if cfg.precision not in PRECISIONS:
            raise ConfigError(f"precision {cfg.precision!r} must be one of {', '.join(PRECISIONS)}")
        if cfg.distributed not in ("ddp", "fsdp"):
            raise ConfigError(f"distributed {cfg.distributed!r} must be 'ddp' or 'fsdp'")
        validate_objectives(cfg.objectives)
        self.cfg, self.output = cfg, Path(output)
        self.rank, self.world = world()
        self.device = resolve_device(cfg.device)
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
            cfg.model = self.model.config  # the data pipeline must match the checkpoint's model
        else:
            self.model = PretrainingModel(cfg.model, cfg.objectives, codebook=codebook)
        self.initialised: dict[str, str] = {}
        if cfg.init_image or cfg.init_text or cfg.init_multimodal:
            from .init import initialise_encoders

            self.initialised = initialise_encoders(self.model, image=cfg.init_image, text=cfg.init_text,
                                                   multimodal=cfg.init_multimodal)
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
            k: BatchStream(k, src, maker, cfg.data.batch_size, seed=cfg.seed + 1000 * i, rank=self.rank,
                           world=self.world, num_workers=cfg.data.num_workers)
            for i, (k, src) in enumerate(self.sources.items())
        }

        self.model.to(self.device).train()
        for t in self.model.modules():
            if isinstance(t, Transformer):
                t.grad_checkpointing = cfg.activation_checkpointing
        if cfg.compile:
            for block in self.model.modules():
                if isinstance(block, Block):
                    block.compile(backend=cfg.compile_backend, dynamic=True)
        self.module = self._wrap()
        o = cfg.optim
        self.optimizer = build_optimizer(self.model, o.lr, o.weight_decay, (o.beta1, o.beta2), o.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(o.warmup_steps, cfg.max_steps, o.min_lr_ratio))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.step = 0
        self._writer = None

    def _wrap(self) -> torch.nn.Module:
        """The module the steps run through: the model itself, or its DDP/FSDP form."""
        if self.world == 1:
            return self.model
        if self.cfg.distributed == "fsdp":
            from torch.distributed.fsdp import fully_shard

            # Blocks, then what holds the rest; FlavaModel itself is not sharded because FSDP
            # cannot shard the scalar logit scale, whose gradient `_sync_replicated` averages.
            for m in list(self.model.modules()):
                if isinstance(m, Block):
                    fully_shard(m)
            # Units must be modules whose forward is called (the heads are called one by one).
            for m in [*self.model.model.children(), *self.model.heads.children()]:
                fully_shard(m)
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        # Each step trains one data kind, so every step leaves some parameters unused.
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=True)

    def _sync_replicated(self) -> None:
        """FSDP reduces the gradients of the parameters it shards; average the others'."""
        if self.world == 1 or self.cfg.distributed != "fsdp":
            return
        from torch.distributed.tensor import DTensor

        # A step trains one data kind on every process, so all agree on which grads are None
        # (and None must stay None: AdamW skips such a parameter instead of applying momentum).
        for p in self.model.parameters():
            if p.grad is not None and not isinstance(p, DTensor):
                dist.all_reduce(p.grad)
                p.grad /= self.world

    def _no_sync(self):
        """Skip the gradient all-reduce (accumulation micro-batches before the last)."""
        if self.world == 1:
            return contextlib.nullcontext()
        if self.cfg.distributed == "ddp":
            return self.module.no_sync()

        @contextlib.contextmanager
        def fsdp_no_sync():
            for m in (self.model.model, self.model.heads):
                m.set_requires_gradient_sync(False, recurse=True)
            try:
                yield
            finally:
                for m in (self.model.model, self.model.heads):
                    m.set_requires_gradient_sync(True, recurse=True)
        return fsdp_no_sync()

    def _autocast(self):
        dtype = PRECISIONS[self.cfg.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_dir(self) -> Path:
        return self.output / "checkpoints"

    def save(self) -> Path:
        """Write checkpoints/step_N atomically, point latest.json at it, keep the newest k.

        Every process takes part (weights may be sharded, each has its own stream positions);
        process 0 writes. A failed write leaves the previous checkpoint and latest.json as they
        were and stops the run with a CheckpointError on every process.
        """
        target = self.checkpoint_dir / f"step_{self.step:08d}"
        flat = get_model_state_dict(self.model, options=FULL)
        optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=FULL)
        streams = [{k: s.state() for k, s in self.streams.items()}]
        rng = [self._rng_state()]
        if self.world > 1:
            streams, rng = [None] * self.world, [None] * self.world
            dist.all_gather_object(streams, {k: s.state() for k, s in self.streams.items()})
            dist.all_gather_object(rng, self._rng_state())
        error = ""
        if self.rank == 0:
            parts: dict[str, dict] = {}
            for key, value in flat.items():
                part, name = key.split(".", 1)
                parts.setdefault(part, {})[name] = value
            state = {"step": self.step, "world": self.world, "optimizer": optimizer,
                     "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng}

            def fill(tmp: Path) -> None:
                write_checkpoint_files(tmp, self.model.config, parts,
                                       extra={"objectives": to_dict(self.model.objectives), "train": to_dict(self.cfg)})
                torch.save(state, tmp / STATE)
                write_json_atomic(tmp / "streams.json", streams)

            try:
                self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
                replace_dir(target, fill)
                write_json_atomic(self.checkpoint_dir / LATEST, {"step": self.step, "path": target.name})
            except OSError as e:
                error = f"could not write the checkpoint of step {self.step} to {target} ({e.strerror or e})"
            else:
                kept = sorted(p for p in self.checkpoint_dir.glob("step_*") if p.is_dir())
                for old in kept[: -self.cfg.keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
        if self.world > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            previous = self.checkpoint_dir / LATEST
            kept = json.loads(previous.read_text())["path"] if previous.is_file() else None
            raise CheckpointError(error + (f"; the previous checkpoint {kept} is intact: free space and resume with "
                                           "--resume" if kept else "; no earlier checkpoint exists"))
        return target

    def _rng_state(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def resume(self) -> bool:
        """Load the newest checkpoint, if any; returns whether one was found."""
        pointer = self.checkpoint_dir / LATEST
        if not pointer.is_file():
            return False
        target = self.checkpoint_dir / json.loads(pointer.read_text())["path"]
        ckpt = read_checkpoint(target)
        state = torch.load(target / STATE, map_location="cpu", weights_only=True)
        if int(state["world"]) != self.world:
            raise CheckpointError(
                f"{target} was written by {state['world']} processes and this run has {self.world}: the data "
                "split depends on the process count, so resume with the same number of processes")
        from ..storage import load_weights

        parts = {p: ckpt.parts.get(p) or {} for p in ("model", "heads", "codebook")
                 if getattr(self.model, p) is not None}
        if self.world == 1:  # checked loads: one clear error for any mismatch
            for part, sd in parts.items():
                load_weights(getattr(self.model, part), sd, part, target)
        else:  # weights may be sharded: the distributed-aware setter
            flat = {f"{part}.{k}": v for part, sd in parts.items() for k, v in sd.items()}
            set_model_state_dict(self.model, flat, options=FULL)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=FULL_OPTIM)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"][self.rank]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        for k, s in json.loads((target / "streams.json").read_text())[self.rank].items():
            self.streams[k].load_state(s)
        self.step = int(state["step"])
        # Steps logged after this checkpoint will be run again: drop their lines.
        metrics = self.output / "metrics.jsonl"
        if self.rank == 0 and metrics.is_file():
            kept = [line for line in metrics.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= self.step]
            tmp = metrics.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(metrics)
        return True

    # ------------------------------------------------------------------ loop

    def _stream_skips(self) -> Counter:
        mine: Counter = Counter()
        for s in self.streams.values():
            mine.update(s.skipped)
        return mine

    def skipped(self, everywhere: bool = False) -> dict[str, int]:
        """Records rejected by kind: at indexing, and by this process's streams — or, with
        `everywhere`, by every process's (a collective: every process must call it)."""
        per_process = [dict(self._stream_skips())]
        if everywhere and self.world > 1:
            per_process = [None] * self.world
            dist.all_gather_object(per_process, dict(self._stream_skips()))
        total: Counter = Counter()
        for src in self.sources.values():
            total.update(src.rejected)
        for counts in per_process:
            total.update(counts)
        return dict(total)

    def train_step(self) -> dict:
        cfg = self.cfg
        kind = step_kind(cfg.seed, self.step, self.kinds, self.probs)
        accum = cfg.optim.grad_accumulation
        sums, names, samples = None, [], 0
        for micro in range(accum):
            batch = self.streams[kind].next_batch().to(self.device)
            samples += len(batch)
            generator = torch.Generator(self.device).manual_seed(cfg.seed * 1_000_003 + self.step * 31 + micro)
            with self._no_sync() if micro < accum - 1 else contextlib.nullcontext():
                with self._autocast():
                    out = self.module(batch, generator)
                self.scaler.scale(out.losses.total / accum).backward()
            named = {**out.losses.named(), **{f"metric/{k}": v for k, v in out.metrics.items()}}
            names = list(named)
            values = torch.stack([out.losses.total.detach().float(), *(v.detach().float() for v in named.values())])
            sums = values / accum if sums is None else sums + values / accum
        self._sync_replicated()
        if self.world > 1:
            dist.all_reduce(sums)
            sums /= self.world
        if cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.model.clamp_logit_scale()
        self.step += 1
        values = sums.tolist()  # one device sync per step
        named = dict(zip(names, values[1:]))
        return {"step": self.step, "kind": kind, "loss": values[0],
                "losses": {k: v for k, v in named.items() if not k.startswith("metric/")},
                "metrics": {k[7:]: v for k, v in named.items() if k.startswith("metric/")},
                "samples": samples * self.world, "lr": self.scheduler.get_last_lr()[0],
                "data_position": {k: st.position for k, st in self.streams.items()}}

    def _tensorboard(self, row: dict) -> None:
        if not self.cfg.tensorboard:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed run wrote after the checkpoint it resumes from.
            self._writer = SummaryWriter(str(self.output / "tensorboard"), purge_step=row["step"])
        w, step = self._writer, row["step"]
        w.add_scalar("loss", row["loss"], step)
        for group in ("losses", "metrics", "skipped"):
            for k, v in row.get(group, {}).items():
                w.add_scalar(f"{group}/{k}", v, step)
        w.add_scalar("lr", row["lr"], step)
        w.add_scalar("samples_per_s", row["samples_per_s"], step)

    def fit(self, max_steps: int | None = None) -> list[dict]:
        end = min(self.cfg.max_steps, max_steps if max_steps is not None else self.cfg.max_steps)
        rows = []
        metrics_path = self.output / "metrics.jsonl"
        self.output.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        try:
            with open(metrics_path, "a") if self.rank == 0 else contextlib.nullcontext() as metrics:
                while self.step < end:
                    row = self.train_step()
                    row["samples_per_s"] = row["samples"] / max(1e-9, time.perf_counter() - start)
                    start = time.perf_counter()
                    rows.append(row)
                    if self.rank == 0 and (self.step % self.cfg.log_every == 0 or self.step == end):
                        row["skipped"] = self.skipped()
                        metrics.write(json.dumps(row) + "\n")
                        metrics.flush()
                        self._tensorboard(row)
                    self.log(row)
                    if self.step % self.cfg.save_every == 0 or self.step == self.cfg.max_steps:
                        self.save()
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        if self.rank == 0 and metrics_path.is_file():
            from .plots import plot_losses

            plot_losses(metrics_path, self.output / "loss_curves.png")
        return rows
