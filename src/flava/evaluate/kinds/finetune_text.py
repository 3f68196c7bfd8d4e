"""Fine-tuning the text encoder with a classification (or regression) head, the paper's GLUE rows:
a GLUE task (`glue` + `dir`), tables of text and label (`train`, `val`, `test`, `label_names`,
`regression`) or packaged BBC News; `settings` and `lr_sweep` as `flava.evaluate.lr_sweep` reads them."""

from __future__ import annotations

from ...errors import ConfigError
from .. import lr_sweep
from ...finetune.examples import TextData, TextExample, check_text_data
from ..packaged import bbc_news_splits
from ..readers.splits import subsample
from ..readers.text import read_glue, read_text_classification
from ..task_spec import FLAG, LIMIT, OBJECT, PATH, TEXT, TaskSpec, names, one_source
from . import TaskKind, register


def read(t: TaskSpec) -> lr_sweep.FinetuneJob:
    one_source(t, {"data": (), "glue": ("dir",), "train": ("val", "test", "regression", "label_names")})
    settings, sweep = lr_sweep.read_settings(t)
    spec, limit = t.spec, t.spec.get("limit")
    if t.data == "bbc-news":
        splits, classes = bbc_news_splits()
        tr, va, te = ([TextExample(x, int(y)) for x, y in zip(*splits[k])] for k in ("train", "val", "test"))
        # A seeded choice: the file holds its articles class by class, so its first rows are one class.
        data = TextData(t.name, subsample(tr, limit, t.seed), va, te, classes, ("accuracy",))
    elif "glue" in spec:
        data = read_glue(spec["glue"], t.path(spec.get("dir", ".")), seed=t.seed, limit=limit)
    elif "train" in spec and "test" in spec:
        data = read_text_classification(
            t.path(spec["train"]), t.path(spec["val"]) if "val" in spec else None, t.path(spec["test"]),
            label_names=spec.get("label_names"), regression=spec.get("regression", False), seed=t.seed,
            name=t.name, limit=limit)
    else:
        raise ConfigError(f"{t.where}: a finetune-text task needs data, glue (+ dir), or train and test")
    check_text_data(data)
    return lr_sweep.FinetuneJob(data, settings, sweep)


register(TaskKind("finetune-text", frozenset({"data", "train", "val", "test", "regression", "label_names", "limit",
                                              "lr_sweep", "glue", "dir", "settings"}),
                  lambda spec: "language", read, lr_sweep.size, lr_sweep.run, lr_sweep.pictures,
                  datasets=("bbc-news",),
                  fields={"train": PATH, "val": PATH, "test": PATH, "regression": FLAG, "label_names": names(2),
                          "limit": LIMIT, "glue": TEXT, "dir": PATH, "settings": OBJECT}))
