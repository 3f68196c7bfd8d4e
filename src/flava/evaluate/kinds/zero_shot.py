"""Zero-shot image classification by the contrastive cosine between an image and its class names
in prompt templates: a folder of class folders (`folder`, optional `class_names`) or packaged
easy-vqa shapes / colours; `templates` names a set or lists them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...errors import ConfigError
from ..packaged import easy_vqa_classes
from ..pictures import classifier_pictures
from ..readers.splits import subsample
from ..results import Measured, percent
from ..task_spec import LIMIT, NAMES, PATH, TEMPLATES, TaskSpec, image_folder, one_source
from . import TaskKind, register


@dataclass
class ZeroShotData:
    images: list
    labels: np.ndarray
    classes: list[str]
    templates: list[str]
    notes: list[str] = field(default_factory=list)
    """Class folders left out for holding no image."""


def read(t: TaskSpec) -> ZeroShotData:
    from ..zero_shot import parse_templates, prompt_name

    one_source(t, {"data": (), "folder": ()})
    notes: list[str] = []
    if t.data:
        images, labels, classes = easy_vqa_classes(t.data, "test")
    elif "folder" in t.spec:
        images, labels, classes = image_folder(t.path(t.spec["folder"]), t.where, notes=notes)
        classes = [prompt_name(c) for c in classes]  # shown in the report as prompted
    else:
        raise ConfigError(f"{t.where}: a zero-shot task needs data or folder")
    if "class_names" in t.spec:
        names = t.spec["class_names"]
        if len(names) != len(classes):
            empty = f"; {notes[0]}" if notes else ""  # a folder counted by the user but holding no image
            raise ConfigError(f"{t.where}: class_names must list {len(classes)} names (one per class folder){empty}")
        classes = [str(n) for n in names]
    if len(classes) < 2:  # a certain answer: a free 100 % in the averages
        raise ConfigError(f"{t.where}: zero-shot classification needs at least two classes; found only "
                          f"{', '.join(map(repr, classes)) or 'none'} (one folder of images per class)")
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:  # one text embedding for two classes: every image of either would miss
        raise ConfigError(f"{t.where}: class names must differ; {', '.join(map(repr, repeated))} name two classes "
                          "(set class_names)")
    try:
        templates = parse_templates(t.spec.get("templates", "clip"))
    except ConfigError as e:
        raise ConfigError(f"{t.where}: {e}") from None
    limit = t.spec.get("limit")
    if limit is not None:  # a seeded choice of the test images
        keep = subsample(list(range(len(labels))), limit, t.seed)
        images, labels = [images[i] for i in keep], np.asarray(labels)[keep]
    return ZeroShotData(images, labels, classes, list(templates), notes)


def size(d: ZeroShotData) -> str:
    return f"{len(d.images)} images, {len(d.classes)} classes"


def run(d: ZeroShotData, model, tokenizer, progress) -> Measured:
    from ..zero_shot import zero_shot_classification

    r = zero_shot_classification(model, d.images, d.labels, d.classes, tokenizer, d.templates, progress=progress)
    return Measured(percent({"top-1": r.top1}), r.metrics, d.notes, detail={"result": r, "classes": d.classes},
                    examples={"top-1": len(d.labels)})


register(TaskKind("zero-shot", frozenset({"data", "folder", "class_names", "templates", "limit"}),
                  lambda spec: "vision", read, size, run, classifier_pictures,
                  datasets=("easy-vqa-shapes", "easy-vqa-colours"),
                  fields={"folder": PATH, "class_names": NAMES, "templates": TEMPLATES, "limit": LIMIT}))
