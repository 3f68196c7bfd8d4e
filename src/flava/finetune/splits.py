"""A task's splits turned into tensors once (tokens, image pixels cached at the model's size,
targets) and the task's metrics scored on a split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .. import scores as M
from ..data.decode import open_image
from ..data.members import BadSample
from ..data.transforms import CLIP_MEAN, CLIP_STD, normalize, resize_center_crop
from ..errors import DataError
from .examples import ImageExample, MultimodalExample
from .settings import MAX_CONFUSION_ANSWERS

# Rows of dense VQA targets built at a time when scoring (VQAv2 val is 214k × 3,129 answers).
VQA_SCORE_CHUNK = 8192
# Unusable images named in the error (all are counted).
NAMED_BAD = 5


@dataclass
class Split:
    """One split turned into tensors once: token lists, image rows, targets."""

    tokens: list[tuple[list[int], list[int]]]
    targets: torch.Tensor
    """[N] class indices (long) or regression targets (float); unused for VQA."""
    soft: list[dict[int, float]] | None = None
    """VQA soft targets per example."""
    image_index: torch.Tensor | None = None
    """[N] rows of the shared image cache."""
    features: torch.Tensor | None = None
    """[N, D] frozen-encoder features, once computed."""

    def __len__(self) -> int:
        return len(self.targets)

    def eval_order(self) -> list[int]:
        """An order that batches alike examples: by image (shared image passes), else by length."""
        if self.image_index is not None:
            return torch.argsort(self.image_index, stable=True).tolist()
        return sorted(range(len(self)), key=lambda i: len(self.tokens[i][0]))


@dataclass
class Images:
    """Every distinct image of a task, resized and center-cropped once, kept as uint8 (a quarter
    of float32's memory); normalised per batch, which gives exactly `eval_transform`'s values."""

    pixels: torch.Tensor
    """[M, 3, S, S] uint8."""
    mean: tuple[float, ...] = CLIP_MEAN
    """The model's per-channel pixel mean (its config's image_mean)."""
    std: tuple[float, ...] = CLIP_STD
    """The model's per-channel pixel standard deviation."""

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised pixels of the distinct images, each row's position among them)."""
        unique, inverse = torch.unique(rows, return_inverse=True)
        return normalize(self.pixels[unique].float().div_(255.0), self.mean, self.std), inverse


def image_cache(splits: list[list[MultimodalExample]] | list[list[ImageExample]], size: int,
                mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD,
                ) -> tuple[Images, list[torch.Tensor]]:
    keys: dict = {}
    refs = []
    rows = []
    for examples in splits:
        idx = []
        for ex in examples:
            key = id(ex.image) if isinstance(ex.image, Image.Image) else ex.image
            if key not in keys:
                keys[key] = len(refs)
                refs.append(ex.image)
            idx.append(keys[key])
        rows.append(torch.tensor(idx, dtype=torch.long))
    pixels = torch.empty((len(refs), 3, size, size), dtype=torch.uint8)
    bad = []  # all of them: named one at a time, a folder of broken files took a run per file to find
    for i, ref in enumerate(refs):
        try:
            image = open_image(ref)
        except BadSample as e:
            bad.append((ref, e.kind))
            continue
        arr = np.asarray(resize_center_crop(image, size), dtype=np.uint8)
        pixels[i] = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    if len(bad) == 1:
        raise DataError(f"image {bad[0][0]}: {bad[0][1]}; fix or remove it from the task")
    if bad:
        first = f"; the first {NAMED_BAD}" if len(bad) > NAMED_BAD else ""
        named = ", ".join(f"{ref} ({why})" for ref, why in bad[:NAMED_BAD])
        raise DataError(f"{len(bad)} of the {len(refs)} images cannot be used{first}: {named}; fix or remove them "
                        "from the task")
    return Images(pixels, tuple(mean), tuple(std)), rows


def dense_soft(soft: list[dict[int, float]], num_answers: int) -> torch.Tensor:
    t = torch.zeros((len(soft), num_answers))
    for i, d in enumerate(soft):
        for a, s in d.items():
            t[i, a] = s
    return t



def part_scores(kind: str, names: tuple[str, ...], logits: torch.Tensor, split: Split, num_classes: int,
                parts: dict[str, int]) -> dict[str, float]:
    """The metrics of a split made of named consecutive parts (MNLI: matched, mismatched), as the
    paper reports them: each part scored alone ("accuracy (matched)"), and each metric the parts'
    mean."""
    each, start = {}, 0
    for part, n in parts.items():
        rows = slice(start, start + n)
        sub = Split(split.tokens[rows], split.targets[rows], split.soft[rows] if split.soft is not None else None)
        each[part] = split_scores(kind, names, logits[rows], sub, num_classes)[0]
        start += n
    mean = {name: float(np.mean([m[name] for m in each.values()])) for name in next(iter(each.values()))}
    return {**mean, **{f"{name} ({part})": v for part, m in each.items() for name, v in m.items()}}


def split_scores(kind: str, names: tuple[str, ...], logits: torch.Tensor, split: Split, num_classes: int):
    """(metrics dict, predictions, probabilities or None, confusion or None)."""
    out: dict[str, float] = {}
    if kind == "regression":
        values = logits[:, 0].double().numpy()
        y = split.targets.double().numpy()
        for name in names:
            out[name] = getattr(M, name)(values, y)
        # Beside the correlations, never instead (lower is better: no metric to choose states by).
        out["mae"] = M.mean_absolute_error(values, y)
        return out, values, None, None
    preds = logits.argmax(dim=1).numpy()
    if kind == "vqa":
        total = 0.0
        for start in range(0, len(preds), VQA_SCORE_CHUNK):
            chunk = split.soft[start:start + VQA_SCORE_CHUNK]
            total += M.vqa_score(preds[start:start + len(chunk)], dense_soft(chunk, num_classes).numpy()) * len(chunk)
        out["vqa_score"] = total / len(preds)
        confusion = None
        if num_classes <= MAX_CONFUSION_ANSWERS:
            answered = [i for i, d in enumerate(split.soft) if d]
            if answered:
                top = [min(split.soft[i], key=lambda a: (-split.soft[i][a], a)) for i in answered]
                confusion = M.confusion_matrix(preds[answered], np.array(top), num_classes)
        return out, preds, None, confusion
    y = split.targets.numpy()
    probs = torch.softmax(logits.double(), dim=1).numpy()
    for name in names:
        if name == "auroc":
            out[name] = M.auroc(probs[:, 1], y)
        elif name == "f1":
            out[name] = M.f1_binary(preds, y)
        else:
            out[name] = getattr(M, name)(preds, y)
    return out, preds, probs, M.confusion_matrix(preds, y, num_classes)

