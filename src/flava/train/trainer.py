"""The pretraining loop: mixing, optimisation, and the step.

Everything random is a function of (seed, step): which data kind a step trains on, each
sample's crop and masks (through the stream position), and the ITM negatives. Checkpoints
(`train.checkpoint`) store every process's stream state with the weights, so a resumed run
repeats the uninterrupted run step for step, also on another number of processes with the same
global batch; metrics go through `train.metrics`.

Under torchrun the processes split each global batch into consecutive blocks, draw ITM
negatives over the global batch and average every loss over all processes' entries, so N
processes train exactly like one process with N times the batch.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..config import check
from ..data.pipeline import MultiCropMaker, SampleMaker, SampleSpec
from ..data.registry import KINDS, open_stream
from ..data.shards import ShardCache
from ..distributed import world
from ..errors import ConfigError, DivergedError
from ..hub import load_codebook, pretraining_from_checkpoint, read_checkpoint
from ..io.runs import RunDir
from ..model.layers import Block
from ..objectives.pretraining import PretrainingModel
from ..objectives.dino import momentum_schedule
from ..objectives.registry import active
from ..optim import build_optimizer, warmup_cosine
from . import checkpoint, dino
from .config import TrainConfig
from .metrics import MetricsLog, plot_losses

STAGE_KINDS = {"joint": KINDS, "text-mlm": ("text",), "image-mim": ("images",), "image-dino": ("images",)}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def step_kind(seed: int, step: int, kinds: tuple[str, ...], probs: np.ndarray) -> str:
    """The data kind of `step`: the same on every process and after any restart."""
    return kinds[int(np.random.default_rng([seed, step, 7]).choice(len(kinds), p=probs))]


def resolve_device(name: str) -> torch.device:
    """This process's device for the `device` setting ('auto', 'cpu' or 'cuda')."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but CUDA is not available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def trained_kinds(cfg: TrainConfig) -> tuple[tuple[str, ...], list[str]]:
    """The data kinds a run trains on: its stage's, less those without data (the demo data
    stands in only when no data is named at all) or without an objective to train; and notes
    saying what was left out and why."""
    if len(cfg.data.mixing) != len(KINDS):
        raise ConfigError("data.mixing needs three non-negative probabilities (pairs, images, text); "
                          f"got {len(cfg.data.mixing)}")
    kinds, notes = list(STAGE_KINDS[cfg.stage]), []
    given = [k for k in KINDS if getattr(cfg.data, k)]
    if given:
        for k in [k for k in kinds if k not in given]:
            notes.append(f"no {k} data given (data.{k}): {k} steps are left out")
        kinds = [k for k in kinds if k in given]
    # DINO is the image-dino stage's one objective; the objectives' weights are the joint stages'.
    trained = {"images"} if cfg.stage == "image-dino" else {r.kind for r in active(cfg.objectives)}
    for k in [k for k in kinds if k not in trained]:
        notes.append(f"every objective on {k} has weight 0: {k} steps are left out")
    kinds = [k for k in kinds if k in trained]
    if not kinds:
        raise ConfigError(
            f"stage {cfg.stage} has nothing to train: it trains on {', '.join(STAGE_KINDS[cfg.stage])}, but "
            + ("; ".join(notes) or "no data is given") + ". Name data for it (data.pairs, data.images, "
            "data.text) or give its objectives a positive weight")
    return tuple(kinds), notes


class Trainer:
    def __init__(self, cfg: TrainConfig, output: Path, log=None):
        check(cfg)
        self.cfg, self.output, self.run = cfg, Path(output), RunDir(Path(output))
        self.rank, self.world = world()
        self.device = resolve_device(cfg.device)
        self.log = log or (lambda row: None)
        # notes: what the run decided that the user should read at the start (kinds left out).
        self.kinds, self.notes = trained_kinds(cfg)
        probs = np.array([cfg.data.mixing[KINDS.index(k)] for k in self.kinds], dtype=float)
        if probs.sum() <= 0:
            raise ConfigError(f"data.mixing gives the {', '.join(self.kinds)} data of stage {cfg.stage} no weight; "
                              "set data.mixing=[pairs, images, text] probabilities")
        self.probs = probs / probs.sum()
        self.nonfinite_steps = 0
        self._nonfinite_run: list[int] = []
        torch.manual_seed(cfg.seed)

        self.is_dino = cfg.stage == "image-dino"
        if self.is_dino:
            dino.check_stage(cfg)
        codebook = load_codebook(cfg.codebook) if cfg.codebook and not self.is_dino else None
        self.initialised: dict[str, str] = {}
        if self.is_dino:
            self.model, self.initialised = dino.build_stage(cfg)
        elif cfg.init:
            self.model, _ = pretraining_from_checkpoint(read_checkpoint(cfg.init), cfg.objectives, codebook)
            cfg.model = self.model.config  # the data pipeline must match the checkpoint's model
        else:
            self.model = PretrainingModel(cfg.model, cfg.objectives, codebook=codebook)
        if not self.is_dino and (cfg.init_image or cfg.init_text or cfg.init_multimodal):
            from .init import initialise_encoders

            self.initialised = initialise_encoders(self.model, image=cfg.init_image, text=cfg.init_text,
                                                   multimodal=cfg.init_multimodal)
        if cfg.model.text.max_position_embeddings < cfg.data.max_text_length:
            raise ConfigError("data.max_text_length exceeds model.text.max_position_embeddings")

        spec = SampleSpec.for_model(cfg.model, cfg.objectives, cfg.data.max_text_length, cfg.data.crop_scale_min)
        maker = MultiCropMaker(cfg.dino.crop_spec(cfg.model.image), cfg.seed) if self.is_dino else \
            SampleMaker(spec, cfg.seed)
        d = cfg.data
        cache = ShardCache(d.cache_dir, int(d.cache_limit_gb * 2**30)) if d.cache_dir else None
        self.streams = {
            k: open_stream(k, getattr(d, k), maker, d.batch_size, seed=cfg.seed + 1000 * KINDS.index(k),
                           rank=self.rank, world=self.world, num_workers=d.num_workers, lanes=d.lanes, cache=cache)
            for k in self.kinds
        }
        if not self.is_dino:
            self._check_prepared(self.model.codebook)

        self.model.to(self.device).train()
        stacks = [self.model.dino.student.backbone.transformer] if self.is_dino else self.model.model.block_stacks()
        for stack in stacks:
            stack.grad_checkpointing = cfg.activation_checkpointing
        if cfg.compile:
            for block in self.model.modules():
                if isinstance(block, Block):
                    block.compile(backend=cfg.compile_backend, dynamic=True)
        self.module = self._wrap()
        o = cfg.optim
        # A DINO stage trains its student alone: the teacher follows it by EMA.
        trained_module = self.model.dino.student if self.is_dino else self.model
        # Encoders initialised from unimodal stages may learn more slowly (optim.init_lr_scale).
        slow = () if self.is_dino else tuple(f"model.{name}_encoder." for name in self.initialised
                                               if name in o.init_lr_scaled)
        self.optimizer = build_optimizer(trained_module, o.lr, o.weight_decay, (o.beta1, o.beta2), o.eps,
                                         scaled=slow, scale=o.init_lr_scale)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(o.warmup_steps, cfg.max_steps, o.min_lr_ratio))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.step = 0
        if self.is_dino:
            self.steps_per_epoch = dino.steps_per_epoch(cfg.dino, self)
            self.teacher_momentum = momentum_schedule(cfg.dino.momentum_teacher, 1.0, cfg.max_steps)

    def _check_prepared(self, codebook) -> None:
        """Prepared shards carry image-token ids from one codebook: the run's must be that one
        (or none, when every source that needs targets is prepared)."""
        from ..objectives.registry import needs_image_tokens

        for kind, stream in self.streams.items():
            for s in stream.streams:
                info = s.source.prepared
                if info is None:
                    if codebook is None and needs_image_tokens(self.cfg.objectives, (kind,)):
                        raise ConfigError(
                            f"MIM/MMM need image tokens, but the {kind} data {s.source.name} has none precomputed and "
                            "no codebook is given: train one with `flava train-codebook --images ... --output CB` and "
                            "pass --set codebook=CB, make the shards with `flava prepare --codebook CB`, or set "
                            "objectives.mim_weight=0 and objectives.mmm_image_weight=0")
                    continue
                if codebook is not None and info.get("codebook") != codebook.fingerprint():
                    raise ConfigError(
                        f"{s.source.name} holds image tokens of another codebook ({info.get('codebook')}) than "
                        f"{self.cfg.codebook} ({codebook.fingerprint()}): train with that codebook or none")
                grid = int(info.get("grid", -1))
                if grid != self.cfg.model.image.grid_size:
                    raise ConfigError(f"{s.source.name} was prepared for a {grid}x{grid} patch grid; the model has "
                                      f"{self.cfg.model.image.grid_size}x{self.cfg.model.image.grid_size}")

    def _wrap(self) -> torch.nn.Module:
        """The module the steps run through: the model itself, or its DDP/FSDP form."""
        if self.is_dino:
            return dino.wrap_student(self)
        if self.world == 1:
            return self.model
        if self.cfg.distributed == "fsdp":
            from torch.distributed.fsdp import fully_shard

            # Blocks, then what holds the rest; FlavaModel itself is not sharded because FSDP
            # cannot shard the scalar logit scale, whose gradient `_sync_replicated` averages.
            for m in list(self.model.modules()):
                if isinstance(m, Block):
                    fully_shard(m)
            # Units must be modules whose forward is called (the heads are called one by one);
            # parameter holders without a forward (the sigmoid loss's temperature and bias) stay
            # replicated like the logit scale.
            for m in [*self.model.model.children(), *self.model.heads.children()]:
                if type(m).forward is not torch.nn.Module.forward:
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

    def save(self) -> Path:
        return checkpoint.save(self)

    def resume(self) -> bool:
        """Load the newest intact checkpoint, if any; returns whether one was found. What was
        passed over on the way (damaged checkpoints, leftovers) is added to `notes`."""
        notes = checkpoint.resume(self)
        if notes is not None:
            self.notes += notes + [n for _, _, s in self._batch_streams() for n in s.notes]
        if self.rank == 0:  # steps logged after the checkpoint (or before any) will run again
            MetricsLog(self.output, self.cfg.tensorboard).truncate_after(self.step)
        return notes is not None

    # ------------------------------------------------------------------ loop

    def _from_processes(self, mine, everywhere: bool) -> list:
        """[mine], or every process's value when `everywhere` (a collective then)."""
        if not everywhere or self.world == 1:
            return [mine]
        values = [None] * self.world
        dist.all_gather_object(values, mine)
        return values

    def _batch_streams(self):
        return [(k, i, s) for k, ks in self.streams.items() for i, s in enumerate(ks.streams)]

    def skipped(self, everywhere: bool = False) -> dict[str, int]:
        """Draws skipped by reason (a bad record drawn in three epochs counts three times), by this
        process's streams or, with `everywhere`, by every process's."""
        mine: Counter = Counter()
        for _, _, s in self._batch_streams():
            mine.update(s.skipped)
        total: Counter = Counter()
        for counts in self._from_processes(dict(mine), everywhere):
            total.update(counts)
        return dict(total)

    def bad_records(self, everywhere: bool = False) -> dict[str, int]:
        """Bad records by reason, each counted once however often it was drawn: those rejected when
        a source was listed or a shard indexed, and those this process's streams (or, with
        `everywhere`, any process's) found."""
        mine = ({(k, i, reason): indices for k, i, s in self._batch_streams() for reason, indices in s.bad.items()},
                {(k, i, shard): counts for k, i, s in self._batch_streams() for shard, counts in s.rejected.items()})
        union: dict[tuple, set[int]] = {}
        shards: dict[tuple, dict] = {}
        for bad, rejected in self._from_processes(mine, everywhere):
            for key, indices in bad.items():
                union.setdefault(key, set()).update(indices)
            shards.update(rejected)
        total: Counter = Counter()
        for _, _, s in self._batch_streams():
            total.update(s.source.listing_rejected)
        for counts in shards.values():
            total.update(counts)
        for (_, _, reason), indices in union.items():
            total[reason] += len(indices)
        return dict(total)

    def samples_by_source(self) -> dict[str, dict[str, int]]:
        """Samples drawn so far from each source, by kind (all processes)."""
        return {k: ks.samples_by_source for k, ks in self.streams.items()}

    def train_step(self) -> dict:
        if self.is_dino:
            return dino.train_step(self)
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
        self.scaler.unscale_(self.optimizer)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        values = torch.cat([sums, norm.detach().float().reshape(1).to(sums.device)]).tolist()  # one sync a step
        # fp16's loss scaler skips overflowing steps itself; anything else non-finite is divergence.
        finite = math.isfinite(values[0]) and (math.isfinite(values[-1]) or self.scaler.is_enabled())
        if finite:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if finite:
            self.model.model.clamp_logit_scale()
        self.step += 1
        self._guard(finite)
        named = dict(zip(names, values[1:-1]))
        return {"step": self.step, "kind": kind, "loss": values[0],
                "losses": {k: v for k, v in named.items() if not k.startswith("metric/")},
                "metrics": {k[7:]: v for k, v in named.items() if k.startswith("metric/")},
                "grad_norm": values[-1], "update_skipped": not finite, "nonfinite_steps": self.nonfinite_steps,
                "samples": samples * self.world, "lr": self.scheduler.get_last_lr()[0],
                "data_draws": {k: st.draws for k, st in self.streams.items()}}

    def _guard(self, finite: bool) -> None:
        """Count steps whose update was skipped for a non-finite loss or gradient."""
        if finite:
            self._nonfinite_run = []
        else:
            self.nonfinite_steps += 1
            self._nonfinite_run.append(self.step)

    def _check_divergence(self) -> None:
        """Stop the run when `max_nonfinite_steps` updates in a row were skipped."""
        if len(self._nonfinite_run) >= self.cfg.max_nonfinite_steps:
            latest = self.run.intact_pointer()
            raise DivergedError(
                f"the loss or its gradients were not finite at steps {self._nonfinite_run[0]}-{self._nonfinite_run[-1]} "
                f"({len(self._nonfinite_run)} in a row; their updates were skipped), so the run stopped. "
                + (f"The newest checkpoint, {latest}, holds finite weights: " if latest else "")
                + f"lower optim.lr (now {self.cfg.optim.lr:g}) or clip harder (optim.grad_clip) and "
                + ("resume with --resume --override" if latest else "start again"))

    def fit(self, max_steps: int | None = None) -> list[dict]:
        end = min(self.cfg.max_steps, max_steps if max_steps is not None else self.cfg.max_steps)
        rows = []
        log = MetricsLog(self.output, self.cfg.tensorboard)
        start = time.perf_counter()
        with log if self.rank == 0 else contextlib.nullcontext():
            while self.step < end:
                row = self.train_step()
                row["samples_per_s"] = row["samples"] / max(1e-9, time.perf_counter() - start)
                start = time.perf_counter()
                rows.append(row)
                if self.rank == 0 and (self.step % self.cfg.log_every == 0 or self.step == end):
                    row["skipped"], row["bad_records"] = self.skipped(), self.bad_records()
                    row["samples_by_source"] = self.samples_by_source()
                    log.write(row)
                self.log(row)
                self._check_divergence()
                if self.step % self.cfg.save_every == 0 or self.step == self.cfg.max_steps:
                    self.save()
        if self.rank == 0 and log.path.is_file():
            plot_losses(log.path, self.output / "loss_curves.png")
        return rows
