"""Evaluation suites: a JSON list of tasks, every one prepared (data read and checked) before any
is run, then run on one model into a SuiteResult that `report` writes out.

A suite file::

    {"name": "mine",
     "tasks": [
       {"kind": "retrieval", "karpathy": "dataset_flickr30k.json", "split": "test", "image_root": "flickr30k"},
       {"kind": "zero-shot", "folder": "pets/test", "templates": "clip"},
       {"kind": "linear-probe", "modality": "image", "train": "pets/train", "test": "pets/test"},
       {"kind": "linear-probe", "modality": "text", "train": "news_train.csv", "test": "news_test.csv"},
       {"kind": "finetune-text", "glue": "MRPC", "dir": "glue/MRPC", "settings": {"lr": 2e-5}},
       {"kind": "finetune-multimodal", "hateful-memes": "hateful_memes", "settings": {"epochs": 2}},
       {"kind": "finetune-text", "glue": "RTE", "dir": "glue/RTE", "lr_sweep": [1e-5, 2e-5, 3e-5]}]}

Relative paths are read from the suite file's directory. `"data": NAME` instead names a packaged
data set (`flava.evaluate.packaged`); the demo suite uses only those. What each kind reads, runs
and reports is its record in `flava.evaluate.kinds`; this module only looks kinds up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, DataError, FlavaError
from .kinds import TaskKind, task_kind
from .results import DOMAINS, SuiteResult, TaskResult
from .task_spec import OBJECT, TEXT, TaskSpec, check_fields, check_keys, whole

# Keys every task may hold, whatever its kind (kind and domain are checked against their choices).
COMMON = {"kind", "name", "domain", "seed"}
"""Keys every task may hold; `settings` only the kinds that fine-tune (it had been taken, and read by
nothing, from any task)."""
COMMON_FIELDS = {"name": TEXT, "seed": whole(0)}


@dataclass
class PreparedTask:
    """A task whose data has been read and checked by its kind; `run(model, tokenizer, progress)`."""

    name: str
    kind: str
    domain: str
    size: str
    """A short description of the data for the plan printed before running."""
    data: Any = field(default=None, repr=False)
    """What the kind's `read` returned and its `run` takes."""

    def run(self, model, tokenizer, progress: Callable[[int, int], None]) -> TaskResult:
        m = task_kind(self.kind, self.name).run(self.data, model, tokenizer, progress)
        return TaskResult(self.name, self.kind, self.domain, m.scores, m.metrics, m.notes, detail=m.detail,
                          examples=m.examples)


@dataclass(frozen=True)
class CheckedTask:
    """A task as written, its keys and fields checked and its defaults filled in; no data read yet."""

    spec: dict
    kind: TaskKind
    where: str
    name: str
    domain: str
    data: str | None


def check_task(spec: dict, index: int) -> CheckedTask:
    """Check what a task says (kind, keys, each field's type and range, packaged data, domain)
    without reading its data."""
    named = isinstance(spec, dict) and isinstance(spec.get("name"), str)
    where = f"task {index + 1}" + (f" ({spec['name']})" if named else "")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: a task is a JSON object, got {type(spec).__name__}")
    kind = task_kind(spec.get("kind"), where)
    if "settings" in spec and "settings" not in kind.keys:
        raise ConfigError(f"{where}: settings are fine-tuning's (finetune-text, finetune-multimodal); a {kind.name} "
                          "task trains nothing: drop them")
    check_keys(spec, kind.keys | COMMON, where)
    check_fields(spec, {**COMMON_FIELDS, **kind.fields}, where)
    data = spec.get("data")
    if data is not None and data not in kind.datasets:
        raise DataError(f"{where}: no packaged data set {data!r} for {kind.name}; packaged: {', '.join(kind.datasets)}")
    domain = spec.get("domain") or kind.domain(spec)
    if domain not in DOMAINS:
        raise ConfigError(f"{where}: domain {domain!r} must be one of {', '.join(DOMAINS)}")
    name = spec.get("name") or f"{kind.name} {data or ''}".strip()
    return CheckedTask(spec, kind, where, name, domain, data)


def read_task(t: CheckedTask, base: Path, defaults: dict | None = None) -> PreparedTask:
    """Read and check a checked task's data (every error here comes before any task runs)."""
    read = t.kind.read(TaskSpec(t.spec, base, t.where, t.name, t.data, t.spec.get("seed", 0), defaults or {}))
    return PreparedTask(t.name, t.kind.name, t.domain, t.kind.size(read), read)


@dataclass
class Suite:
    name: str
    tasks: list[PreparedTask]
    max_text_length: int | None = None
    """Texts are cut to this many tokens for every model (and to the model's own limit), so models
    with longer position tables are compared on the same texts; None: each model's limit."""


def load_suite(source: str | Path | dict, base: Path | None = None) -> Suite:
    """Parse and prepare a suite: a JSON file path, the name 'demo', or an already parsed dict."""
    name = "suite"  # a file's suite without a name of its own is called by the file's
    if isinstance(source, dict):
        spec, base = source, base or Path.cwd()
    elif str(source) == "demo":
        spec, base = DEMO_SUITE, Path.cwd()
    else:
        from ..io.files import read_json

        path = Path(source)
        spec, base, name = read_json(path, "suite file"), path.parent, path.stem
    if not isinstance(spec, dict):
        raise ConfigError("a suite is a JSON object with a list of tasks")
    check_keys(spec, {"name", "tasks", "settings", "max_text_length"}, "suite")
    check_fields(spec, {"name": TEXT, "settings": OBJECT}, "suite")
    max_text_length = spec.get("max_text_length")
    if max_text_length is not None and (isinstance(max_text_length, bool) or not isinstance(max_text_length, int)
                                        or max_text_length < 3):
        raise ConfigError(f"the suite's max_text_length must be a whole number of tokens of at least 3, got "
                          f"{max_text_length!r}")
    tasks = spec.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise ConfigError("the suite has no tasks (a non-empty list under 'tasks')")
    defaults = spec.get("settings", {})
    _check_settings(defaults)
    # Every task checked before any reads its data: a mistake in the last task is not met minutes in.
    checked = [_in_task(i, t, check_task, t, i) for i, t in enumerate(tasks)]
    names = [c.name for c in checked]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"two tasks are named {dup!r}; give them distinct names (a task's \"name\" key, whose "
                          "default is its kind and data)")
    prepared = [_in_task(i, t, read_task, c, base, defaults) for i, (t, c) in enumerate(zip(tasks, checked))]
    return Suite(str(spec.get("name", name)), prepared, max_text_length)


def _check_settings(settings: dict) -> None:
    """The suite's fine-tuning settings, checked whatever its tasks (a typo had passed where no task
    fine-tunes, and been met only by the first that did)."""
    from ..config import from_dict
    from ..finetune.settings import FinetuneSettings

    try:
        from_dict(FinetuneSettings, settings, "settings")
    except ConfigError as e:
        raise ConfigError(f"suite: {e}") from None


def _in_task(index: int, task: Any, step: Callable[..., Any], *args: Any) -> Any:
    """`step(*args)`, its errors named by the task they concern."""
    try:
        return step(*args)
    except FlavaError as e:
        if str(e).startswith(f"task {index + 1}"):
            raise
        name = f" ({task['name']})" if isinstance(task, dict) and isinstance(task.get("name"), str) else ""
        raise type(e)(f"task {index + 1}{name}: {e}") from None


def run_suite(suite: Suite, model, tokenizer, model_name: str,
              on_task: Callable[[PreparedTask], Callable[[int, int], None]] | None = None) -> SuiteResult:
    """Run every prepared task in order; `on_task(task)` returns that task's progress callback."""
    results = []
    for task in suite.tasks:
        progress = on_task(task) if on_task else (lambda done, total: None)
        start = time.perf_counter()
        r = task.run(model, tokenizer, progress)
        r.seconds = time.perf_counter() - start
        results.append(r)
    return SuiteResult(suite.name, model_name, results)


# The suite `make demo` runs: packaged data only, sized for a few minutes per model on 2 cores.
DEMO_SUITE = {
    "name": "demo",
    # The tiny preset's texts; a public text tower (512 positions) is compared on the same texts.
    "max_text_length": 64,
    "tasks": [
        {"kind": "retrieval", "name": "easy-vqa retrieval", "data": "easy-vqa", "galleries": 10},
        {"kind": "zero-shot", "name": "easy-vqa shapes zero-shot", "data": "easy-vqa-shapes"},
        {"kind": "zero-shot", "name": "easy-vqa colours zero-shot", "data": "easy-vqa-colours",
         "templates": ["a {} shape.", "a photo of a {} shape.", "a drawing of a {} shape."]},
        {"kind": "linear-probe", "name": "digits linear probe", "modality": "image", "data": "digits"},
        {"kind": "linear-probe", "name": "easy-vqa shapes linear probe", "modality": "image",
         "data": "easy-vqa-shapes"},
        {"kind": "linear-probe", "name": "easy-vqa colours linear probe", "modality": "image",
         "data": "easy-vqa-colours"},
        {"kind": "linear-probe", "name": "BBC News linear probe", "modality": "text", "data": "bbc-news"},
        # BBC News sweeps the learning rate (chosen on validation, per model): the pretrained and the
        # random text encoder want different rates, and one fixed rate favours one of them. VQA's
        # 3e-4 won the sweeps over 1e-4, 3e-4 and 1e-3 on every model tried (BENCHMARKS.md).
        {"kind": "finetune-text", "name": "BBC News fine-tune", "data": "bbc-news", "lr_sweep": [3e-4, 1e-3],
         "settings": {"epochs": 6, "batch_size": 32}},
        {"kind": "finetune-multimodal", "name": "easy-vqa VQA fine-tune", "data": "easy-vqa", "limit": 6000,
         "settings": {"lr": 3e-4, "epochs": 3, "batch_size": 64}},
    ],
}
