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
from .errors import CheckpointError, ConfigError, DataError, FlavaError, InputError
from .hub import load, load_codebook
from .model import FlavaImageCodebook, FlavaModel

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "CodebookConfig", "ConfigError", "DataError", "FlavaConfig", "FlavaError",
    "FlavaImageCodebook", "FlavaModel", "ImageEncoderConfig", "InputError", "MultimodalEncoderConfig",
    "TextEncoderConfig", "load", "load_codebook", "load_config", "preset",
]
