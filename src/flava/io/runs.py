"""The layout of a run directory, and resolving a run to its newest checkpoint.

```
OUTPUT/
  train_config.json  metrics.jsonl  summary.json  loss_curves.png  tensorboard/
  checkpoints/
    latest.json       {"step": N, "path": "step_0000000N"}
    step_0000000N/    a checkpoint directory (config.json, model.safetensors, trainer state)
```
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from .checkpoint import CONFIG, changed_but_whole, check_sum, damage
from .files import read_json, write_json_atomic
from .hubcache import looks_like_hub_id, snapshot
from .locks import hold

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
LOCK = ".lock"
CODEBOOK_STATE = "training"
"""`flava train-codebook`'s OUTPUT/training/: the resumable state of an unfinished codebook."""
STATE = "trainer_state.pt"
STREAMS = "streams.json"
"""A training checkpoint's state beside its weights: what `--resume` reads and a model's reader does not."""


@dataclass(frozen=True)
class RunDir:
    """Where a run keeps what it writes."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def pointer(self) -> Path:
        return self.checkpoints / LATEST

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    def step(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:08d}"

    @staticmethod
    def step_of(path: Path) -> int:
        """The step of a checkpoint directory; -1 for a name not of this writer's."""
        try:
            return int(path.name.removeprefix("step_"))
        except ValueError:
            return -1

    def step_dirs(self) -> list[Path]:
        """Checkpoint directories, oldest first."""
        return sorted(p for p in self.checkpoints.glob("step_*") if p.is_dir())

    def latest(self) -> Path | None:
        """The checkpoint latest.json names, or None when the run has none yet."""
        return _follow(self.pointer) if self.pointer.is_file() else None

    def intact_pointer(self) -> Path | None:
        """`latest()`, or None when latest.json is missing or damaged (for messages)."""
        try:
            return self.latest()
        except CheckpointError:
            return None

    def candidates(self) -> tuple[list[Path], list[str]]:
        """Checkpoints to resume from, best first: the one latest.json names, then every step
        directory newest first; and notes on a pointer that could not be followed."""
        notes, found = [], []
        try:
            latest = self.latest()
        except CheckpointError as e:
            latest = None
            notes.append(str(e))
        if latest is not None:
            found.append(latest)
        found += [p for p in reversed(self.step_dirs()) if p not in found]
        return found, notes

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run's lock for the block: one writer per run directory. The OS releases it
        when the holder dies (forked loader workers do not hold it: `io.locks`), so a killed run
        never leaves its directory locked."""
        self.root.mkdir(parents=True, exist_ok=True)
        with hold(self.root / LOCK, str(self.root), "wait for it to end or choose another --output"):
            yield

    def remove_orphans(self) -> list[Path]:
        """Delete what killed writes left behind (staging and replaced copies beside checkpoints,
        temporary pointer files); only a run's one writer may call this."""
        removed = []
        if self.checkpoints.is_dir():
            for p in self.checkpoints.iterdir():
                if p.name.startswith(".") and (".tmp" in p.name or p.name.endswith(".old")):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                    removed.append(p)
        return removed

    def discard(self, checkpoint: Path) -> None:
        """Remove a checkpoint folder so that a stop or kill midway leaves it whole or out of sight:
        renamed to a name the next start sweeps (`remove_orphans`), then deleted. Deleted in place, a
        second signal had left one with its config and no weights."""
        hidden = checkpoint.with_name(f".{checkpoint.name}.old")
        shutil.rmtree(hidden, ignore_errors=True)
        try:
            os.rename(checkpoint, hidden)
        except OSError:  # deleted in place, then, as best it can
            shutil.rmtree(checkpoint, ignore_errors=True)
            return
        shutil.rmtree(hidden, ignore_errors=True)

    def point_latest(self, step: int, target: Path) -> None:
        write_json_atomic(self.pointer, {"step": step, "path": target.name})


def codebook_state(directory: Path) -> Path | None:
    """The state.json of an unfinished `train-codebook` in `directory`: in its place, or where a save
    killed between its two renames left it (moved back by the next run, under its lock); None."""
    for where in (CODEBOOK_STATE, f".{CODEBOOK_STATE}.old"):
        if (directory / where / "state.json").is_file():
            return directory / where / "state.json"
        if (directory / where).exists():
            return None
    return None


def codebook_progress(saved: dict) -> str:
    """'step N of M' of a codebook training state."""
    settings = saved.get("settings")
    return f"step {saved.get('step')} of {settings.get('steps') if isinstance(settings, dict) else '?'}"


def _follow(pointer: Path) -> Path:
    try:
        target = pointer.parent / json.loads(pointer.read_text())["path"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"{pointer} is damaged") from None
    if not (target / CONFIG).is_file():
        raise CheckpointError(f"{pointer} points to {target}, which is not a checkpoint")
    return target


def newest_intact(run: RunDir) -> tuple[Path | None, list[str], str]:
    """The checkpoint of a run a model is read from: the one latest.json names, else the newest
    step_N directory, passing over those whose model files are damaged (their training state is not
    read, so a damaged one leaves the weights usable); notes on what was passed over, naming the
    run's checkpoints by their folder names ((None, notes) when none is usable); and why not to
    pass over a file that differs from its checksum yet reads whole (an edit made on purpose?),
    '' when none was met."""
    notes, edited = [], ""
    try:
        pointed = run.latest()
    except CheckpointError:
        pointed = None
        try:
            name = json.loads(run.pointer.read_text())["path"]
            notes.append(f"{LATEST} points to {name}, which is not a checkpoint")
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            notes.append(f"{LATEST} is damaged")
    if pointed is None and not run.pointer.exists() and run.step_dirs():
        notes.append(f"{LATEST} is missing (a save stopped before naming its checkpoint)")
    for target in run.candidates()[0]:  # the pointed one, then newest first, as --resume tries them
        why = damage(target, skip=(STATE, STREAMS)) if (target / CONFIG).is_file() else f"no {CONFIG}"
        if why is None:
            return target, notes, edited
        whole = changed_but_whole(target, skip=(STATE, STREAMS)) if not edited else None
        if whole is not None:
            try:
                check_sum(target / whole)
            except CheckpointError as e:
                edited = str(e)
        notes.append(f"{target.name} is damaged ({why})")
    return None, notes, edited


_SAID: set[str] = set()


def _run_checkpoint(p: Path, run: RunDir) -> Path | None:
    """`newest_intact`, saying once on stderr what was passed over; a CheckpointError when the run
    has checkpoints and none is usable, or one was changed after it was written; None when it has none."""
    target, notes, edited = newest_intact(run)
    if edited:  # not passed over unsaid: the user may mean that checkpoint
        raise CheckpointError(edited + (f"; {target} is intact: name it to use it" if target else ""))
    if target is None and notes:
        raise CheckpointError(f"{p} holds no usable checkpoint: {'; '.join(notes)}; copy a good checkpoint back into "
                              f"{run.checkpoints}, or name another checkpoint")
    note = f"note: {p}: {'; '.join(notes)}; using {target.name}, its newest intact checkpoint" if notes else ""
    if note and note not in _SAID:  # the commands that resolve a model twice say it once
        _SAID.add(note)
        print(note, file=sys.stderr, flush=True)
    return target


MODEL_HELP = ("a checkpoint directory (ours or transformers'), a run or recipe directory (its newest checkpoint), or a "
              "Hugging Face hub id")
"""What every command's --model takes (`resolve`), as its help says it."""


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint directory, the one a run directory's checkpoints/latest.json points to, the
    newest checkpoint of a recipe directory's last stage, or a Hugging Face hub id's snapshot in
    the local cache (downloaded unless HF_HUB_OFFLINE is set)."""
    p = Path(path)
    if looks_like_hub_id(path) and not Path(p.parts[0]).is_dir():
        try:
            return snapshot(str(path))
        except CheckpointError as e:
            raise CheckpointError(f"{path} is not a local directory, and as a hub id: {e}") from None
    if not p.exists():
        # runs/nope under an existing runs/ is a mistyped path, not a hub id: say what is near.
        where = f"; {p.parent} does not exist either" if not p.parent.is_dir() else ""
        close = difflib.get_close_matches(p.name, [c.name for c in p.parent.iterdir() if c.is_dir()], n=1) \
            if p.parent.is_dir() else []
        raise CheckpointError(f"checkpoint directory {p} does not exist{where}"
                              + (f"; did you mean {p.parent / close[0]}?" if close else ""))
    if (p / CONFIG).is_file():
        return p
    state = codebook_state(p)
    if state is not None:
        saved = read_json(state, "codebook training state", CheckpointError, expect=dict)
        raise CheckpointError(f"{p} is an image codebook whose training has not finished ({codebook_progress(saved)}); "
                              f"finish it with `flava train-codebook --resume --output {p}`")
    if (p / "task.json").is_file():  # `flava finetune`'s output: a head on encoders, not a pretrained model
        raise CheckpointError(f"{p} is a task model (flava finetune), not a pretrained model: predict with it "
                              f"(`flava predict --model {p}`, `flava serve --task {p}`), or name the model it was "
                              "fine-tuned from")
    recipe = p / "recipe.json"
    if recipe.is_file():
        # A recipe's directory (`flava pretrain --recipe`): its model is its last stage's.
        stages = read_json(recipe, "recipe record", CheckpointError, expect=dict).get("stages") or [{}]
        last = p / str(stages[-1].get("directory", ""))
        target = _run_checkpoint(p, RunDir(last)) if last != p else None
        if target is not None:
            return target
        raise CheckpointError(f"{p} is a recipe whose last stage ({last.name}) has no checkpoint yet; run the recipe "
                              "to its end, or name one of its stages' directories")
    # A run directory, or its checkpoints/ folder: the newest checkpoint `--resume` could also take,
    # whatever happened to latest.json (a second Ctrl-C as the first save began leaves none).
    run = RunDir(p.parent) if p.name == CHECKPOINTS and not (p / CHECKPOINTS).is_dir() else RunDir(p)
    if run.checkpoints.is_dir():
        target = _run_checkpoint(p, run)
        if target is not None:
            return target
    if (p / LATEST).is_file():
        try:
            return _follow(p / LATEST)
        except CheckpointError as e:  # named directly: the step directories are the way round it
            raise CheckpointError(f"{e}; name a checkpoints/step_N directory instead") from None
    if (p / "train_config.json").is_file() or (p / CHECKPOINTS).is_dir():  # a run that has saved nothing yet
        raise CheckpointError(f"{p} is a run with no checkpoint yet (it saves one every save_every steps, and at its "
                              "end): wait for its first, or name another checkpoint")
    raise CheckpointError(
        f"{p} is not a checkpoint: it is neither a checkpoint directory (no {CONFIG}) nor a run directory (no "
        f"{CHECKPOINTS}/{LATEST}); name a checkpoints/step_N directory, a run directory, a transformers FLAVA "
        "directory or a hub id (pretraining's init_image and init_text also take an image or text tower's directory)"
    )
