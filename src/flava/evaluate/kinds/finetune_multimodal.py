"""Fine-tuning on image + text with a 2-layer head on CLS_M, the paper's VQAv2, SNLI-VE and Hateful
Memes rows (`vqa`, `snli-ve`, `hateful-memes`), packaged easy-vqa, or a user's tables (`train`, `val`,
`test` and `task`: `vqa` or `image-text-classification`, read as `flava finetune` reads them);
`settings` and `lr_sweep` as `flava.evaluate.lr_sweep` reads them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ...errors import ConfigError, DataError, did_you_mean
from .. import lr_sweep
from ...finetune.examples import check_multimodal_data
from ..readers.multimodal import easy_vqa_data, read_hateful_memes, read_snli_ve, read_vqa
from ..readers.splits import subsample_splits
from ..readers.user_files import read_multimodal_table
from ..task_spec import LIMIT, OBJECT, PATH, TEXT, TaskSpec, check_images, check_keys
from . import TaskKind, register

TABLE_TASKS = ("vqa", "image-text-classification")
TABLE_KEYS = ("train", "val", "test")
VQA_FILES = ("train_questions", "train_annotations", "train_images", "test_questions", "test_annotations",
             "test_images")


def read(t: TaskSpec) -> lr_sweep.FinetuneJob:
    settings, sweep = lr_sweep.read_settings(t)
    spec, where, limit, seed = t.spec, t.where, t.spec.get("limit"), t.seed
    sources = [k for k in ("data", "vqa", "snli-ve", "hateful-memes") if k in spec]
    table = [k for k in (*TABLE_KEYS, "task") if k in spec]
    if len(sources) > 1 or (sources and table):
        raise ConfigError(f"{where}: a task reads one data source, but this one names several "
                          f"({', '.join(sources + table)}): keep data, vqa, snli-ve, hateful-memes or the tables "
                          "(train, test, val, task)")
    if t.data == "easy-vqa":
        data = easy_vqa_data(seed=seed, limit=limit)
    elif "vqa" in spec:
        v = spec["vqa"]
        if not isinstance(v, dict):
            raise ConfigError(f"{where}: vqa takes an object of {', '.join(VQA_FILES)}")
        check_keys(v, set(VQA_FILES), f"{where}.vqa")
        missing = [k for k in VQA_FILES if k not in v]
        if missing:
            raise ConfigError(f"{where}.vqa: missing {', '.join(missing)}")
        data = read_vqa(*(t.path(v[k], f"{where}.vqa.{k}") for k in VQA_FILES), limit=limit, seed=seed)
    elif "snli-ve" in spec:
        v = spec["snli-ve"]
        if not isinstance(v, dict) or set(v) - {"dir", "image_root"} or "dir" not in v or "image_root" not in v:
            raise ConfigError(f"{where}: snli-ve takes an object with dir and image_root")
        data = read_snli_ve(t.path(v["dir"]), t.path(v["image_root"]), limit=limit, seed=seed)
    elif "hateful-memes" in spec:
        data = read_hateful_memes(t.path(spec["hateful-memes"]), limit=limit, seed=seed)
    elif "train" in spec and "test" in spec:
        data = _tables(t)
    elif table:
        raise ConfigError(f"{where}: a finetune-multimodal task reading tables needs train and test (and val "
                          "when validation should not be carved from train)")
    else:
        raise ConfigError(f"{where}: a finetune-multimodal task needs data, vqa, snli-ve, hateful-memes, or train "
                          "and test tables")
    check_multimodal_data(data)
    # Opened now (their headers): met when the task runs, a broken one would end the suite there.
    check_images(sorted({e.image for split in (data.train, data.val, data.test) for e in split
                         if isinstance(e.image, (str, Path))}, key=str), where)
    return lr_sweep.FinetuneJob(data, settings, sweep)


def _tables(t: TaskSpec):
    """A user's tables, as `flava finetune --task vqa|image-text-classification` reads them (VQA's
    answer vocabulary from the whole training table); `limit` then caps each split, a seeded choice."""
    spec, where = t.spec, t.where
    if "task" not in spec:
        raise ConfigError(f"{where}: tables need \"task\": \"vqa\" (an answer or answers column) or "
                          "\"image-text-classification\" (a label column)")
    if spec["task"] not in TABLE_TASKS:
        raise ConfigError(f"{where}: task {spec['task']!r} must be one of {', '.join(TABLE_TASKS)}"
                          f"{did_you_mean(str(spec['task']).lower(), TABLE_TASKS)}")
    limit = spec.get("limit")
    paths = [t.path(spec[k], f"{where}.{k}") if k in spec else None for k in ("train", "val", "test")]
    try:
        data = read_multimodal_table(*paths, kind="vqa" if spec["task"] == "vqa" else "classification", seed=t.seed,
                                     name=t.name)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    if limit is None:
        return data
    train, val, test = subsample_splits(data.train, data.val, data.test, limit, t.seed)
    return dataclasses.replace(data, train=train, val=val, test=test)


register(TaskKind("finetune-multimodal", frozenset({"data", "vqa", "snli-ve", "hateful-memes", "train", "val", "test",
                                                    "task", "limit", "lr_sweep", "settings"}),
                  lambda spec: "multimodal", read, lr_sweep.size, lr_sweep.run, lr_sweep.pictures,
                  datasets=("easy-vqa",),
                  fields={"hateful-memes": PATH, "train": PATH, "val": PATH, "test": PATH, "task": TEXT,
                          "limit": LIMIT, "settings": OBJECT}))
