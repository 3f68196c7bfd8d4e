"""`flava pretrain`: the Trainer with a progress bar, a config record and a closing summary."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .. import stopping
from ..config import FlavaConfig, check, differences, from_dict, plain, said, settings, to_dict, validate
from ..data.pipeline import per_process_batch
from ..distributed import end_host_group, resolve_device, start_host_group
from ..data.registry import KINDS, open_stream
from ..errors import CheckpointError, ConfigError, DataChanged, DataError, FlavaError
from ..io.checkpoint import read_config
from ..io.files import check_writable, read_json, write_json_atomic
from ..io.locks import InUse
from ..io.runs import LOCK, RunDir, codebook_state
from ..objectives.registry import needs_image_tokens
from ..progress import progress_bar
from .accounting import source_notes, stream_size
from .checkpoint import STREAMS, on_new_data
from .codebook import CodebookTraining, run_train_codebook
from .config import TrainConfig, anchored, moved_away
from .init import INIT_KEYS, find_sources, tower_image_model
from .kinds import trained_kinds
from .trainer import Trainer, check_stage

DEMO_CODEBOOK_STEPS = 200


def init_distributed(device: str = "auto", outage_minutes: float = 0.0) -> bool:
    """Join the process group torchrun describes in the environment, over NCCL when the run's
    `device` setting resolves to a GPU, else gloo (a CPU run on a GPU host too); False when not
    under torchrun. Its collectives wait at least `outage_minutes` (data.outage_minutes) and 30
    more: a process waiting out its store holds the others at the next step (its last read may
    start just before the wait is over and take minutes itself), and NCCL's own 10 minutes would
    end them all."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    on_gpu = resolve_device(device).type == "cuda"
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    from torch.distributed import constants

    default = (constants.default_pg_nccl_timeout or timedelta(minutes=10)) if on_gpu else constants.default_pg_timeout
    timeout = max(default, timedelta(minutes=outage_minutes + 30))
    dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timeout)
    start_host_group(timeout)
    return True


def end_distributed() -> None:
    """Leave the group `init_distributed` joined."""
    end_host_group()
    dist.destroy_process_group()


def run_pretrain(cfg: TrainConfig, output: Path, resume: bool, console: Console, override: bool = False) -> None:
    """Train `cfg` into `output`. With `resume`, `cfg` must be the run's own settings (see
    `saved_settings`) apart from the RESUMABLE ones, unless `override`."""
    started = init_distributed(cfg.device, cfg.data.outage_minutes)
    try:
        return _run(cfg, output, resume, console, override)
    finally:
        if started:
            end_distributed()


# Settings a resumed run may change without --override: how long to run, how often to save, log
# and diagnose, how many checkpoints to keep, TensorBoard, loader workers, the shard cache and how
# long to wait for a store (the data order depends on none of them), and the divergence patience.
RESUMABLE = frozenset({"max_steps", "save_every", "log_every", "diagnose_every", "keep_last", "keep_every",
                       "tensorboard", "data.num_workers", "data.cache_dir", "data.cache_limit_gb", "data.outage_minutes",
                       "max_nonfinite_steps"})
SETTINGS = "train_config.json"
HISTORY = "config_history.jsonl"
DEMO_CODEBOOK = "codebook"
"""The folder of a run's own demo codebook (trained when no codebook is named)."""


def saved_settings(output: Path) -> TrainConfig | None:
    """The settings a run in `output` was started with: its train_config.json, else those its
    newest checkpoint carries; None when it has neither."""
    path = Path(output) / SETTINGS
    try:
        if path.is_file():
            return from_dict(TrainConfig, _written_before_scaling(read_json(path, "run settings")))
        latest = RunDir(Path(output)).intact_pointer()
        if latest is not None and "train" in (meta := read_config(latest)):
            return from_dict(TrainConfig, _written_before_scaling(meta["train"]), "train")
    except (ConfigError, CheckpointError) as e:
        raise ConfigError(f"the settings of the run in {output} are damaged ({e}); restore {path} or start a "
                          "new run") from None
    return None


def _written_before_scaling(settings: dict) -> dict:
    """Settings saved before optim.reference_batch existed meant lr and warmup_steps as given."""
    if isinstance(settings.get("optim"), dict):
        settings["optim"].setdefault("reference_batch", 0)
    return settings


CHECKPOINT_KEYS = ("codebook",) + INIT_KEYS
PLACES = CHECKPOINT_KEYS + ("data.pairs", "data.images", "data.text", "data.cache_dir")
"""Settings that name local files or folders: saved as absolute paths when given as relative ones,
so that a --resume from another folder finds them."""


def changes(old: TrainConfig, new: TrainConfig) -> dict[str, tuple]:
    """{setting: (old value, new value)} for every setting that differs (a path named once
    relative to this folder and once absolute is no difference)."""
    return {k: v for k, v in differences(settings(old), settings(new)).items()
            if not (k in PLACES and anchored(v[0]) == anchored(v[1]))}


def _accept_changes(saved: TrainConfig, cfg: TrainConfig, output: Path, override: bool) -> dict | None:
    """The history entry of the changes a resume makes (None: none), written with the run's
    settings once it trains with them; changes refused without --override, and those no resume
    can make, raise."""
    diff = changes(saved, cfg)
    _refuse_what_no_resume_changes(saved, cfg, diff, output)  # first: --override would not help
    refused = {k: v for k, v in diff.items() if k not in RESUMABLE}
    if refused and not override:
        if any(k in refused for k in DATA_KEYS):
            _refuse_data_no_resume_follows(cfg, RunDir(output), refused)  # first: --override would not help
        raise ConfigError(
            f"--resume would change the run's settings ({said(refused)}); a run keeps the settings it was started "
            f"with. Drop those --set flags, or pass --override to change them (recorded in {output / HISTORY})")
    if not diff:
        return None
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "override": bool(refused),
            "changes": {k: [plain(x) for x in v] for k, v in diff.items()}}


def _refuse_what_no_resume_changes(saved: TrainConfig, cfg: TrainConfig, diff: dict[str, tuple], output: Path) -> None:
    """A resumed run rebuilds its model from its own checkpoints, which hold its codebook: the
    checkpoints it started from are not read again, nor is the codebook, and the weights keep their
    shapes. Such a change, even with --override, would be recorded and not made."""
    # The codebook is read where the checkpoints hold none: a run started without one may name one,
    # and a codebook folder that moved may be named again (earlier releases' checkpoints read it there).
    # model.codebook.* too: the checkpoints hold the codebook with its own settings (they were recorded
    # and never used).
    read_at_start = {k: v for k, v in diff.items()
                     if (k in CHECKPOINT_KEYS or k == "init_image_size" or k.startswith("model.codebook."))
                     and not (k == "codebook" and (not v[0] or moved_away(v[0])))}
    if read_at_start:
        codebook = " --set codebook=..." if any(k.startswith("codebook") or k.startswith("model.codebook.")
                                                 for k in read_at_start) else ""
        raise ConfigError(f"a resumed run cannot change {said(read_at_start)}: it continues from its own checkpoints, "
                          "which hold its model and codebook, and reads nothing it started from again; start a new "
                          f"run from it instead (--set init={output}{codebook})")
    model = {k: v for k, v in diff.items() if k.startswith("model.")}
    if saved.init and model:
        raise ConfigError(f"a run started from init={saved.init} takes its model from it, so resuming it cannot change "
                          f"{said(model)}; start a new run for other model settings")
    shaping = {k: v for k, v in diff.items() if k.startswith(("model.", "objectives."))}
    if not shaping or cfg.stage == "image-dino":  # DINO's heads follow dino.*, which its loading names itself
        return

    def shapes(c: TrainConfig) -> dict[str, tuple]:
        from ..objectives.pretraining import PretrainingModel

        with torch.device("meta"):  # shapes without weights: a base model in a fifth of a second
            # A run started from init= keeps init's model, whatever its settings say.
            built = PretrainingModel(saved.model if saved.init else c.model, c.objectives)
            return {k: tuple(v.shape) for k, v in built.state_dict().items()}

    try:
        before, after = shapes(saved), shapes(cfg)
    except FlavaError:
        return  # a setting the model refuses says so when the run builds it
    if before != after:
        moved = sorted(set(before) ^ set(after)) or [k for k in before if before[k] != after[k]]
        raise ConfigError(f"a resumed run cannot change {said(shaping)}: its checkpoints hold weights of other "
                          f"shapes (e.g. {moved[0]}); start a new run (init_image=, init_text= and init_multimodal= "
                          "take this run's encoders that still fit)")


DATA_KEYS = tuple(f"data.{k}" for k in KINDS)


def _refuse_data_no_resume_follows(cfg: TrainConfig, run: RunDir, refused: dict) -> None:
    """Other data named on resume: the run's saved positions must index it (as many shards, lanes
    and samples), or no --override can resume on it. Opened and checked as the resume would."""
    latest = run.intact_pointer()
    if latest is None:
        return
    try:
        per_process = read_json(latest / STREAMS, "stream positions", expect=list)
    except FlavaError:
        return  # the resume itself says what is wrong with them
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    kinds, _ = trained_kinds(cfg)
    for kind in (k for k in kinds if f"data.{k}" in refused):
        saved = [p.get(kind) if isinstance(p, dict) else None for p in per_process]
        if not saved or any(s is None for s in saved):
            continue
        d = cfg.data
        stream = open_stream(kind, getattr(d, kind), None, d.batch_size, seed=cfg.seed, rank=rank, world=world,
                             lanes=d.lanes, outage_s=d.outage_minutes * 60)
        try:
            stream.load_states(saved)
        except DataChanged as e:
            raise on_new_data(e, run.root) from None


RUN_FILES = (SETTINGS, HISTORY, "metrics.jsonl", "summary.json", "loss_curves.png", "tensorboard", "checkpoints")
"""What a run writes beside its checkpoints (`io.runs` has the layout)."""


def clear_unsaved_run(output: Path) -> None:
    """Remove the files of a run that saved no checkpoint, and nothing else."""
    for name in RUN_FILES:
        p = output / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _run(cfg: TrainConfig, output: Path, resume: bool, console: Console, override: bool) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank != 0:
        console = Console(quiet=True)  # one process reports
    check(cfg)
    resolve_device(cfg.device)  # refused before any work (a demo codebook trained first, then lost)
    if not resume:  # the stage's data kinds, mixing and chunks, before minutes of demo codebook
        check_stage(cfg)
    output.mkdir(parents=True, exist_ok=True)
    run = RunDir(output)
    with contextlib.ExitStack() as held:
        refusal, in_use = "", False
        if rank == 0:  # one lock for the run; every process learns whether it was had
            try:
                had_lock = (output / LOCK).exists()
                held.enter_context(run.lock())  # first: a folder another run is writing is said to be in use
                if not resume and (run.step_dirs() or run.pointer.exists()):
                    raise ConfigError(f"{output} already holds a run; pass --resume to continue it or choose "
                                      "another --output")
                # A folder of images, a codebook, prepared shards: the run's files would mix with them
                # (its loss plot became a training image), and its cleanup could not tell them apart.
                other = sorted(p.name for p in output.iterdir()
                               if p.name not in (*RUN_FILES, DEMO_CODEBOOK) and not p.name.startswith("."))
                if not resume and other:
                    if not had_lock:  # nothing of this run is left in that folder
                        held.callback((output / LOCK).unlink, missing_ok=True)
                    raise ConfigError(f"{output} already holds other files (e.g. {other[0]}); choose a new or empty "
                                      "--output")
                if not resume and (output / SETTINGS).exists():
                    # Stopped or failed before its first checkpoint (bad data met at step 1, say): there
                    # is nothing to resume, and a corrected command starts it again.
                    console.print(f"note: {output} holds a run that saved no checkpoint; starting it again")
                    clear_unsaved_run(output)
            except ConfigError as e:
                refusal, in_use = str(e), isinstance(e, InUse)
        if dist.is_initialized():
            box = [(refusal, in_use)]
            dist.broadcast_object_list(box, src=0)
            refusal, in_use = box[0]
        if refusal:
            raise (InUse if in_use else ConfigError)(refusal)
        return _train(cfg, run, resume, console, override, rank)


def gradient_table(gradients: dict[str, dict]) -> Table:
    """The latest measured gradient norms on each shared encoder and the cosines between objectives'
    gradients there; a negative cosine marks objectives that pull the encoder apart."""
    table = Table(title="gradients on the shared encoders (latest measured; cosine < 0: the objectives conflict)")
    for col in ("encoder", "objective(s)", "norm", "cosine"):
        table.add_column(col, justify="left" if col in ("encoder", "objective(s)") else "right")
    for enc, d in gradients.items():
        for name, v in d["norm"].items():
            table.add_row(enc, name, f"{v:.4g}", "")
        for pair, v in d["cosine"].items():
            table.add_row(enc, pair.replace("|", " / "), "", f"{v:+.3f}" + ("  conflict" if v < 0 else ""))
    return table


def _described(stream, weight: float) -> str:
    src = stream.source
    size = f"{stream_size(stream):,} samples" if stream_size(stream) is not None else "size read as it streams"
    shards, lanes = len(src.shards), stream.layout.lanes
    return (f"{src.name} ({shards:,} shard{'s' * (shards != 1)}, {size}, {lanes} lane{'s' * (lanes != 1)}"
            + (f", {weight:.0%} of draws" if weight < 1 else "") + ")")


def recorded_global_batch(run: RunDir) -> int | None:
    """The global batch the run's newest checkpoint was drawing (its streams record it); None
    without a readable one (resuming then reports what is wrong)."""
    latest = run.intact_pointer()
    try:
        per_process = read_json(latest / STREAMS, "stream positions", expect=list) if latest else []
        kind = next(iter(per_process[0].values()))
        return int(kind["sources"][0]["global_batch"])
    except (FlavaError, OSError, LookupError, StopIteration, TypeError, ValueError, AttributeError):
        return None


def _keep_global_batch(cfg: TrainConfig, run: RunDir, console: Console) -> dict | None:
    """On another number of processes, a resumed run keeps its global batch: data.batch_size
    becomes the recorded global batch over the processes (refused when it does not divide).
    Returns the history entry that records it (None: nothing changed)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    recorded = recorded_global_batch(run)
    if recorded is None or recorded == cfg.data.batch_size * world:
        return None
    was = cfg.data.batch_size
    cfg.data.batch_size = per_process_batch(recorded, world, f"the run in {run.root}")
    console.print(f"resuming on {world} process{'es' if world > 1 else ''}: data.batch_size {cfg.data.batch_size} per "
                  f"process keeps the run's global batch of {recorded} ({_was(was, recorded)})")
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "derived": "processes", "processes": world,
            "changes": {"data.batch_size": [was, cfg.data.batch_size]}}


def _was(per_process: int, recorded: int) -> str:
    """How the settings' batch drew the recorded global batch: on so many processes, or not at all
    (a train_config.json edited by hand: "it was 8 on 0" had been said)."""
    if recorded % per_process == 0:
        n = recorded // per_process
        return f"it was {per_process} on {n} process{'es' if n > 1 else ''}"
    return f"the run's settings say {per_process} per process, which no number of processes makes {recorded}"


def needs_demo_codebook(cfg: TrainConfig) -> bool:
    """Whether `cfg` trains on the packaged demo data with objectives that need image tokens and
    names no codebook (nor a checkpoint that would bring one)."""
    kinds, _ = trained_kinds(cfg)
    return cfg.stage != "image-dino" and needs_image_tokens(cfg.objectives, kinds) and not cfg.init and \
        not cfg.codebook and not any(getattr(cfg.data, k) for k in KINDS)


def keeps_demo_codebook(saved: TrainConfig, cfg: TrainConfig, output: Path) -> bool:
    """Whether a resumed run trained on its own demo codebook and `cfg` names none: it keeps it."""
    return needs_demo_codebook(cfg) and anchored(saved.codebook) == os.path.abspath(output / DEMO_CODEBOOK)


def ensure_demo_codebook(cfg: TrainConfig, directory: Path, console: Console, rank: int = 0,
                         say_kept: bool = False) -> None:
    """The embedded default: with the demo data and no codebook named, train one on the demo images
    into `directory` (about a minute and a half; once) and point `cfg.codebook` at it. With data
    named, the trainer checks that each source needing image tokens has them (prepared shards) or a
    codebook to make them. `say_kept`: a new run that finds one says it takes it."""
    if not needs_demo_codebook(cfg):
        return
    validate(cfg.model)  # a model that cannot be built is said now, not after minutes of codebook training
    # The model the run builds: a public image tower decides its image size, and so the codebook's.
    model = tower_image_model(cfg.model, cfg.init_image, cfg.init_image_size) if cfg.init_image else cfg.model
    check_codebook_vocabulary(model)
    train_demo_codebook(model, directory, console, rank, say_kept)
    cfg.codebook = os.path.abspath(directory)  # found by a --resume from another folder


def check_codebook_vocabulary(model: FlavaConfig) -> None:
    """A codebook to be trained for `model` makes the tokens its MIM/MMM heads predict: said before
    minutes of codebook training, not after."""
    if model.image.vocab_size != model.codebook.vocab_size:
        raise ConfigError(f"model.image.vocab_size={model.image.vocab_size} but model.codebook.vocab_size="
                          f"{model.codebook.vocab_size}: the MIM/MMM heads predict the codebook's tokens; set both "
                          "alike")


def train_demo_codebook(model: FlavaConfig, directory: Path, console: Console, rank: int = 0,
                        say_kept: bool = False) -> None:
    """The demo images' codebook for `model` in `directory`, trained unless one for its settings is
    there (one for others, left by a start that failed, is trained again)."""
    if rank == 0 and (directory / "model.safetensors").is_file():
        trained = read_config(directory)
        fits = (trained.get("model") or {}).get("codebook") == to_dict(model.codebook) and \
            (trained.get("codebook_training") or {}).get("image_size") == model.codebook_image_size
        if not fits:
            console.print(f"the demo codebook in {escape(str(directory))} was trained for other model settings: "
                          "training it again")
            shutil.rmtree(directory)
        elif say_kept:
            console.print(f"the demo images' codebook an earlier start trained: {escape(str(directory))}")
    if rank == 0 and not (directory / "model.safetensors").is_file():
        console.print(f"no image codebook given (--set codebook=DIR names one): training one on the demo images first, "
                      f"{DEMO_CODEBOOK_STEPS} steps before the run's own (which --max-steps counts), kept in "
                      f"{escape(str(directory))} for this run's restarts and for other runs' --set codebook=")
        # One stopped by SIGTERM/SIGINT continues when the command runs again.
        unfinished = codebook_state(directory) is not None
        # A stop at once names the codebook's last save, which the same command (not --resume) continues.
        lost = " since its last save" if unfinished else ""
        try:
            with stopping.saves_told(f"nothing of the demo image codebook was saved{lost}: run the same command "
                                     "again", "run the same command again to continue"):
                run_train_codebook(["demo"], directory, model, CodebookTraining(steps=DEMO_CODEBOOK_STEPS), console,
                                   resume=unfinished)
        except stopping.Stopped as e:
            kept = "" if e.at == stopping.BEFORE_FIRST_STEP else f" (kept in {directory})"
            raise stopping.Stopped(e.signum, f"stopped by {stopping.name(e.signum)} while training the demo image "
                                             f"codebook, {e.at}{kept}: run the same command again to continue",
                                   e.at) from None
    if dist.is_initialized():
        dist.barrier()


def _refuse_data_gone(cfg: TrainConfig) -> None:
    """A resume whose data is no longer where the run read it: said with the way to name where it
    went (it had been "X does not exist" alone)."""
    for kind in ("pairs", "images", "text"):
        for spec in getattr(cfg.data, kind):
            path = spec if isinstance(spec, str) else spec.path
            local = path.split("?", 1)[0]
            if "://" in path or path.startswith("pipe:") or any(c in local for c in "*?[{"):
                continue  # remote, or a pattern: its shards are checked as they are listed
            if not Path(local).exists():
                raise DataError(f"{local} does not exist: the run read it as data.{kind}; if it moved, resume on it "
                                f"there: --resume --override --set 'data.{kind}=[\"NEW PATH\"]'")


def _train(cfg: TrainConfig, run: RunDir, resume: bool, console: Console, override: bool, rank: int) -> None:
    output = run.root
    saved = saved_settings(output) if resume else None
    demo = output / DEMO_CODEBOOK
    if not resume:
        find_sources(cfg)
    # A resumed run keeps the codebook it trained with: settings that ask for another (--resume
    # --config tiny on a run with its own, --config small on a demo run) are refused below, not
    # given minutes of demo codebook first (the second deleted the run's own).
    if saved is None:
        ensure_demo_codebook(cfg, demo, console, rank, say_kept=not resume)
    elif keeps_demo_codebook(saved, cfg, output):
        cfg.codebook = os.path.abspath(demo)
    if saved is not None and cfg.max_steps < saved.max_steps:
        newest = run.intact_pointer() or (run.step_dirs() or [None])[-1]
        reached = int(newest.name.removeprefix("step_")) if newest is not None else 0
        if cfg.max_steps < reached:
            raise ConfigError(f"--max-steps {cfg.max_steps} is below the step the run reached ({reached}): a run "
                              f"cannot go back; its earlier checkpoints are in {run.checkpoints}")
    history = []  # written with the settings, once the run trains with them: a refused resume changed nothing
    if saved is not None:
        history.append(_accept_changes(saved, cfg, output, override))
        if cfg.data.batch_size == saved.data.batch_size:
            history.append(_keep_global_batch(cfg, run, console))
    if rank == 0:
        check_writable(run.checkpoints)  # found here, not at the first save save_every steps later
    if resume:
        _refuse_data_gone(cfg)
    trainer = Trainer(cfg, output, resume=resume)
    if resume and trainer.resume():
        console.print(f"resumed from step {trainer.step}")
    else:
        if resume:  # as the plain command says of such a run
            console.print(f"note: {output} holds a run that saved no checkpoint; starting it again")
        for what in trainer.initialised.values():
            console.print(escape(what))
    for note in trainer.notes:
        console.print(f"note: {note}")
    summary = output / "summary.json"
    if trainer.step >= cfg.max_steps and summary.is_file():
        console.print(f"the run already finished at step {trainer.step} (max_steps {cfg.max_steps}); nothing to "
                      f"do: raise --max-steps to train it further")
        return
    # A run stopped (or failed) at the step --max-steps now names ends there, with its summary; it
    # had been called finished, with no summary, and its settings kept the longer max_steps.
    ending = trainer.step >= cfg.max_steps
    if rank == 0:
        lines = [json.dumps(entry) + "\n" for entry in history if entry]  # before either is written
        write_json_atomic(output / SETTINGS, to_dict(cfg))
        if lines:
            with open(output / HISTORY, "a") as f:
                f.writelines(lines)
        # The summary of the end the run now goes past: left, it read as this run's until its new end.
        summary.unlink(missing_ok=True)
    if ending:
        console.print(f"the run stopped at step {trainer.step}, which max_steps {cfg.max_steps} makes its last; "
                      "ending it there")
    data = "; ".join(f"{k}: " + ", ".join(_described(s, w) for s, w in zip(ks.streams, ks.weights))
                     for k, ks in trainer.streams.items())
    procs = f" x {trainer.world} processes ({cfg.distributed})" if trainer.world > 1 else ""
    if not ending:
        console.print(f"pretraining stage {cfg.stage} for {cfg.max_steps} steps; batch {cfg.data.batch_size}{procs}; "
                      f"{cfg.precision} on {trainer.device}; writing to {output}")
        console.print(f"data: {escape(data)}")
        # A kind given no share is never read (trained_kinds says so): what its sources hold does not matter.
        m = trainer.mixing
        read = {k: trainer.streams[k] for k, a, b in zip(m.kinds, m.start, m.end) if a > 0 or b > 0}
        for note in source_notes(read, cfg.data.batch_size * trainer.world):
            console.print(f"note: {escape(note)}")
    if trainer.optimisation.note and not ending:
        console.print(trainer.optimisation.note)
    if trainer.optimisation.warmup_steps >= cfg.max_steps and not ending:
        peak = trainer.optimisation.warmup_steps
        what = "as long as the run" if peak == cfg.max_steps else "longer than the run"
        reach = "reaches its peak at the last step and never decays" if peak == cfg.max_steps else \
            "never reaches its peak"
        console.print(f"note: the warm-up ({peak:,} steps) is {what} ({cfg.max_steps:,}): the learning rate {reach}; "
                      "set optim.warmup_steps below max_steps for a full schedule")
    # Saved with each checkpoint: a resumed run reports the whole run's.
    first, last = trainer.progress.first_losses, trainer.progress.last_losses
    gradients: dict[str, dict] = {}
    """The latest measured gradient norm and cosine of each objective (pair) on each shared encoder."""
    with progress_bar(console) as progress:
        task = progress.add_task("steps", total=cfg.max_steps, completed=trainer.step, info="")

        def log(row: dict) -> None:
            for name, v in row["losses"].items():
                first.setdefault(name, v)
                last[name] = v
            for enc, d in row.get("gradients", {}).items():
                for what in ("norm", "cosine"):
                    gradients.setdefault(enc, {"norm": {}, "cosine": {}})[what].update(d[what])
            info = "  ".join(f"{k} {v:.3f}" for k, v in row["losses"].items())
            loss = "-, nothing masked" if row["loss"] is None else f"{row['loss']:.3f}"
            progress.update(task, completed=row["step"],
                            info=f"loss {loss} ({info})  {row['samples_per_s']:.0f} samples/s")

        trainer.log = log
        # The loop sets the signal number when every process agreed to stop on a request
        # (stopping.agreed at a step boundary) and it saved the step it reached.
        trainer.stopped = 0
        trainer.fit(keep_rows=False)
    if trainer.stopped and trainer.step == 0:  # while the first batch was awaited (stopping.abandonable)
        raise stopping.stopped_before_first_step(trainer.stopped)
    if trainer.stopped and trainer.step < cfg.max_steps:  # a stop at the last step is the run's end
        at = f"at step {trainer.step} of {cfg.max_steps}"
        raise stopping.Stopped(trainer.stopped, f"stopped by {stopping.name(trainer.stopped)} {at}; saved "
                                                f"{run.step(trainer.step)}: continue with the same command and --resume",
                               at)
    table = Table(title="losses: the run's first and last values")
    for col in ("loss", "first", "last"):
        table.add_column(col, justify="right" if col != "loss" else "left")
    for name in first:
        table.add_row(name, f"{first[name]:.4f}", f"{last[name]:.4f}")
    console.print(table)
    if gradients:
        console.print(gradient_table(gradients))
    skipped = trainer.skipped(everywhere=True)
    bad, where = trainer.bad_records_where(everywhere=True)

    def counts(c: dict, one: str, many: str, where: dict) -> str:
        said = [f"{v} {k}" + (f", e.g. in {where[k]}" if k in where else "") for k, v in c.items()]
        n = sum(c.values())
        return f"{n} {one if n == 1 else many} (" + "; ".join(said) + ")" if c else f"no {many}"

    console.print(escape(f"skipped records: {counts(bad, 'bad record', 'bad records', where)}; "
                         f"{counts(skipped, 'draw skipped', 'draws skipped', {})}"))
    seen = trainer.samples_by_source()
    console.print("samples seen: " + "; ".join(f"{k}: " + ", ".join(f"{n:,} from {name}" for name, n in by.items())
                                               for k, by in seen.items()))
    if trainer.nonfinite_steps:
        console.print(f"updates skipped for a non-finite loss or gradient: {trainer.nonfinite_steps}")
    # Not one an earlier part of the run wrote before a resume with tensorboard=false.
    board = f" and {output / 'tensorboard'}" if cfg.tensorboard and (output / "tensorboard").is_dir() else ""
    # None where no step was logged: a run stopped before its first logged step and ended where it stopped.
    curves = f", {output / 'loss_curves.png'}" if (output / "loss_curves.png").is_file() else ""
    console.print(f"checkpoints in {trainer.run.checkpoints}; metrics in {output / 'metrics.jsonl'}{curves}{board}")
    if rank == 0:
        write_json_atomic(summary, {"first": first, "last": last, "skipped": skipped, "bad_records": bad,
                                    "bad_records_in": where, "nonfinite_steps": trainer.nonfinite_steps,
                                    "samples_by_source": seen, "gradients": gradients})
