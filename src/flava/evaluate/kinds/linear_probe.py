"""Linear probes (the paper's vision and language rows): L-BFGS logistic regression on the image or
text encoder's CLS features (`modality`), λ chosen on validation; data from folders of class folders
or tables of text and label (`train`, `val`, `test`), or packaged digits, easy-vqa, BBC News."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...errors import ConfigError, DataError
from ..packaged import bbc_news_splits, digits, easy_vqa_classes
from ..pictures import classifier_pictures
from ..readers.labels import class_names, look_alike_notes
from ..readers.splits import subsample
from ..results import Measured, percent
from ..task_spec import LIMIT, PATH, TaskSpec, image_folder, labelled_text, one_of, one_source
from . import TaskKind, register

Split = tuple[list, np.ndarray]
"""Inputs (images or texts) and their class indices."""
IMAGE_DATA = ("digits", "easy-vqa-shapes", "easy-vqa-colours")


@dataclass
class ProbeData:
    modality: str
    train: Split
    val: Split | None
    test: Split
    classes: list[str]
    seed: int = 0
    """Seeds the validation hold-out when the task has no validation split."""
    notes: list[str] = field(default_factory=list)
    """What reading the data found worth saying (look-alike labels, empty class folders)."""


def _text_splits(t: TaskSpec, notes: list[str]) -> tuple[Split, Split | None, Split, list[str]]:
    xtr, ltr = labelled_text(t.path(t.spec["train"]), t.where)
    classes = class_names(ltr)  # as `flava finetune` orders them
    notes += look_alike_notes(ltr)
    index = {c: i for i, c in enumerate(classes)}

    def labelled(key: str) -> Split:
        x, labels = labelled_text(t.path(t.spec[key]), t.where)
        unknown = sorted(set(labels) - set(classes))
        if unknown:
            raise DataError(f"{t.where}: {t.spec[key]} has labels {unknown[:5]} outside the training labels "
                            f"{classes[:10]}")
        return x, np.array([index[c] for c in labels])

    test = labelled("test")
    return (xtr, np.array([index[c] for c in ltr])), labelled("val") if "val" in t.spec else None, test, classes


def read(t: TaskSpec) -> ProbeData:
    one_source(t, {"data": (), "train": ("val", "test")})
    modality, data = t.spec.get("modality", "image"), t.data
    val, notes = None, []
    if data == "digits":
        xtr, ytr, xte, yte = digits()
        classes = [str(i) for i in range(10)]
    elif data in ("easy-vqa-shapes", "easy-vqa-colours"):
        xtr, ytr, classes = easy_vqa_classes(data, "train")
        val = easy_vqa_classes(data, "val")[:2]
        xte, yte, _ = easy_vqa_classes(data, "test")
    elif data == "bbc-news":
        splits, classes = bbc_news_splits()
        (xtr, ytr), val, (xte, yte) = splits["train"], splits["val"], splits["test"]
    elif "train" in t.spec and "test" in t.spec:
        if modality == "image":
            xtr, ytr, classes = image_folder(t.path(t.spec["train"]), t.where, notes=notes)
            xte, yte, _ = image_folder(t.path(t.spec["test"]), t.where, classes, notes)
            if "val" in t.spec:
                val = image_folder(t.path(t.spec["val"]), t.where, classes, notes)[:2]
            notes += look_alike_notes([classes[i] for i in ytr], "image")
        else:
            (xtr, ytr), val, (xte, yte), classes = _text_splits(t, notes)
    else:
        raise ConfigError(f"{t.where}: a linear-probe task needs data, or train and test")
    limit = t.spec.get("limit")
    if limit is not None:  # a seeded choice: folders and packaged sets list their items class by class
        keep = subsample(list(range(len(ytr))), limit, t.seed)
        xtr = xtr[keep] if isinstance(xtr, np.ndarray) else [xtr[i] for i in keep]
        ytr = np.asarray(ytr)[keep]
    present = sorted(set(np.asarray(ytr).tolist()))
    if len(present) < 2:  # refused while the data is checked, before any model is loaded
        raise ConfigError(f"{t.where}: a linear probe needs at least two classes in train; found only "
                          f"{', '.join(repr(classes[i]) for i in present) or 'none'}")
    # What the probe would refuse once features were computed, after the tasks before it (their report lost).
    after = f" (limit {limit})" if limit is not None else ""
    for name, split in (("test", (xte, yte)), ("val", val)):
        unseen = sorted(set(np.asarray(split[1]).tolist()) - set(present)) if split is not None else []
        if unseen:
            raise ConfigError(f"{t.where}: the {name} split holds classes the training split{after} lacks "
                              f"({', '.join(repr(classes[i]) for i in unseen[:5])}): a linear probe only predicts "
                              "classes it trained on; raise limit, or give more training examples")
    if val is None:
        from ..probe import VAL_FRACTION, stratified_holdout

        if not stratified_holdout(np.asarray(ytr), VAL_FRACTION, t.seed).any():
            raise ConfigError(f"{t.where}: too few training examples ({len(ytr)}"
                              + (f", by limit {limit}" if limit is not None else "") + ") to hold out a validation "
                              "split; give a \"val\" split, or more training examples")
    if modality == "text" and data in IMAGE_DATA:
        raise ConfigError(f"{t.where}: {data} holds images; use modality 'image'")
    if modality == "image" and data == "bbc-news":
        raise ConfigError(f"{t.where}: bbc-news holds text; use modality 'text'")
    return ProbeData(modality, (xtr, ytr), val, (xte, yte), classes, t.seed, notes)


def size(d: ProbeData) -> str:
    sizes = "/".join(str(len(p[0])) for p in (d.train, d.val, d.test) if p is not None)
    return f"{d.modality} {sizes} examples, {len(d.classes)} classes"


def run(d: ProbeData, model, tokenizer, progress) -> Measured:
    from ..features import image_cls_features, text_cls_features
    from ..probe import linear_probe

    parts = {k: p for k, p in (("train", d.train), ("val", d.val), ("test", d.test)) if p is not None}
    total = sum(len(p[0]) for p in parts.values())
    done = 0
    features = {}
    for key, (x, _) in parts.items():
        step = lambda n, t, base=done: progress(base + n, total)  # noqa: E731
        if d.modality == "image":
            features[key] = image_cls_features(model, x, progress=step)
        else:
            features[key] = text_cls_features(model, x, tokenizer, progress=step)
        done += len(x)
    r = linear_probe(features["train"], d.train[1], features["test"], d.test[1],
                     val=(features["val"], d.val[1]) if d.val is not None else None, seed=d.seed)
    return Measured(percent({"top-1": r.accuracy}), r.metrics, [*d.notes, f"λ = {r.lam:.3g} chosen on validation"],
                    detail={"result": r, "classes": d.classes}, examples={"top-1": len(d.test[1])})


register(TaskKind("linear-probe", frozenset({"modality", "data", "train", "val", "test", "limit"}),
                  lambda spec: "vision" if spec.get("modality", "image") == "image" else "language",
                  read, size, run, classifier_pictures,
                  datasets=("digits", "easy-vqa-shapes", "easy-vqa-colours", "bbc-news"),
                  fields={"modality": one_of("image", "text"), "train": PATH, "val": PATH, "test": PATH,
                          "limit": LIMIT}))
