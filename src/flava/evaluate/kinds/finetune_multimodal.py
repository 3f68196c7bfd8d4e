"""Fine-tuning on image + text with a 2-layer head on CLS_M, the paper's VQAv2, SNLI-VE and Hateful
Memes rows (`vqa`, `snli-ve`, `hateful-memes`) or packaged easy-vqa; `settings` and `lr_sweep` as
`flava.evaluate.lr_sweep` reads them."""

from __future__ import annotations

from ...errors import ConfigError
from .. import lr_sweep
from ...finetune.examples import check_multimodal_data
from ..readers.multimodal import easy_vqa_data, read_hateful_memes, read_snli_ve, read_vqa
from ..task_spec import TaskSpec, check_keys
from . import TaskKind, register

VQA_FILES = ("train_questions", "train_annotations", "train_images", "test_questions", "test_annotations",
             "test_images")


def read(t: TaskSpec) -> lr_sweep.FinetuneJob:
    settings, sweep = lr_sweep.read_settings(t)
    spec, where, limit, seed = t.spec, t.where, t.spec.get("limit"), t.seed
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
    else:
        raise ConfigError(f"{where}: a finetune-multimodal task needs data, vqa, snli-ve or hateful-memes")
    check_multimodal_data(data)
    return lr_sweep.FinetuneJob(data, settings, sweep)


register(TaskKind("finetune-multimodal", frozenset({"data", "vqa", "snli-ve", "hateful-memes", "limit", "lr_sweep"}),
                  lambda spec: "multimodal", read, lr_sweep.size, lr_sweep.run, lr_sweep.pictures,
                  datasets=("easy-vqa",)))
