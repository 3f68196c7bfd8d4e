"""The training loop, once for every stage: data, autocast, accumulation, clipping, the
non-finite guard, logging and checkpoints.

What differs between stages (their modules, wrapping, forward, what follows an update, their
extra state) is a `train.stage.Stage`; `train.kinds.STAGES` names the built-in ones. Everything random is a
function of (seed, step): which data kind a step trains on, each sample's crop and masks
(through the stream position), and the ITM negatives. Checkpoints (`train.checkpoint`) store
every process's stream state with the weights, so a resumed run repeats the uninterrupted run
step for step, also on another number of processes with the same global batch; metrics go
through `train.metrics`.

Under torchrun the processes split each global batch into consecutive blocks, draw ITM
negatives over the global batch and average every loss over all processes' entries, so N
processes train exactly like one process with N times the batch.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import stopping
from ..config import check, check_rgb
from ..objectives.pretraining import TARGETS
from ..objectives.registry import active
from ..data.pipeline import auto_workers
from ..data.registry import KINDS, open_stream
from ..data.shards import ShardCache, check_cache_dir
from ..distributed import max_over_processes, resolve_device, world
from ..errors import ConfigError, DataError, DivergedError, saved_before
from ..io.runs import RunDir
from ..model.layers import Block
from ..optim import build_optimizer, set_weight_decay, warmup_cosine
from .accounting import DataAccounting
from .backward import check_chunks, micro_seed, micro_step
from .balancing import METHODS
from .balancing.mixing import KindMixing
from .checkpoint import CheckpointManager, Stateful, TrainState
from .config import TrainConfig
from .kinds import STAGES, step_kind, trained_kinds
from .metrics import MetricsLog, plot_losses
from .init import check_text_length
from .stage import Stage

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_mixing(cfg: TrainConfig) -> None:
    """data.mixing_end goes with the linear schedule, and that schedule needs it."""
    linear = cfg.data.mixing_schedule == "linear"
    if cfg.data.mixing_end and not linear:  # set, and read by the 'linear' schedule alone
        raise ConfigError(f"data.mixing_end is read by data.mixing_schedule='linear' alone (here "
                          f"{cfg.data.mixing_schedule!r}): set the schedule too, or drop mixing_end")
    if linear and len(cfg.data.mixing_end or []) != len(KINDS):
        raise ConfigError("data.mixing_schedule='linear' needs data.mixing_end: three non-negative "
                          f"probabilities (pairs, images, text); got {len(cfg.data.mixing_end or [])}")


def mixing_of(cfg: TrainConfig, kinds: tuple[str, ...], key: str, notes: list[str] | None = None,
              mixing: list[float] | None = None) -> np.ndarray:
    """The trained kinds' probabilities from setting data.`key` (`mixing`, else the setting's own
    [pairs, images, text]), normalised, with a note in `notes` where it does not sum to 1."""
    mixing = getattr(cfg.data, key) if mixing is None else mixing
    probs = np.array([mixing[KINDS.index(k)] for k in kinds], dtype=float)
    if probs.sum() <= 0:
        raise ConfigError(f"data.{key} gives the {', '.join(kinds)} data of stage {cfg.stage} no "
                          f"weight; set data.{key}=[pairs, images, text] probabilities")
    if notes is not None and abs(sum(mixing) - 1) > 1e-6:
        notes.append(f"data.{key}={list(mixing)} sums to {sum(mixing):g}: taken as proportions, "
                     + ", ".join(f"{k} {p:.2f}" for k, p in zip(kinds, probs / probs.sum())))
    return probs / probs.sum()


def lost_peer(e: RuntimeError) -> bool:
    """Whether a collective failed because another process of the run went away."""
    text = str(e)
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        s in text for s in ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL error"))


def check_stage(cfg: TrainConfig) -> None:
    """What a run of `cfg` refuses at its start that its settings alone decide (its stage's data
    kinds and their mixing, its chunks), without building or reading anything: a recipe checks
    every stage so before the first trains."""
    stage = STAGES[cfg.stage](cfg)
    kinds, _ = trained_kinds(cfg, stage)
    check_chunks(cfg, stage)
    check_mixing(cfg)
    mixing_of(cfg, kinds, "mixing")
    if cfg.data.mixing_schedule == "linear":
        mixing_of(cfg, kinds, "mixing_end")


_ADAPTIVE = "data.mixing_schedule='adaptive'"
# Settings one choice alone reads: (setting, whether this run reads it, the choice).
_READ_BY = (
    ("objectives.dwa_temperature", lambda c: c.objectives.balancing == "dwa", "objectives.balancing='dwa'"),
    ("objectives.dwa_window", lambda c: c.objectives.balancing == "dwa", "objectives.balancing='dwa'"),
    ("objectives.uncertainty_lr", lambda c: c.objectives.balancing == "uncertainty",
     "objectives.balancing='uncertainty'"),
    ("objectives.itm_negative_probability", lambda c: c.objectives.itm_negatives == "swap",
     "objectives.itm_negatives='swap'"),
    ("data.mixing_window", lambda c: c.data.mixing_schedule == "adaptive", _ADAPTIVE),
    ("data.mixing_temperature", lambda c: c.data.mixing_schedule == "adaptive", _ADAPTIVE),
)


def unread_settings(cfg: TrainConfig, kinds: tuple[str, ...]) -> list[str]:
    """Notes on settings this run leaves unread (set for a method it does not use) and on methods
    that cannot act in it. Notes, not refusals: an ablation's --set reaches every method's run."""
    notes = []
    for key, reads, by in _READ_BY:
        section, name = key.split(".")
        value, default = getattr(getattr(cfg, section), name), getattr(type(getattr(cfg, section))(), name)
        if value != default and not reads(cfg):
            notes.append(f"{key}={value:g} is read by {by} alone: it does nothing in this run")
    o, d = cfg.objectives, cfg.data
    if cfg.stage in ("joint", "text-mlm", "image-mim"):
        trained = [r.name for r in active(o, kinds)]
        if o.balancing != "fixed" and len(trained) == 1:
            notes.append(f"objectives.balancing={o.balancing!r} has one objective ({trained[0]}) to balance in "
                         "this run: it trains as 'fixed' does")
    if o.balancing == "dwa" and cfg.max_steps <= 2 * o.dwa_window:
        notes.append(f"objectives.balancing='dwa' keeps every weight at 1 for two windows of dwa_window="
                     f"{o.dwa_window} steps, to the end of this {cfg.max_steps}-step run: set a smaller "
                     "objectives.dwa_window")
    # Only kinds data.mixing gives a share adapt (a zero share stays 0).
    shared = [k for k in kinds if len(d.mixing) != len(KINDS) or d.mixing[KINDS.index(k)] > 0]
    if d.mixing_schedule == "adaptive" and len(kinds) == 1:
        notes.append(f"{_ADAPTIVE} has one data kind to mix: it trains as 'constant' does")
    elif d.mixing_schedule == "adaptive" and len(shared) == 1:
        notes.append(f"{_ADAPTIVE} has one data kind that data.mixing gives a share ({shared[0]}), which keeps "
                     "all the steps: it trains as 'constant' does")
    elif d.mixing_schedule == "adaptive" and cfg.max_steps <= 2 * d.mixing_window:
        notes.append(f"{_ADAPTIVE} keeps data.mixing for two windows of mixing_window={d.mixing_window} steps, "
                     f"to the end of this {cfg.max_steps}-step run: set a smaller data.mixing_window")
    return notes


# Notes about the machine, said once a process (a recipe or an ablation builds a trainer a stage).
_SAID: set[str] = set()


def _cpu_multiplies_bf16() -> bool:
    """Whether the CPU has AMX's bfloat16 tiles (Linux's flags; torch says nothing of AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:
        return False


DATA_FAILED = 256
"""What a process whose draw failed gives the others after it (`Trainer._draw_agreed`): above any signal."""


class Trainer:
    """One run of one stage: `fit()` trains to `max_steps`, `resume()` continues a stopped run."""

    def __init__(self, cfg: TrainConfig, output: Path, log=None, stage: Stage | None = None, resume: bool = False):
        """`resume`: the run continues from its newest checkpoint (`resume()` loads it), which the
        model is built from: nothing the run was started from (init=, a codebook) is read again."""
        check(cfg)
        self.cfg, self.output, self.run = cfg, Path(output), RunDir(Path(output))
        self.rank, self.world = world()
        self.device = resolve_device(cfg.device)
        self.log = log or (lambda row: None)
        self.stage = stage or STAGES[cfg.stage](cfg)
        # notes: what the run decided that the user should read at the start (kinds left out).
        self.kinds, self.notes = trained_kinds(cfg, self.stage)
        if self.device.type == "cpu" and cfg.precision == "fp32" and "amx" not in _SAID and _cpu_multiplies_bf16():
            _SAID.add("amx")
            self.notes.append("this CPU multiplies bfloat16 in hardware (AMX): --set precision=bf16 ran the small "
                              "preset's step 1.9x faster than float32 on such a CPU (BENCHMARKS.md)")
        check_chunks(cfg, self.stage)
        check_mixing(cfg)
        linear = cfg.data.mixing_schedule == "linear"
        end = cfg.data.mixing_end if linear else cfg.data.mixing
        self.mixing = KindMixing(self.kinds, mixing_of(cfg, self.kinds, "mixing", self.notes),
                                 mixing_of(cfg, self.kinds, "mixing_end", self.notes if linear else None, end),
                                 cfg.data, cfg.max_steps, self.device)
        self.progress = TrainState()
        self._pending: list[tuple[dict, torch.Tensor, tuple]] = []
        """Steps whose numbers are still on the device: (row, values, names)."""
        self._extra: list[dict] = []
        self._targets_at: dict[tuple, torch.Tensor] = {}
        """By a step's loss and metric names: where each loss's target count is in its numbers."""
        self.synced: list[dict] = []
        """The rows the latest synced step filled in."""
        self._saved_at = 0
        """The step of the newest checkpoint this run wrote or resumed from."""
        self.stopped = 0
        """The signal that stopped `fit` at a step boundary (after saving it), 0 if none did."""
        torch.manual_seed(cfg.seed)
        self.checkpoints = CheckpointManager(self.run, cfg.keep_last, self.rank, self.world, self.device,
                                             cfg.keep_every)
        self._chosen = self.checkpoints.choose() if resume else None

        check_rgb(cfg.model, "model.")
        # A stage whose build takes no checkpoint builds as at its start (reading its sources).
        takes_own = "own" in inspect.signature(self.stage.build).parameters
        self.initialised = self.stage.build(self._chosen.ckpt) if self._chosen and takes_own else self.stage.build()
        self.model = self.stage.model
        check_text_length(cfg.data.max_text_length, cfg.model.text.max_length, cfg.init_text)
        maker = self.stage.sample_maker()
        d = cfg.data
        if d.cache_dir:
            check_cache_dir(d.cache_dir)
        cache = ShardCache(d.cache_dir, int(d.cache_limit_gb * 2**30)) if d.cache_dir else None
        workers = self._loader_workers()
        self.streams = {
            k: open_stream(k, getattr(d, k), maker, d.batch_size, seed=cfg.seed + 1000 * KINDS.index(k),
                           rank=self.rank, world=self.world, num_workers=d.num_workers or 0, lanes=d.lanes, cache=cache,
                           outage_s=d.outage_minutes * 60, kind_workers=workers.get(k))
            for k in self.kinds
        }
        self.data = DataAccounting(self.streams, self.world)
        # Its checks name a mismatch before a probe meets it.
        self.notes += self.stage.open_data(self.streams, self.world) or []
        for kind_stream in self.streams.values():
            for stream in kind_stream.streams:
                stream.probe()

        self.model.to(self.device).train()
        for stack in self.stage.block_stacks():
            stack.grad_checkpointing = cfg.activation_checkpointing
        if cfg.compile:
            for block in self.model.modules():
                if isinstance(block, Block):
                    block.compile(backend=cfg.compile_backend, dynamic=True)
        self.module = self.stage.wrap(self.world, self.device)
        self._balancing()
        self.notes += unread_settings(cfg, self.kinds)
        o = cfg.optim
        # The rate and warm-up the run trains with: as set, or scaled to its global batch.
        self.optimisation = self.stage.optimisation(self.global_batch)
        trained, slow = self.stage.optimized()
        self.optimizer = build_optimizer(trained, self.optimisation.lr, self.stage.weight_decay(0), (o.beta1, o.beta2),
                                         o.eps, scaled=slow, scale=o.init_lr_scale)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.optimisation.warmup_steps, cfg.max_steps, o.min_lr_ratio))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")

    def _balancing(self) -> None:
        """The balancing method (`objectives.balancing`) and the shared encoders the gradient
        diagnostics and surgery look at."""
        o = self.cfg.objectives
        names = self.stage.objective_names()
        if o.balancing != "fixed" and not names:
            raise ConfigError(f"objectives.balancing={o.balancing!r} weights a stage's objectives, and stage "
                              f"{self.cfg.stage} has none to balance: use 'fixed'")
        self.balancer = METHODS[o.balancing](names, o, self.device)
        self.shared = {k: ps for k, ps in self.stage.shared_parameters().items() if ps}
        if self.balancer.surgery and not self.shared:
            raise ConfigError(f"objectives.balancing={o.balancing!r} needs each objective's whole gradient on the "
                              "shared encoders, which FSDP shards: use distributed=ddp or another method")
        if names and not self.shared and self.world > 1:
            self.notes.append("the gradient diagnostics are off: FSDP shards the encoders' gradients")

    def _loader_workers(self) -> dict[str, int]:
        """Without data.num_workers, each kind's loader workers, shared by its sources: one a kind
        on the CPU; on a GPU `auto_workers` (said). Empty when data.num_workers sets each source's."""
        if self.cfg.data.num_workers is not None:
            return {}
        if self.device.type == "cpu":
            return {k: 1 for k in self.kinds}
        workers = auto_workers(dict(zip(self.kinds, mixing_of(self.cfg, self.kinds, "mixing"))))
        self.notes.append("loader workers per process: " + ", ".join(f"{k} {n}" for k, n in workers.items())
                          + " (from the cores and the kinds' shares of the steps, shared by each kind's sources; "
                            "data.num_workers sets each source's)")
        return workers

    def probs_at(self, step: int) -> np.ndarray:
        """The kinds' probabilities at `step` (`data.mixing_schedule`)."""
        return self.mixing.probs_at(step)

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over every process."""
        return self.cfg.data.batch_size * self.world * self.cfg.optim.grad_accumulation

    @property
    def step(self) -> int:
        return self.progress.step

    @step.setter
    def step(self, value: int) -> None:
        self.progress.step = value

    @property
    def nonfinite_steps(self) -> int:
        return self.progress.nonfinite_steps

    def autocast(self):
        """The forward's precision (`precision`); LayerNorms and losses keep float32 themselves."""
        dtype = PRECISIONS[self.cfg.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _no_sync(self):
        """Skip the gradient all-reduce (accumulation micro-batches before the last)."""
        if self.world == 1:
            return contextlib.nullcontext()
        if hasattr(self.module, "no_sync"):  # DDP
            return self.module.no_sync()
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in self.model.modules() if isinstance(m, FSDPModule)]

        @contextlib.contextmanager
        def fsdp_no_sync():
            for m in units:
                m.set_requires_gradient_sync(False, recurse=False)
            try:
                yield
            finally:
                for m in units:
                    m.set_requires_gradient_sync(True, recurse=False)
        return fsdp_no_sync()

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

    # ------------------------------------------------------------------ checkpoints

    def _stateful(self) -> Stateful:
        return Stateful(self.model, self.optimizer, self.scheduler, self.scaler, self.streams, self.progress,
                        self.stage, self.cfg, self.balancer, self.mixing)

    def save(self) -> Path:
        self._saved_at = self.step
        target = self.checkpoints.save(self._stateful())
        stopping.saved(target)
        return target

    def resume(self) -> bool:
        """Load the newest intact checkpoint, if any; returns whether one was found. What was
        passed over on the way (damaged checkpoints, leftovers) is added to `notes`."""
        notes = self.checkpoints.resume(self._stateful(), self._chosen)
        self._chosen = None  # its weights and optimizer state are the model's now
        self._saved_at = self.step
        if notes is not None:
            stopping.saved(self.run.step(self.step))
            self.notes += notes + self.data.notes()
        if self.rank == 0:  # steps logged after the checkpoint (or before any) will run again
            MetricsLog(self.output, self.cfg.tensorboard).truncate_after(self.step)
        return notes is not None

    def skipped(self, everywhere: bool = False) -> dict[str, int]:
        return self.data.skipped(everywhere)

    def bad_records(self, everywhere: bool = False) -> dict[str, int]:
        return self.data.bad_records(everywhere)

    def bad_records_where(self, everywhere: bool = False) -> tuple[dict[str, int], dict[str, str]]:
        return self.data.bad_records_where(everywhere)

    def samples_by_source(self) -> dict[str, dict[str, int]]:
        return self.data.samples_by_source()

    # ------------------------------------------------------------------ the step

    def train_step(self, sync: bool = True, diagnose: bool = False) -> dict:
        """Forward and backward of each micro-batch of one data kind (`train.backward`: whole or
        in chunks), then the update. With `sync` the row holds its numbers (and those of the steps
        before it that had none); without, the step leaves the host free to run ahead of the
        device and its numbers come later. With `diagnose` (a logged step, every `diagnose_every`)
        the row also holds the objectives' gradient norms and cosines on the shared encoders,
        measured on the last micro-batch."""
        cfg, step = self.cfg, self.step
        kind = step_kind(cfg.seed, step, self.kinds, self.probs_at(step))
        accum = cfg.optim.grad_accumulation
        sums, names, samples, gradients = None, ([], []), 0, None
        # A process may give up awaiting a batch on a stop request (a stalled read, a store's outage;
        # `_abandoned`), or save the steps done when its data fails (`_kept`, one process). Past the
        # first micro-batch the step is undone first: its draws and random numbers. Under torchrun
        # the processes agree after each draw whether one gave up (`_draw_agreed`): the others would
        # wait for it in the step's collectives, past any grace, and all save the step before.
        undo = self._undo_point(kind, accum > 1) if accum > 1 or self.world > 1 else None
        for micro in range(accum):
            try:
                with stopping.abandonable():
                    batch = self.streams[kind].next_batch()  # on the host: micro_step moves it, whole or in chunks
            except (stopping.Abandoned, DataError) as e:
                if self.world > 1:
                    self._draw_agreed(e.signum if isinstance(e, stopping.Abandoned) else DATA_FAILED)
                if micro:
                    undo()
                raise
            if self.world > 1 and (agreed := self._draw_agreed(0)):
                undo()  # this process drew: another gave up, or its data failed
                if agreed == DATA_FAILED:
                    raise DataError(f"another process's data failed at step {step + 1} (its own message says how)")
                raise stopping.Abandoned(agreed)
            samples += len(batch)
            generator = torch.Generator(self.device).manual_seed(micro_seed(cfg.seed, step, micro, accum))
            values, names, report = micro_step(self, batch, generator, step, micro, diagnose and micro == accum - 1)
            gradients = report if report is not None else gradients
            sums = values / accum if sums is None else sums + values / accum
        row = {"step": step + 1, "kind": kind, "samples": samples * self.world,
               "lr": self.scheduler.get_last_lr()[0], "data_draws": {k: st.draws for k, st in self.streams.items()}}
        if cfg.data.mixing_schedule != "constant":
            row["mixing"] = {k: round(float(p), 6) for k, p in zip(self.kinds, self.probs_at(step))}
        if gradients is not None:
            row["gradients"] = gradients
        numbers = self._update(sums, names)
        # The losses averaged over micro-batches and processes: the same on every process.
        updated = numbers[-1] > 0
        if self.balancer.learns or self.mixing.mode == "adaptive":  # else nothing reads the losses: no work
            measured = self._measured(numbers, names)
            self.balancer.observe(step, dict(zip(names[0], numbers[1:1 + len(names[0])])), updated, measured)
            # The kind's progress: its configured losses' sum, whatever the balancing method scales; a
            # step missing one of them (nothing masked) would read as progress.
            self.mixing.observe(step, kind, numbers[1:1 + len(names[0])].sum(), updated & measured.all())
        self._pending.append((row, numbers, names))
        if sync:
            self.synced = self._settle()
        return row

    def _draw_agreed(self, gave_up: int) -> int:
        """DATA_FAILED when any process's draw failed, else the signal any gave up its draw on (0:
        none), over the host's group."""
        return max_over_processes(gave_up, self.device)

    def _undo_point(self, kind: str, micro_batches: bool):
        """A function that puts the step's stream of `kind` back as it is now (before the step's
        first micro-batch); with `micro_batches` (a step of several, whose earlier ones ran) the
        random generators and the gradients too. Before a step's first forward they are untouched:
        every step of a torchrun run takes this point, so it copies nothing it need not."""
        stream = self.streams[kind].snapshot()
        rng = torch.get_rng_state() if micro_batches else None
        device_rng = torch.cuda.get_rng_state(self.device) if micro_batches and self.device.type == "cuda" else None

        def undo() -> None:
            self.streams[kind].restore(stream)
            if rng is not None:
                torch.set_rng_state(rng)
                self.optimizer.zero_grad(set_to_none=True)
            if device_rng is not None:
                torch.cuda.set_rng_state(device_rng, self.device)

        return undo

    def _measured(self, numbers: torch.Tensor, names: tuple[list[str], list[str]]) -> torch.Tensor:
        """[losses] whether each of the step's losses measured anything: a masked objective over no
        targets on any process (a short caption's MMM-text) reads 0, which is no loss of 0. Read on
        the device through an index made once per kind (no host-device sync)."""
        key = (tuple(names[0]), tuple(names[1]))
        if key not in self._targets_at:
            n = len(names[0])
            at = [1 + n + names[1].index(TARGETS + k) if TARGETS + k in names[1] else -1 for k in names[0]]
            self._targets_at[key] = torch.tensor(at, device=numbers.device)
        at = self._targets_at[key]
        return (at < 0) | (numbers[at.clamp(min=0)] > 0)

    def _to_device(self, batch):
        """A host batch on the device: pinned and copied without blocking on CUDA (the copy
        overlaps the host's next work), uint8 pixels normalised there by the model's statistics."""
        stats = dict(mean=self.cfg.model.image.image_mean, std=self.cfg.model.image.image_std)
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True, **stats)
        return batch.to(self.device, **stats)

    def _update(self, sums: torch.Tensor, names: tuple[list[str], list[str]]) -> torch.Tensor:
        """The step's tail: average over processes, clip, the update unless something is not
        finite or no loss measured anything, the stage's after-update. Returns the step's numbers on
        the device: [total, losses..., metrics..., grad norm, finite, updated] (fp16's scaler may
        skip a finite step's update on an overflow). The fused AdamW skips a non-finite update on
        the device itself (its `found_inf`), so the step needs no host-device sync; fp16's loss
        scaler, which decides on the host, and stages that must know (DINO's EMA) sync."""
        step = self.step
        self._sync_replicated()
        if self.world > 1:
            dist.all_reduce(sums)
            sums /= self.world
        self.scaler.unscale_(self.optimizer)
        norm = self.stage.clip()
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        norm = norm.detach().float().reshape(1).to(sums.device)
        self.stage.before_update(step)
        set_weight_decay(self.optimizer, self.stage.weight_decay(step))
        # fp16's loss scaler skips overflowing steps itself; anything else non-finite is divergence.
        finite = torch.isfinite(sums[0]) & (torch.isfinite(norm[0]) | self.scaler.is_enabled())
        # A step whose every loss measured nothing (no token masked on any process: read from the
        # averaged sums, so every process decides alike) has no gradient to learn from: its update is
        # skipped, not made of the optimizer's momentum and weight decay alone.
        measured = self._measured(sums, names)
        go = finite & measured.any() if measured.numel() else finite
        if self.scaler.is_enabled() or not self.optimizer.defaults.get("fused"):
            if bool(go):
                self.scaler.step(self.optimizer)
        else:
            self.optimizer.found_inf = (~go).float()
            self.optimizer.step()
        updated = go
        if self.scaler.is_enabled():  # fp16 syncs here anyway
            scale = self.scaler.get_scale()
            self.scaler.update()
            # An overflow the scaler skipped is no update, though no divergence either: the scale adapts.
            updated = go & (self.scaler.get_scale() >= scale)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._extra.append(self.stage.after_update(step, updated))
        self.progress.step += 1
        return torch.cat([sums, norm, finite.float().reshape(1), updated.float().reshape(1)])

    def _settle(self) -> list[dict]:
        """Fill in the rows of the steps that have not synced (one host-device sync for all of
        them) and count their skipped updates; returns those rows, oldest first."""
        pending, extras = self._pending, self._extra
        self._pending, self._extra = [], []
        # One read for every pending step; steps of different kinds hold different numbers of values.
        flat = torch.cat([v for _, v, _ in pending]).tolist() if pending else []
        bounds = np.cumsum([0] + [len(v) for _, v, _ in pending])
        values = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        for (row, _, (losses, metrics)), v, extra in zip(pending, values, extras):
            n = len(losses)
            named = dict(zip(metrics, v[1 + n:-3]))
            targets = {k.removeprefix(TARGETS): named.pop(k) for k in list(named) if k.startswith(TARGETS)}
            # A loss over no targets (no token masked on any process) reads 0 and measures nothing: left out.
            measured = {k: x for k, x in zip(losses, v[1:1 + n]) if targets.get(k) != 0}
            # A step of nothing measured has no loss (None), not one of 0 (its update was skipped).
            row.update({"loss": v[0] if measured or not losses else None, "losses": measured,
                        "metrics": {**named, **extra}, "grad_norm": v[-3], "update_skipped": not v[-1] > 0})
            self._guard(v[-2] > 0, row["step"])
            row["nonfinite_steps"] = self.nonfinite_steps
        return [row for row, _, _ in pending]

    def _guard(self, finite: bool, step: int) -> None:
        """Count steps whose update was skipped for a non-finite loss or gradient."""
        if finite:
            self.progress.nonfinite_run = []
        else:
            self.progress.nonfinite_steps += 1
            self.progress.nonfinite_run.append(step)

    def _check_divergence(self) -> None:
        """Stop the run when `max_nonfinite_steps` updates in a row were skipped."""
        streak = self.progress.nonfinite_run
        if len(streak) >= self.cfg.max_nonfinite_steps:
            latest = self.run.intact_pointer()
            # Weights that a balancing method drove to infinity or 0 make every loss so: no rate helps.
            blamed = self.balancer.unusable()
            raise DivergedError(
                f"the loss or its gradients were not finite at steps {streak[0]}-{streak[-1]} "
                f"({len(streak)} in a row; their updates were skipped), so the run stopped. "
                + (f"{blamed}, and start again" if blamed else
                   (f"The newest checkpoint, {latest}, holds finite weights: " if latest else "")
                   + f"lower optim.lr (now {self.cfg.optim.lr:g}) or clip harder (optim.grad_clip) and "
                   + ("resume with --resume --override" if latest else "start again")))

    def _diagnosed(self, n: int, end: int) -> bool:
        """Whether logged step `n` measures the gradient diagnostics: the first logged step at or
        after each multiple of `diagnose_every`, and the run's last."""
        k = self.cfg.diagnose_every
        return k > 0 and (n == end or n // k != (n - self.cfg.log_every) // k)

    def fit(self, max_steps: int | None = None, keep_rows: bool = True) -> list[dict]:
        """Train to `max_steps` (default: the config's); the steps' rows, unless not `keep_rows` (a
        run of a million steps would hold a million: `log` and metrics.jsonl have them). The host
        syncs with the device only on the first step, logged steps, saves and the last step (and
        on every step under fp16 or DINO, whose updates are decided on the host, and once a window
        under adaptive mixing); rows between them are filled in then, and samples/s is measured
        over each such interval.
        Under torchrun a stop request is agreed on at those steps."""
        end = min(self.cfg.max_steps, max_steps if max_steps is not None else self.cfg.max_steps)
        rows = []
        log = MetricsLog(self.output, self.cfg.tensorboard)
        first, start, samples = self.step, time.perf_counter(), 0
        with log if self.rank == 0 else contextlib.nullcontext():
            while self.step < end:
                n = self.step + 1
                save = n % self.cfg.save_every == 0 or n == self.cfg.max_steps or \
                    bool(self.cfg.keep_every) and n % self.cfg.keep_every == 0
                logged = n % self.cfg.log_every == 0 or n == end
                try:
                    row = self.train_step(sync=save or logged or n == first + 1,
                                          diagnose=logged and self._diagnosed(n, end))
                except DataError as e:
                    raise self._kept(e, log, end, start, samples) from None
                except RuntimeError as e:
                    if self.world > 1 and lost_peer(e):
                        raise self._peer_lost(e, n) from None
                    raise
                except stopping.Abandoned as e:
                    self._abandoned(e.signum, log, end, start, samples)
                    break
                if keep_rows:
                    rows.append(row)
                samples += row["samples"]
                # A stop request (SIGTERM/SIGINT): this process's own, free to read, when alone;
                # under torchrun agreed by every process (a collective) at the steps that sync anyway.
                stop = stopping.requested() if self.world == 1 else stopping.agreed() if "loss" in row else 0
                if stop and "loss" not in row:
                    self.synced = self._settle()
                if "loss" not in row and not stop:
                    continue
                self._report(log, end, samples / max(1e-9, time.perf_counter() - start))
                start, samples = time.perf_counter(), 0
                self._check_divergence()
                if save or stop:
                    self.save()
                if stop:
                    self.stopped = stop
                    break
        if self.rank == 0 and log.path.is_file():
            plot_losses(log.path, self.output / "loss_curves.png")
        return rows

    def _report(self, log: MetricsLog, end: int, rate: float) -> None:
        """Log the rows that synced (the metrics file at `log_every`, and `self.log`)."""
        for settled in self.synced:
            settled["samples_per_s"] = rate
            if self.rank == 0 and (settled["step"] % self.cfg.log_every == 0 or settled["step"] == end):
                settled["skipped"], settled["bad_records"] = self.skipped(), self.bad_records()
                settled["samples_by_source"] = self.samples_by_source()
                log.write(settled)
            self.log(settled)

    def _abandoned(self, signum: int, log: MetricsLog, end: int, start: float, samples: int) -> None:
        """A stop request that came while a step awaited its batch (on any process): the steps done
        are saved as at any stop. No stream is left moved by the step, so the run resumes exactly."""
        self._save_reached(log, end, start, samples)
        self.stopped = signum

    def _peer_lost(self, e: RuntimeError, step: int) -> DataError:
        """Another process of a torchrun run died (killed, out of memory) amid a step's collective:
        one line naming what is kept and how to go on, where the backend's traceback said neither.
        Nothing is saved now: the step's collectives cannot finish."""
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if len(reason) > 160:  # gloo's words run on: cut at a word, said to be cut
            reason = reason[:160].rsplit(" ", 1)[0].rstrip(".,;:") + "..."
        lost = f"another process of this run ended during step {step} ({reason})"
        newest = self.run.intact_pointer()
        if newest is None:
            return DataError(f"{lost}, before any checkpoint: run the same command again")
        return DataError(f"{lost}; the newest checkpoint is {newest}: run the same torchrun command with --resume "
                         "to continue from it")

    def _kept(self, e: DataError, log: MetricsLog, end: int, start: float, samples: int) -> DataError:
        """A source that failed as a step drew its batch (a store down for longer than
        data.outage_minutes; none of its shards usable; a bad record beyond replacing) ends the
        run. The steps done are saved first, by every process (they agreed on the failure after
        the draw): no stream is left moved by the failed step, so the run resumes exactly once the
        data is readable."""
        if self.step == self._saved_at:
            return e
        return saved_before(e, self.step, self._save_reached(log, end, start, samples))

    def _save_reached(self, log: MetricsLog, end: int, start: float, samples: int) -> Path | None:
        """Out of the loop: log the steps done and save the step reached (None: saved already). A
        run past its divergence patience is not saved to be resumed."""
        self.synced = self._settle()
        self._report(log, end, samples / max(1e-9, time.perf_counter() - start))
        self._check_divergence()
        return self.save() if self.step != self._saved_at else None
