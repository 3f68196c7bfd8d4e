"""The data fine-tuning trains on: examples split into train / val / test (`TextData`,
`MultimodalData`, `ImageData`), the metric names it reports, and the checks every reader (and
anyone building data by hand) runs, raising `DataError` / `ConfigError` at the first problem.
The readers that fill these holders are `flava.evaluate.readers`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from ..data.members import Blob
from ..errors import ConfigError, DataError

# Metric names the fine-tuner knows (functions of flava.scores).
METRICS = ("accuracy", "f1", "matthews_corrcoef", "pearson", "spearman", "auroc", "vqa_score")

@dataclass
class TextExample:
    text: str
    label: int | float
    """Class index into the task's `label_names`, or the target value of a regression task."""
    text2: str | None = None
    """The second sentence of a pair task; encoded as [CLS] text [SEP] text2 [SEP]."""


@dataclass
class TextData:
    """The examples of a text classification (or regression, when `label_names` is empty) task."""

    name: str
    train: list[TextExample]
    val: list[TextExample]
    test: list[TextExample]
    label_names: list[str]
    metrics: tuple[str, ...]
    """Reported on val and test; the first one picks the best checkpoint."""
    notes: list[str] = field(default_factory=list)
    """What the reader skipped, and why."""
    test_parts: dict[str, int] | None = None
    """A test split of named consecutive parts (MNLI: matched, then mismatched) and their sizes:
    each part is scored alone and the task's metrics are the parts' mean, as the paper reports."""

    @property
    def regression(self) -> bool:
        return not self.label_names


@dataclass
class MultimodalExample:
    image: Path | Image.Image
    text: str
    label: int = -1
    """Class index (classification tasks)."""
    answers: dict[int, float] | None = None
    """VQA tasks: answer index -> soft score in (0, 1]; answers outside the vocabulary are absent."""


@dataclass
class MultimodalData:
    """The examples of an image + text task classified from CLS_M: single-label ('classification') or
    multi-label soft-scored answers ('vqa')."""

    name: str
    train: list[MultimodalExample]
    val: list[MultimodalExample]
    test: list[MultimodalExample]
    label_names: list[str]
    """Class names, or the answer vocabulary of a VQA task."""
    metrics: tuple[str, ...]
    kind: str = "classification"
    notes: list[str] = field(default_factory=list)


@dataclass
class ImageExample:
    image: Path | Image.Image
    label: int
    """Class index into the task's `label_names`."""


@dataclass
class ImageData:
    """The examples of an image classification task, classified from the image encoder's CLS state."""

    name: str
    train: list[ImageExample]
    val: list[ImageExample]
    test: list[ImageExample]
    label_names: list[str]
    metrics: tuple[str, ...] = ("accuracy",)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- checks


def _check_metrics(name: str, metrics: Sequence[str]) -> None:
    if not metrics:
        raise ConfigError(f"task {name!r} names no metric")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"task {name!r}: unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")


def _check_nonempty(name: str, splits: dict[str, list]) -> None:
    for split, rows in splits.items():
        if not rows:
            raise DataError(f"task {name!r} has an empty {split} split; every split needs at least one example")


def _check_both_classes(name: str, splits: dict[str, list], labels: Callable[[list], list[int]]) -> None:
    # AUROC is undefined on a split with one class; say so before training rather than after.
    for split in ("val", "test"):
        seen = set(labels(splits[split]))
        if len(seen) < 2:
            raise DataError(f"task {name!r}: AUROC needs both classes in the {split} split, which only has "
                            f"class {sorted(seen)}")


def check_text_data(data: TextData) -> None:
    """DataError/ConfigError for an empty split, a label outside the label set or a bad metric."""
    splits = {"train": data.train, "val": data.val, "test": data.test}
    _check_nonempty(data.name, splits)
    _check_metrics(data.name, data.metrics)
    regression_metrics = {"pearson", "spearman"}
    if data.regression != (set(data.metrics) <= regression_metrics):
        kind = "a regression" if data.regression else "a classification"
        raise ConfigError(f"task {data.name!r} is {kind} task but asks for {', '.join(data.metrics)}")
    n = len(data.label_names)
    if n == 1:
        raise DataError(f"task {data.name!r} has one label ({data.label_names[0]}); a classifier needs at least two "
                        f"(no label names at all make a regression task)")
    for split, rows in splits.items():
        for i, ex in enumerate(rows):
            if not isinstance(ex.text, str) or (ex.text2 is not None and not isinstance(ex.text2, str)):
                raise DataError(f"task {data.name!r}, {split} example {i}: texts must be strings")
            if data.regression:
                if isinstance(ex.label, bool) or not isinstance(ex.label, (int, float)) or not math.isfinite(ex.label):
                    raise DataError(f"task {data.name!r}, {split} example {i}: regression target {ex.label!r} "
                                    f"is not a finite number")
            elif isinstance(ex.label, bool) or not isinstance(ex.label, (int, np.integer)) or not 0 <= ex.label < n:
                raise DataError(f"task {data.name!r}, {split} example {i}: label {ex.label!r} is not a class "
                                f"index in [0, {n}) ({', '.join(data.label_names)})")
    if n and n != 2 and ("f1" in data.metrics or "auroc" in data.metrics):
        raise ConfigError(f"task {data.name!r}: f1 and auroc are binary metrics but the task has {n} classes")
    if "auroc" in data.metrics:
        _check_both_classes(data.name, splits, lambda rows: [ex.label for ex in rows])
    parts = data.test_parts
    if parts is not None and (not parts or min(parts.values()) < 1 or sum(parts.values()) != len(data.test)):
        raise DataError(f"task {data.name!r}: test_parts {parts} must be non-empty parts that add up to the "
                        f"{len(data.test)} test examples")


def _check_image_classifier(data, kind: str, texts: bool) -> None:
    """What image and image + text tasks share: splits, labels (or VQA soft scores), metrics, and
    every image a path that exists or a PIL image."""
    splits = {"train": data.train, "val": data.val, "test": data.test}
    _check_nonempty(data.name, splits)
    _check_metrics(data.name, data.metrics)
    n = len(data.label_names)
    if n < 2:
        raise DataError(f"task {data.name!r} has {n} label(s); a classifier needs at least two")
    allowed = {"vqa_score"} if kind == "vqa" else {"accuracy", "f1", "matthews_corrcoef", "auroc"}
    if not set(data.metrics) <= allowed:
        what = "image classification" if not texts else kind
        raise ConfigError(f"task {data.name!r} ({what}) cannot report {', '.join(data.metrics)}")
    if n != 2 and ("f1" in data.metrics or "auroc" in data.metrics):
        raise ConfigError(f"task {data.name!r}: f1 and auroc are binary metrics but the task has {n} classes")
    missing = []
    for split, rows in splits.items():
        for i, ex in enumerate(rows):
            where = f"task {data.name!r}, {split} example {i}"
            if texts and not isinstance(ex.text, str):
                raise DataError(f"{where}: the text must be a string")
            if isinstance(ex.image, Path):
                if not ex.image.is_file():
                    missing.append((split, ex.image))
            elif not isinstance(ex.image, (Image.Image, Blob)):  # Blob: a table's image bytes (parquet)
                raise DataError(f"{where}: the image must be a path or a PIL image, not {type(ex.image).__name__}")
            if kind == "vqa":
                if ex.answers is None:
                    raise DataError(f"{where}: a VQA example needs `answers` (answer index -> soft score)")
                for a, s in ex.answers.items():
                    if not 0 <= a < n or not 0 < s <= 1:
                        raise DataError(f"{where}: answer {a} with score {s} is outside the {n} answers or (0, 1]")
            elif isinstance(ex.label, bool) or not isinstance(ex.label, (int, np.integer)) or not 0 <= ex.label < n:
                raise DataError(f"{where}: label {ex.label!r} is not a class index in [0, {n})")
    if missing:
        counts = {s: sum(1 for m, _ in missing if m == s) for s in dict.fromkeys(m for m, _ in missing)}
        raise DataError(f"task {data.name!r}: {len(missing)} image file(s) do not exist ("
                        + ", ".join(f"{n} in {s}" for s, n in counts.items()) + f"), e.g. {missing[0][1]} ("
                        f"{missing[0][0]}); check the image paths (a table's are relative to its folder)")
    if "auroc" in data.metrics:
        _check_both_classes(data.name, splits, lambda rows: [ex.label for ex in rows])


def check_multimodal_data(data: MultimodalData) -> None:
    """Like `check_text_data`, plus: every image file exists, VQA soft scores lie in (0, 1]."""
    if data.kind not in ("classification", "vqa"):
        raise ConfigError(f"task {data.name!r}: kind {data.kind!r} is neither 'classification' nor 'vqa'")
    _check_image_classifier(data, data.kind, texts=True)


def check_image_data(data: ImageData) -> None:
    """Like `check_multimodal_data` for image classification: splits, labels, metrics, files."""
    _check_image_classifier(data, "classification", texts=False)

