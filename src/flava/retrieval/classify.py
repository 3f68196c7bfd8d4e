"""Zero-shot classification of raw images by prompt ensembles (CLIP's recipe)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.tokenizer import TextTokenizer
from ..errors import DataError, InputError
from ..evaluate.zero_shot import CLIP_TEMPLATES, TEMPLATE_SETS, class_embeddings, parse_templates, prompt_name
from ..model.flava import FlavaModel
from .embed import Embedder


def split_list(value: str, what: str, separator: str = ",") -> list[str]:
    """Names separated by `separator`, each stripped: `flava classify --classes` and the server's
    `classes` field read a list with this one parser."""
    items = [v.strip() for v in value.split(separator)]
    if any(not i for i in items[:-1]):  # "a,,b" (a trailing separator is no name left out)
        raise InputError(f"{what} {value!r} holds an empty name between {separator!r}s; name each one")
    items = [i for i in items if i]
    if not items:
        raise InputError(f"no {what} given in {value!r}; write them separated by {separator!r}")
    return items


def _names_a_file(value: str) -> bool:
    """Whether `value` is a file's path; a list longer than a file name can be (twenty class
    names) is none, where asking the OS had raised ENAMETOOLONG."""
    try:
        return Path(value).is_file()
    except (OSError, ValueError):
        return False


def read_list(value: str, what: str, separator: str = ",") -> list[str]:
    """A list separated by `separator` (`split_list`), or a file with one entry per line."""
    p = Path(value)
    if _names_a_file(value):
        items = [line.strip() for line in p.read_text(encoding="utf-8-sig", errors="replace").splitlines()]
        items = [i for i in items if i]
        if not items:
            raise InputError(f"no {what} given in {value!r}; write them separated by {separator!r}, or one a line "
                             "in a file")
        return items
    if separator not in value and p.suffix.lower() in (".txt", ".csv", ".tsv"):  # a file name, mistyped
        raise InputError(f"{what} file {value}: no such file (give {what} separated by {separator!r}, or a file "
                         "with one a line)")
    return split_list(value, what, separator)


def templates_from(value: str | None) -> tuple[str, ...]:
    """`--templates`: what `parse_templates` takes, or a file with one template per line."""
    if value is not None and value.strip().lower() not in TEMPLATE_SETS and _names_a_file(value):
        return parse_templates(read_list(value, "templates", "|"))
    if value is not None and "{}" not in value and Path(value).suffix.lower() in (".txt", ".csv", ".json"):
        raise InputError(f"--templates {value}: no such file (give a file of templates, one per line, a template "
                         "with one {}, or a named set)")
    return parse_templates(value)


@dataclass
class Prediction:
    image: str
    top: list[tuple[str, float]]
    """(class, probability), best first."""
    error: str | None = None


def check_classes(classes: Sequence[str], tokenizer: TextTokenizer | None = None) -> None:
    """InputError for a class named twice (its two probabilities would split one class's), or, given
    the model's tokenizer, for classes it reads as the same token ids ('Cat' and 'cat' to an uncased
    one, emoji that are all [UNK]): their prompts embed alike, so they tie exactly."""
    seen: set[str] = set()
    for c in classes:  # a set: a request's 100,000 names were checked pairwise for minutes
        if c in seen:
            raise InputError(f"class {c!r} is named twice")
        seen.add(c)
    if tokenizer is None:
        return
    read: dict[tuple[int, ...], list[str]] = {}
    tokens = {}
    for c in classes:  # as the prompts read them: dark_red and "dark red" are one
        ids, tokens[c] = tokenizer.pieces(prompt_name(c))
        read.setdefault(ids, []).append(c)
    same = next((names for names in read.values() if len(names) > 1), None)
    if same is not None:
        names = ", ".join(repr(c) for c in same[:-1]) + f" and {same[-1]!r}"
        pieces = " ".join(repr(t) for t in tokens[same[0]]) or "nothing"
        raise InputError(f"classes {names} are the same to this model's tokenizer (each reads as {pieces}), so "
                         "they would tie; name classes it tells apart")


class ZeroShotClassifier:
    """Images against the prompt-ensemble embedding of each class; probabilities are the softmax
    of the cosine similarities times the model's learned logit scale."""

    def __init__(self, model: FlavaModel, classes: list[str], templates: tuple[str, ...] = CLIP_TEMPLATES,
                 batch_size: int = 32, class_vectors: np.ndarray | None = None):
        """`class_vectors`: the classes' [C, D] prompt-ensemble embeddings when the caller made them
        already (the server does, a few prompts per model call)."""
        if isinstance(classes, str):  # iterated, a string had been one class per character
            raise InputError(f"classes must be a list of class names; got the string {classes[:40]!r} (for a comma-"
                             "separated list: classes.split(','))")
        check_classes(classes, model.processor.tokenizer)
        self.classes = list(classes)
        self.embedder = Embedder(model, batch_size)
        if class_vectors is None:
            class_vectors = class_embeddings(model, classes, model.processor.tokenizer, templates)
        self.class_vectors = class_vectors.astype(np.float32)
        self.scale = math.exp(float(model.logit_scale.detach()))

    def scores(self, image_vectors: np.ndarray) -> np.ndarray:
        """[N, C] cosine of each image embedding to each class embedding."""
        return image_vectors.astype(np.float64) @ self.class_vectors.T

    def probabilities(self, image_vectors: np.ndarray, scores: np.ndarray | None = None) -> np.ndarray:
        """[N, C] softmax of scale x cosine; `scores` when the caller has them already."""
        logits = self.scale * (self.scores(image_vectors) if scores is None else scores)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, images: list, top_k: int = 5) -> list[Prediction]:
        """One prediction per image (one image alone too); an unusable image gets its error and the
        others go on."""
        if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)) and not (
                isinstance(images, np.ndarray) and images.ndim == 4):
            images = [images]
        out = []
        for start in range(0, len(images), self.embedder.batch_size):
            chunk = images[start:start + self.embedder.batch_size]
            good, tensors, errors = [], [], {}
            for i, im in enumerate(chunk):
                try:
                    tensors.append(self.embedder.processor.image(im))
                    good.append(i)
                except DataError as e:
                    errors[i] = str(e)
            probs = {}
            if tensors:
                import torch

                p = self.probabilities(self.embedder.pixels(torch.stack(tensors)))
                probs = dict(zip(good, p))
            for i, im in enumerate(chunk):
                name = str(im) if isinstance(im, (str, os.PathLike)) else f"image {start + i}"
                if i in errors:
                    out.append(Prediction(name, [], errors[i]))
                    continue
                order = np.argsort(-probs[i], kind="stable")[:top_k]
                out.append(Prediction(name, [(self.classes[j], float(probs[i][j])) for j in order]))
        return out
