"""FLAVA: one model for vision, language and vision-and-language tasks."""

from .codebook import FlavaImageCodebook
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
from .model import FlavaModel
from .storage import load, load_codebook

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "CodebookConfig", "ConfigError", "DataError", "FlavaConfig", "FlavaError",
    "FlavaImageCodebook", "FlavaModel", "ImageEncoderConfig", "InputError", "MultimodalEncoderConfig",
    "TextEncoderConfig", "load", "load_codebook", "load_config", "preset",
]
