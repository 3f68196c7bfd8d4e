"""FLAVA: one model for vision, language and vision-and-language tasks."""

import sys as _sys
from os.path import basename as _basename


def _interrupted_while_starting(kind, value, traceback, _previous=_sys.excepthook):
    if issubclass(kind, KeyboardInterrupt):
        print("flava: interrupted while starting", file=_sys.stderr)
    else:
        _previous(kind, value, traceback)


# The command line (the `flava` script, `python -m flava.cli`), before its `main` handles signals:
# a Ctrl-C while torch imports (the first seconds) ends in one line, not a traceback through the
# imports. A library user's own hook is left alone.
if _sys.argv and (_basename(_sys.argv[0]) == "flava" or _sys.argv[0] == "-m"):
    _sys.excepthook = _interrupted_while_starting


def _last_at_exit() -> None:
    stopping = _sys.modules.get("flava.stopping")
    if stopping is not None:
        stopping.ignored_at_the_end()


# Registered before torch and multiprocessing are imported, so that it runs after their exit
# handlers (last registered, first run): those (loader workers terminated and joined) stay
# interruptible by `stopping.end_with`'s handlers.
__import__("atexit").register(_last_at_exit)

from .config import (
    CodebookConfig,
    FlavaConfig,
    ImageEncoderConfig,
    MultimodalEncoderConfig,
    TextEncoderConfig,
    load_config,
    preset,
)
from .data.processor import Processor
from .errors import CheckpointError, ConfigError, DataError, FlavaError, InputError
from .loading import load, load_codebook
from .model import FlavaImageCodebook, FlavaModel

__version__ = "0.1.0"


def load_task(directory, device=None):
    """A fine-tuned task model (written by `flava finetune`) ready to `.predict(texts=..., images=...)`;
    see `flava.finetune.taskmodel.TaskModel`. Imported on first use: the package root stays light."""
    from .finetune.load import load_task as _load_task

    return _load_task(directory, device=device)


__all__ = [
    "CheckpointError", "CodebookConfig", "ConfigError", "DataError", "FlavaConfig", "FlavaError",
    "FlavaImageCodebook", "FlavaModel", "ImageEncoderConfig", "InputError", "MultimodalEncoderConfig",
    "Processor", "TextEncoderConfig", "load", "load_codebook", "load_config", "load_task", "preset",
]
