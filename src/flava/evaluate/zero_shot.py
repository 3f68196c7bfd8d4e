"""Zero-shot evaluation with the contrastive embeddings: image-text retrieval and
classification by prompts, plus readers for the usual retrieval annotation files."""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.sources import csv_pairs
from ..data.tables import table_format
from ..data.tokenizer import TextTokenizer
from ..errors import ConfigError, DataError, InputError
from ..io.files import read_json
from ..model.flava import FlavaModel
from .. import scores as metrics
from .features import ImageLike, Progress, check_image_files, image_embeddings, text_embeddings

# --------------------------------------------------------------------------- retrieval


@dataclass
class RetrievalSet:
    """Images and the captions of each (COCO and Flickr30K have five per image)."""

    images: list[Path]
    captions: list[list[str]]

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class RetrievalResult:
    metrics: dict[str, float]
    """`metrics.retrieval_recall`: image_to_text_R@k, text_to_image_R@k, mean_recall (fractions)."""
    similarity: np.ndarray
    """[n_images, n_texts] cosine similarity of every image to every caption."""
    text_to_image: np.ndarray
    """[n_texts] image index of each caption (the captions flattened image by image)."""
    captions: list[str]
    """[n_texts] the flattened captions."""
    image_to_text_rank: np.ndarray
    """[n_images] 0-based rank of each image's best own caption (-1: image without captions)."""
    text_to_image_rank: np.ndarray
    """[n_texts] 0-based rank of each caption's image."""

    def top_captions(self, image: int, k: int = 5) -> list[tuple[str, float, bool]]:
        """The k captions most similar to image `image`: (caption, similarity, is it its own),
        most similar first (equal scores in caption order)."""
        order = np.argsort(-self.similarity[image], kind="stable")[:k]
        return [(self.captions[j], float(self.similarity[image, j]), bool(self.text_to_image[j] == image))
                for j in order]


def retrieval(
    model: FlavaModel,
    images: Sequence[ImageLike],
    captions_per_image: Sequence[Sequence[str]],
    tokenizer: TextTokenizer,
    ks: Sequence[int] = (1, 5, 10),
    image_batch_size: int = 64,
    text_batch_size: int = 256,
    progress: Progress | None = None,
) -> RetrievalResult:
    """Zero-shot image↔text retrieval by the cosine of the contrastive embeddings.

    `captions_per_image[i]` are image i's captions; an image may have none (it is then only a
    distractor for text→image). A text repeated across images is right for each of them
    (`scores.retrieval_ranks`). `progress` sees images then distinct captions, out of their sum.
    """
    if len(images) != len(captions_per_image):
        raise InputError(f"{len(images)} images but captions for {len(captions_per_image)}")
    if len(images) == 0:
        raise InputError("no images to retrieve from")
    captions = [c for caps in captions_per_image for c in caps]
    t2i = np.array([i for i, caps in enumerate(captions_per_image) for _ in caps], dtype=np.int64)
    if not captions:
        raise InputError("no captions: every image's caption list is empty")
    check_image_files(images)
    # Each distinct text embedded once: a text repeated across images (COCO, Flickr30K) is one
    # answer for all of them, with one embedding whatever the batches.
    distinct, text_ids = np.unique(np.array(captions, dtype=object), return_inverse=True)
    total = len(images) + len(distinct)

    def image_progress(done, _):
        progress(done, total)

    def text_progress(done, _):
        progress(len(images) + done, total)
    img = image_embeddings(model, images, image_batch_size, image_progress if progress else None)
    txt = text_embeddings(model, list(distinct), tokenizer, text_batch_size, text_progress if progress else None)
    sim = img.astype(np.float64) @ txt.astype(np.float64)[text_ids].T
    i2t_rank, t2i_rank = metrics.retrieval_ranks(sim, t2i, text_ids)
    return RetrievalResult(metrics.retrieval_recall(sim, t2i, ks, text_ids), sim, t2i, captions, i2t_rank, t2i_rank)


def _retrieval_set(images: list[Path], captions: list[list[str]], what: str) -> RetrievalSet:
    if not images:
        raise DataError(f"{what} has no images")
    check_image_files(images)
    return RetrievalSet(images, captions)


def read_karpathy_json(path: str | os.PathLike, split: str, image_root: str | os.PathLike) -> RetrievalSet:
    """One split of a Karpathy-format annotation file (dataset_coco.json, dataset_flickr30k.json):
    `{"images": [{"filepath"?, "filename", "split", "sentences": [{"raw": ...}, ...]}, ...]}`.

    Image i is `image_root / filepath / filename` (no `filepath` for Flickr30K); its captions are
    its sentences' `raw` strings, in file order. Every image file must exist.
    """
    p = Path(path)
    data = read_json(p, "annotation file", DataError)
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise DataError(f'{p} is not in the Karpathy format: no top-level "images" list')
    root = Path(image_root)
    images, captions, splits = [], [], set()
    for n, entry in enumerate(entries):
        try:
            splits.add(entry["split"])
            if entry["split"] != split:
                continue
            images.append(root / entry.get("filepath", "") / entry["filename"])
            captions.append([s["raw"] for s in entry["sentences"]])
        except (KeyError, TypeError) as e:
            raise DataError(f"{p}: image entry {n} lacks a field ({e}); Karpathy entries need "
                            f'"filename", "split" and "sentences": [{{"raw": ...}}]') from None
    if not images:
        raise DataError(f"{p} has no images in split {split!r} (its splits: {', '.join(sorted(splits)) or 'none'})")
    return _retrieval_set(images, captions, f"{p} split {split!r}")


def read_retrieval_csv(path: str | os.PathLike) -> RetrievalSet:
    """A table (`flava.data.tables`: CSV, TSV, JSONL, parquet) with columns `image` and
    `caption`, one row per caption; rows naming the same image (after path normalisation) are that
    image's captions, images in order of first appearance. Relative image paths are relative to
    the file. Every image must exist."""
    table_format(path)
    source = csv_pairs(str(path))
    if source.rejected:  # an evaluation set must not shrink silently
        reasons = ", ".join(f"{n} {why}" for why, n in source.rejected.items())
        raise DataError(f"retrieval file {path} has unusable rows ({reasons}); fix or remove them")
    groups: dict[Path, list[str]] = {}
    for record in source.records:
        groups.setdefault(Path(os.path.normpath(record.image)), []).append(record.caption)
    return _retrieval_set(list(groups), list(groups.values()), f"retrieval file {path}")


# --------------------------------------------------------------------------- classification

# Prompt templates in the spirit of CLIP's 80 ImageNet templates: the plain photo prompt, then
# variations in image quality, rendering style, size and framing, which average out the wording
# and leave the class name.
CLIP_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a blurry photo of a {}.",
    "a low resolution photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a photo of one {}.",
    "a photo of many {}.",
    "a drawing of a {}.",
    "a painting of a {}.",
    "a sketch of a {}.",
    "a rendering of a {}.",
    "a black and white photo of a {}.",
    "art of the {}.",
    "a toy {}.",
    "itap of a {}.",
)
SHORT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
"""One prompt: cheaper, usually a little worse."""
TEMPLATE_SETS = {"clip": CLIP_TEMPLATES, "short": SHORT_TEMPLATES, "none": ("{}",)}


def parse_templates(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """Prompt templates as `flava classify`, the server's `/classify` and suites take them: None
    (CLIP's), a set's name ('clip', 'short', 'none'; any case), templates separated by '|', or a
    list; each template holds exactly one {} for the class name."""
    if value is None:
        return CLIP_TEMPLATES
    if isinstance(value, str):
        if value.strip().lower() in TEMPLATE_SETS:
            return TEMPLATE_SETS[value.strip().lower()]
        # One word without {} near a set's name is a mistyped set, not a template missing its {}.
        word = value.strip().lower()
        close = difflib.get_close_matches(word, TEMPLATE_SETS, n=1, cutoff=0.7) if word.isidentifier() else []
        if close:
            raise ConfigError(f"template set {value.strip()!r} is unknown; did you mean {close[0]!r}? (a template "
                              "itself holds one {} for the class name)")
        value = value.split("|")
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) for t in value):
        raise ConfigError(f"templates must be {', '.join(TEMPLATE_SETS)}, or strings each with one {{}}; "
                          f"got {value!r}")
    templates = tuple(t.strip() for t in value if t.strip())
    if not templates:
        raise ConfigError(f"no prompt templates given; use {', '.join(TEMPLATE_SETS)} or strings each with one {{}}")
    bad = next((t for t in templates if t.count("{}") != 1), None)
    if bad is not None:
        raise ConfigError(f"template {bad!r} must contain exactly one {{}} for the class name (or use "
                          f"{', '.join(TEMPLATE_SETS)})")
    return templates


@dataclass
class ZeroShotResult:
    top1: float
    """Share of images whose class scores highest (ties count against the image)."""
    top5: float
    """Top-min(5, C) accuracy: with fewer than 5 classes, top-C (always 1.0)."""
    predictions: np.ndarray
    """[N] argmax class of each image (the lowest index on an exact tie)."""
    confusion: np.ndarray
    """[C, C] row = true class, column = predicted class."""
    scores: np.ndarray
    """[N, C] cosine of each image to each class embedding."""

    @property
    def metrics(self) -> dict[str, float]:
        return {"top1": self.top1, "top5": self.top5}


def prompt_name(name: str) -> str:
    """A class name as prompts read it: underscores as spaces (a folder's dark_red: "a photo of a
    dark red."), whether it came from a folder or was named."""
    return name.replace("_", " ")


def class_embeddings(model: FlavaModel, class_names: Sequence[str], tokenizer: TextTokenizer,
                     templates: Sequence[str] = CLIP_TEMPLATES, batch_size: int = 256) -> np.ndarray:
    """[C, projection_dim]: per class, the normalised embeddings of every template filled with
    the class name (`prompt_name`), averaged, then renormalised (CLIP's prompt ensembling)."""
    if not class_names:
        raise InputError("no class names given")
    if not templates:
        raise InputError("no prompt templates given")
    bad = next((t for t in templates if t.count("{}") != 1), None)
    if bad is not None:
        raise InputError(f"prompt template {bad!r} must contain exactly one {{}} for the class name")
    prompts = [t.format(prompt_name(name)) for name in class_names for t in templates]
    emb = text_embeddings(model, prompts, tokenizer, batch_size).astype(np.float64)
    mean = emb.reshape(len(class_names), len(templates), -1).mean(axis=1)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def zero_shot_classification(
    model: FlavaModel,
    images: Sequence[ImageLike],
    labels: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    tokenizer: TextTokenizer,
    templates: Sequence[str] = CLIP_TEMPLATES,
    batch_size: int = 64,
    progress: Progress | None = None,
) -> ZeroShotResult:
    """Classify each image as the class whose prompt-ensemble embedding has the highest cosine
    with the image's embedding; `labels[i]` is image i's index into `class_names`."""
    y = np.asarray(labels)
    if len(y) != len(images):
        raise InputError(f"{len(images)} images but {len(y)} labels")
    if len(images) == 0:
        raise InputError("no images to classify")
    C = len(class_names)
    if C and (y.min() < 0 or y.max() >= C):
        raise InputError(f"labels must lie in [0, {C}) (one per class name); found {y.min()}..{y.max()}")
    check_image_files(images)
    classes = class_embeddings(model, class_names, tokenizer, templates)
    scores = image_embeddings(model, images, batch_size, progress).astype(np.float64) @ classes.T
    predictions = scores.argmax(axis=1)
    return ZeroShotResult(
        top1=metrics.topk_accuracy(scores, y, 1),
        top5=metrics.topk_accuracy(scores, y, 5),
        predictions=predictions,
        confusion=metrics.confusion_matrix(predictions, y, C),
        scores=scores,
    )
