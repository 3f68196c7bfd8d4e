"""Saving a training run's stateful parts and resuming them exactly (torchtitan's shape: the
manager is handed what has state and knows no trainer).

A checkpoint stores the model's weights, the optimizer, scheduler and loss scaler, the loop's
counters, the stage's own state, every process's RNG and stream positions, so a run resumed
from it repeats the uninterrupted run step for step. Every process takes part (weights may be
sharded); process 0 writes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from safetensors import SafetensorError

from .. import stopping
from ..config import to_dict
from ..errors import CheckpointError, DataChanged
from ..loading import Checkpoint, load_weights, read_checkpoint, refuse_non_finite
from ..io.checkpoint import (PARTS, damage, save_state, split_parts, write_checkpoint_dir, write_checkpoint_files,
                             write_checksums)
from ..io.files import read_json, write_json_atomic
from ..io.runs import STATE, STREAMS, RunDir

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Parameters no step has used yet (e.g. poolers) have no AdamW state to restore.
FULL_OPTIM = StateDictOptions(full_state_dict=True, cpu_offload=True, strict=False)


@dataclass
class TrainState:
    """The loop's counters: steps taken, updates skipped for a non-finite loss or gradient, the
    latest such steps in a row (a resumed run's divergence patience goes on from them) and each
    loss's first and latest values."""

    step: int = 0
    nonfinite_steps: int = 0
    nonfinite_run: list[int] = field(default_factory=list)
    first_losses: dict[str, float] = field(default_factory=dict)
    """Each loss's first value in the run (the closing summary's, across resumes)."""
    last_losses: dict[str, float] = field(default_factory=dict)
    """... and its latest."""

    def state_dict(self) -> dict:
        return {"step": self.step, "nonfinite_steps": self.nonfinite_steps, "nonfinite_run": list(self.nonfinite_run),
                "first_losses": dict(self.first_losses), "last_losses": dict(self.last_losses)}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.nonfinite_run = [int(s) for s in state.get("nonfinite_run", [])]
        self.first_losses = {str(k): float(v) for k, v in state.get("first_losses", {}).items()}
        self.last_losses = {str(k): float(v) for k, v in state.get("last_losses", {}).items()}


@dataclass
class Stateful:
    """Everything a checkpoint saves and a resume restores."""

    model: nn.Module
    """The saved module: its parts are io.checkpoint.PARTS; it carries `config` and `objectives`."""
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    streams: dict
    """Data streams by kind (`state()` / `load_states(every process's)`)."""
    progress: TrainState
    stage: Any
    """The stage's own state (`state_dict()` / `load_state_dict()`), beside the weights."""
    settings: Any
    """The run's settings, recorded with the weights (a resume can read them from there)."""
    balancing: Any = None
    """The objectives' balancing method (`state_dict()` / `load_state_dict()`)."""
    mixing: Any = None
    """The data kinds' mix (`state_dict()` / `load_state_dict()`; state only when it adapts)."""


@dataclass
class Chosen:
    """The checkpoint a run resumes from, read: its weights (whose config and tokenizer a resumed
    run builds its model from), trainer state and every process's stream positions."""

    target: Path
    ckpt: Checkpoint
    state: dict
    streams: list
    notes: list[str]
    """What was passed over to choose it."""


def _read(target: Path) -> tuple[Checkpoint, dict, list]:
    """A checkpoint's weights, trainer state and every process's stream positions, or a
    CheckpointError saying what is damaged."""
    why = damage(target)
    if why:
        raise CheckpointError(why)
    ckpt = read_checkpoint(target)
    try:
        state = torch.load(target / STATE, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{STATE} is missing") from None
    except Exception as e:  # torch raises several unrelated types for damaged zip/pickle files
        raise CheckpointError(f"{STATE} could not be read ({type(e).__name__})") from None
    streams = read_json(target / STREAMS, "stream positions", CheckpointError, expect=list)
    if len(streams) != int(state.get("world", len(streams))):
        raise CheckpointError(f"{STREAMS} holds positions for {len(streams)} processes, the state for {state['world']}")
    return ckpt, state, streams


def _choose(run, notes: list[str]) -> tuple[Path, tuple] | None:
    """The newest intact checkpoint and what was read of it; notes on those passed over."""
    candidates, pointer_notes = run.candidates()
    notes += pointer_notes
    if not candidates:
        return None
    for target in candidates:
        try:
            return target, _read(target)
        except CheckpointError as e:
            notes.append(f"{target.name} is damaged ({e})")
    raise CheckpointError(f"no intact checkpoint in {run.checkpoints} to resume from: " + "; ".join(notes)
                          + f". Copy a good one back, or start the run again: remove {run.checkpoints} (the same "
                          "command without --resume then starts over there) or choose another --output")



def on_new_data(e: DataChanged, run: Path) -> DataChanged:
    """`e` with pretraining's way to train on the new data: a new run from this one's weights."""
    return DataChanged(f"{e}, or train on the new data in a new run started from this one "
                       f"(--output NEW --set init={run})")


class CheckpointManager:
    """`OUTPUT/checkpoints/step_N` directories, `latest.json`, the newest `keep_last` of them and those
    of the steps that are multiples of `keep_every` (when not 0)."""

    def __init__(self, run: RunDir, keep_last: int, rank: int, world: int, device: torch.device, keep_every: int = 0):
        self.run, self.keep_last, self.rank, self.world, self.device = run, keep_last, rank, world, device
        self.keep_every = keep_every
        self._resumed_at: int | None = None
        """The step a resume continued from, until the first save after it."""

    def _rng_state(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _gathered(self, mine) -> list:
        if self.world == 1:
            return [mine]
        values = [None] * self.world
        dist.all_gather_object(values, mine)
        return values

    def save(self, parts: Stateful) -> Path:
        """Write checkpoints/step_N atomically, point latest.json at it, keep the newest k.

        A failed write leaves the previous checkpoint and latest.json as they were and stops the run
        with a CheckpointError on every process.
        """
        run, step = self.run, parts.progress.step
        target = run.step(step)
        flat = get_model_state_dict(parts.model, options=FULL)
        optimizer = get_optimizer_state_dict(parts.model, parts.optimizer, options=FULL)
        streams = self._gathered({k: s.state() for k, s in parts.streams.items()})
        rng = self._gathered(self._rng_state())
        error = ""
        if self.rank == 0:
            error = self._write(parts, target, flat, optimizer, streams, rng)
        if self.world > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            kept = run.intact_pointer()
            raise CheckpointError(error + (f"; the previous checkpoint {kept.name} is intact: free space and resume "
                                           "with --resume" if kept else "; no earlier checkpoint exists"))
        return target

    def _write(self, parts: Stateful, target: Path, flat: dict, optimizer: dict, streams: list, rng: list) -> str:
        """Process 0's write; returns what went wrong, or ''."""
        run, step, model = self.run, parts.progress.step, parts.model
        split = split_parts(flat, target)
        bad = next((k for k, v in flat.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
        state = {**parts.progress.state_dict(), "world": self.world, "optimizer": optimizer,
                 "scheduler": parts.scheduler.state_dict(), "scaler": parts.scaler.state_dict(), "rng": rng,
                 "stage": parts.stage.state_dict()}
        if parts.balancing is not None:
            state["balancing"] = parts.balancing.state_dict()
        if parts.mixing is not None:
            state["mixing"] = parts.mixing.state_dict()

        # The codebook's own settings, which a codebook named by the run may have beside the
        # config's: the checkpoint's config describes the weights it holds.
        codebook = getattr(model, "codebook", None)
        config = dataclasses.replace(model.config, codebook=codebook.cfg) if codebook is not None else model.config

        def fill(tmp: Path) -> None:
            write_checkpoint_files(tmp, to_dict(config), split,
                                   extra={"objectives": to_dict(model.objectives), "train": to_dict(parts.settings)})
            save_state(state, tmp / STATE)
            write_json_atomic(tmp / STREAMS, streams)
            if hasattr(parts.stage, "write_files"):
                parts.stage.write_files(tmp)
            write_checksums(tmp)

        try:
            if bad is not None:
                raise ValueError(f"weight {bad} is not finite; a checkpoint is never written with such weights")
            run.checkpoints.mkdir(parents=True, exist_ok=True)
            write_checkpoint_dir(target, fill)
            run.point_latest(step, target)
            stopping.saved(target)  # a stop at once while older ones are removed below names this one
        except (OSError, RuntimeError, SafetensorError, ValueError) as e:
            # torch.save and safetensors report a full disk as RuntimeError / SafetensorError.
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
            return f"could not write the checkpoint of step {step} to {target} ({reason})"
        # Checkpoints past the one a resume continued from belong to a future it abandoned (one
        # passed over as damaged among them): were they kept, they would count among the newest
        # `keep_last`, and an intact one would be removed in their place.
        dirs = run.step_dirs()
        past = step if self._resumed_at is None else self._resumed_at
        self._resumed_at = None
        newer = [p for p in dirs if p != target and run.step_of(p) > past]
        older = [p for p in dirs if p.name <= target.name and p not in newer]
        kept = {p for p in older if self.keep_every and run.step_of(p) > 0 and run.step_of(p) % self.keep_every == 0}
        for old in newer + [p for p in older[: -self.keep_last] if p not in kept]:
            run.discard(old)
        return ""

    def choose(self) -> Chosen | None:
        """The run's newest intact checkpoint, read, with notes on what was passed over (damaged
        checkpoints, leftovers of killed writes); None when the run has no checkpoint yet; a
        CheckpointError when none is intact. Process 0 chooses; every process reads its choice."""
        run = self.run
        notes: list[str] = []
        choice, error = None, ""
        if self.rank == 0:
            notes += [f"removed {p.name}, left by a write that was killed" for p in run.remove_orphans()]
            try:
                choice = _choose(run, notes)
            except CheckpointError as e:
                error = str(e)
        if self.world > 1:
            box = [(choice[0].name if choice else None, error)]
            dist.broadcast_object_list(box, src=0)
            name, error = box[0]
            if self.rank != 0 and name is not None and not error:
                target = run.checkpoints / name
                choice = target, _read(target)
        if error:
            raise CheckpointError(error)
        if choice is None:
            return None
        target, (ckpt, state, streams) = choice
        return Chosen(target, ckpt, state, streams, notes)

    def resume(self, parts: Stateful, chosen: Chosen | None = None) -> list[str] | None:
        """Load the run's newest intact checkpoint (`chosen`, else chosen now) into `parts` and
        return the notes of its choice; None when the run has no checkpoint yet."""
        chosen = chosen or self.choose()
        if chosen is None:
            return None
        run, target, ckpt, state, all_streams = self.run, chosen.target, chosen.ckpt, chosen.state, chosen.streams
        for k, stream in parts.streams.items():
            saved = [s.get(k) for s in all_streams]
            if any(s is None for s in saved):
                raise CheckpointError(f"{target} holds no {k} stream state: resume with the data the run was started "
                                      "with")
            try:
                stream.load_states(saved)
            except DataChanged as e:
                raise on_new_data(e, run.root) from None
        pointed = run.intact_pointer()
        # The rates, betas and eps this run's settings built (changed on resume with --override):
        # the saved optimizer and schedule would bring back the old ones, silently.
        built = [{k: g[k] for k in ("initial_lr", "betas", "eps")} for g in parts.optimizer.param_groups]
        self._load_weights(parts, ckpt, state, target)
        parts.scheduler.load_state_dict(state["scheduler"])
        _keep_settings(parts.optimizer, parts.scheduler, built)
        parts.scaler.load_state_dict(state["scaler"])
        rng = state["rng"][min(self.rank, len(state["rng"]) - 1)]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        parts.progress.load_state_dict(state)
        self._resumed_at = parts.progress.step
        parts.stage.load_state_dict(state.get("stage", {}))  # checkpoints before stages had state: none
        if parts.balancing is not None:  # checkpoints before balancing: the fixed sum, no state
            parts.balancing.load_state_dict(state.get("balancing", {}))
        if parts.mixing is not None:
            parts.mixing.load_state_dict(state.get("mixing", {}))
        if self.rank == 0 and pointed != target:
            run.point_latest(parts.progress.step, target)
        return chosen.notes

    def _load_weights(self, parts: Stateful, ckpt: Checkpoint, state: dict, target: Path) -> None:
        model, optimizer = parts.model, parts.optimizer
        # A joint or unimodal stage holds model, heads (and a codebook); a DINO stage holds dino.
        weights = {p: ckpt.parts.get(p) or {} for p in PARTS if getattr(model, p, None) is not None}
        if self.world == 1:  # checked loads: one clear error for any mismatch
            for part, sd in weights.items():
                load_weights(getattr(model, part), sd, part, target)
        else:  # weights may be sharded: the distributed-aware setter
            for part, sd in weights.items():
                refuse_non_finite(sd, part, target)
            flat = {f"{part}.{k}": v for part, sd in weights.items() for k, v in sd.items()}
            set_model_state_dict(model, flat, options=FULL)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=FULL_OPTIM)
        # Loading first gives every parameter AdamW state (one zero-gradient step); a parameter that
        # had none when the checkpoint was written (not yet trained by any step) must start fresh, as
        # in the uninterrupted run, or its bias correction would count one step too many.
        saved = state["optimizer"].get("state", {})
        for name, p in model.named_parameters():
            if name not in saved:
                optimizer.state.pop(p, None)


def _keep_settings(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                   built: list[dict]) -> None:
    """Give the restored optimizer the peak rates, betas and eps the settings built, and each
    group the rate of the restored step under them (unchanged settings: the saved values)."""
    for group, settings in zip(optimizer.param_groups, built, strict=True):
        group.update(settings)
    scheduler.base_lrs = [s["initial_lr"] for s in built]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    # What the next step logs as its rate: the saved one came from the old settings' schedule (a
    # run extended by --max-steps logged 0, the end of its first cosine, while training on).
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
