"""Evaluation task kinds as records: one module in this package per kind, each registering a
`TaskKind` that says which keys its suite tasks hold, how their data is read and checked, how a
task runs on a model and what pictures its report gets. The suite and the report look kinds up
here; a new kind is one new module (found when the registry is first read) and its test.

Kinds import nothing from each other (an import-linter contract): what two of them share lives
beside this package (`flava.evaluate.lr_sweep`, `task_spec`, `packaged`, `pictures`).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import ConfigError, did_you_mean
from ..results import Measured, TaskResult
from ..task_spec import Field, TaskSpec

Progress = Callable[[int, int], None]


def _no_pictures(result: TaskResult, base: Path) -> list[str | None]:
    return []


@dataclass(frozen=True)
class TaskKind:
    name: str
    """The suite's `"kind"` value."""
    keys: frozenset[str]
    """Keys its tasks may hold besides those every task may (kind, name, domain, settings, seed)."""
    domain: Callable[[dict], str]
    """The domain a task averages into when it names none, from the task as written."""
    read: Callable[[TaskSpec], Any]
    """Reads and checks a task's data (every error before any task runs); returns what `run` takes."""
    size: Callable[[Any], str]
    """A short description of what `read` returned, for the plan printed before running."""
    run: Callable[[Any, Any, Any, Progress], Measured]
    """`run(read's result, model, tokenizer, progress(done, total))`."""
    pictures: Callable[[TaskResult, Path], list[str | None]] = _no_pictures
    """Writes the report's pictures of a result, named from `base` (a path prefix); returns their
    file names (None for a picture it chose not to draw)."""
    datasets: tuple[str, ...] = ()
    """The packaged data sets (`flava.evaluate.packaged`) a task may name with `"data": NAME`."""
    fields: Mapping[str, Field] = field(default_factory=dict)
    """What its keys must hold (`task_spec.check_fields`), checked before any task's data is read."""


_KINDS: dict[str, TaskKind] = {}
_loaded = False


def register(kind: TaskKind) -> TaskKind:
    if kind.name in _KINDS:
        raise ValueError(f"task kind {kind.name!r} is registered twice")
    stray = sorted(set(kind.fields) - kind.keys)
    if stray:
        raise ValueError(f"task kind {kind.name!r} checks keys it does not take: {stray}")
    _KINDS[kind.name] = kind
    return kind


def task_kinds() -> dict[str, TaskKind]:
    """Every registered kind by name (the registry itself: removing an entry unregisters it)."""
    global _loaded
    if not _loaded:
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
        _loaded = True
    return _KINDS


def task_kind(name: Any, where: str) -> TaskKind:
    kinds = task_kinds()
    if not isinstance(name, str) or name not in kinds:
        raise ConfigError(f"{where}: kind {name!r} is not a task kind{did_you_mean(str(name), kinds, 'choose one of')}")
    return kinds[name]
