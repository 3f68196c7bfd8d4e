"""Errors a user can cause. The CLI prints their message alone, without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FlavaError(Exception):
    """Base of every error whose message tells the user what to fix."""


class ConfigError(FlavaError, ValueError):
    """A config file or override names an unknown key or holds a bad value."""


class CheckpointError(FlavaError, ValueError):
    """A checkpoint directory is missing, incomplete, corrupt or disagrees with its config."""


class InputError(FlavaError, ValueError):
    """A tensor handed to the model has the wrong shape, size or values."""


class DataError(FlavaError, ValueError):
    """A data path matches nothing or a data set has no usable sample."""


class DataChanged(DataError):
    """A resume's data unlike the data its saved stream positions index: no --override can follow it."""


class DivergedError(FlavaError, RuntimeError):
    """Training stopped because its loss or gradients stayed non-finite."""


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line, else its type's name: libraries raise
    multi-line messages (tracebacks of worker processes) that one line of ours must quote."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def saved_before(e: DataError, step: int, where) -> DataError:
    """`e`, a run's data failing, with what was kept: the step it reached, saved in `where`."""
    return DataError(f"{e}; step {step} is saved in {where}: once the data is readable, continue with --resume")


def did_you_mean(name: str, choices: Iterable[str], known: str = "known keys") -> str:
    """'; did you mean X?' naming the nearest choice, else '; {known}: a, b, ...'."""
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(name), choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; {known}: {', '.join(choices)}"


class OutputError(FlavaError, OSError):
    """An output path cannot be written: a file in the way, no permission, a full disk."""
