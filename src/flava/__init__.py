"""FLAVA: one model for vision, language and vision-and-language tasks."""

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
