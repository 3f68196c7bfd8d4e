"""Batched feature extraction for evaluation: eval mode, no gradients, numpy out.

Two kinds of feature per modality:

- *embeddings*: the contrastive vectors, normalize(projection(LN(H)[:, 0])), for zero-shot
  retrieval and classification;
- *CLS features*: LN(H)[:, 0], the encoder's CLS after its final LayerNorm and before the
  projection: what the paper's linear probes read.

Both run the encoders' `cls_only` path (the last block updates the CLS token alone; text
batches also skip padding in the linear layers), which returns the CLS state of a full pass.
Images are decoded and transformed one batch at a time, so memory stays bounded by the batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.processor import load_image
from ..data.members import TarMember
from ..data.tokenizer import TextTokenizer
from ..data.transforms import CLIP_MEAN, CLIP_STD, Stats, eval_transform, single_threaded
from ..errors import DataError, InputError
from ..model.flava import FlavaModel

ImageLike = Image.Image | np.ndarray | str | os.PathLike | TarMember
Progress = Callable[[int, int], None]
"""Called after every batch with (items done, items in total)."""


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for the block; the model's previous mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def check_image_files(images: Sequence[ImageLike]) -> None:
    """DataError naming the first missing file and how many are missing, before any work."""
    paths = [Path(im) for im in images if isinstance(im, (str, os.PathLike))]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} of {len(paths)} image files are missing; the first is {missing[0]}")


def pixel_batches(images: Sequence[ImageLike], size: int, batch_size: int, mean: Stats = CLIP_MEAN,
                  std: Stats = CLIP_STD, squash_to: tuple[int, int] | None = None) -> Iterator[torch.Tensor]:
    """[b, 3, size, size] eval-transformed tensors (normalised by `mean`/`std`), decoded batch by batch."""
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1; got {batch_size}")
    for start in range(0, len(images), batch_size):
        with single_threaded():
            batch = torch.stack([eval_transform(load_image(im), size, mean, std, squash_to)
                                 for im in images[start:start + batch_size]])
        yield batch


def _run_images(model: FlavaModel, images: Sequence[ImageLike], batch_size: int,
                progress: Progress | None, embed: bool) -> np.ndarray:
    check_image_files(images)
    device = model.device
    width = model.config.projection_dim if embed else model.config.image.hidden_size
    out = [np.zeros((0, width), dtype=np.float32)]
    done = 0
    with evaluating(model):
        ic = model.config.image
        squash = model.processor.squash_to  # a transformers checkpoint's resize, as its processor has it
        for pixels in pixel_batches(images, ic.image_size, batch_size, ic.image_mean, ic.image_std, squash):
            state = model.encode_image_tokens(pixels.to(device), cls_only=True)
            feats = model.image_embedding(state) if embed else state.last_hidden_state[:, 0]
            out.append(feats.float().cpu().numpy())
            done += len(pixels)
            if progress is not None:
                progress(done, len(images))
    return np.concatenate(out)


def _run_texts(model: FlavaModel, texts: Sequence[str], tokenizer: TextTokenizer, batch_size: int,
               progress: Progress | None, embed: bool) -> np.ndarray:
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1; got {batch_size}")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise InputError(f"texts must be strings; item {bad} is a {type(texts[bad]).__name__}")
    device = model.device
    width = model.config.projection_dim if embed else model.config.text.hidden_size
    out = [np.zeros((0, width), dtype=np.float32)]
    with evaluating(model):
        for start in range(0, len(texts), batch_size):
            tok = tokenizer(list(texts[start:start + batch_size]))
            state = model.encode_text_tokens(tok.input_ids.to(device), tok.attention_mask.to(device), cls_only=True)
            feats = model.text_embedding(state) if embed else state.last_hidden_state[:, 0]
            out.append(feats.float().cpu().numpy())
            if progress is not None:
                progress(min(start + batch_size, len(texts)), len(texts))
    return np.concatenate(out)


def image_embeddings(model: FlavaModel, images: Sequence[ImageLike], batch_size: int = 64,
                     progress: Progress | None = None) -> np.ndarray:
    """[N, projection_dim] float32 L2-normalised contrastive image embeddings."""
    return _run_images(model, images, batch_size, progress, embed=True)


def text_embeddings(model: FlavaModel, texts: Sequence[str], tokenizer: TextTokenizer, batch_size: int = 256,
                    progress: Progress | None = None) -> np.ndarray:
    """[N, projection_dim] float32 L2-normalised contrastive text embeddings."""
    return _run_texts(model, texts, tokenizer, batch_size, progress, embed=True)


def image_cls_features(model: FlavaModel, images: Sequence[ImageLike], batch_size: int = 64,
                       progress: Progress | None = None) -> np.ndarray:
    """[N, image hidden size] float32: the image encoder's CLS after its final LayerNorm, before
    the projection (the paper's linear-probe feature)."""
    return _run_images(model, images, batch_size, progress, embed=False)


def text_cls_features(model: FlavaModel, texts: Sequence[str], tokenizer: TextTokenizer, batch_size: int = 256,
                      progress: Progress | None = None) -> np.ndarray:
    """[N, text hidden size] float32: the text encoder's CLS after its final LayerNorm, before
    the projection."""
    return _run_texts(model, texts, tokenizer, batch_size, progress, embed=False)
