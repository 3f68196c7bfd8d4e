"""A saved task model read back (`flava.load_task`): its description checked, the classifier
built empty from it, its weights checked against their checksums and loaded, its tokenizer."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import FlavaConfig, ImageEncoderConfig, TextEncoderConfig, from_dict, validate
from ..data.tokenizer import TextTokenizer
from ..errors import CheckpointError, ConfigError, DataError
from ..io.checkpoint import damage, read_weights
from ..io.files import read_json
from ..loading import build_loaded
from ..model.encoders import ImageEncoder, TextEncoder
from ..model.flava import FlavaModel, TextTower
from .heads import ImageClassifier, ImageHead, MultimodalClassifier, MultimodalHead, TextClassifier, TextHead
from .settings import TRAINING
from .taskmodel import FORMAT, FORMAT_VERSION, TASK_FILE, TASKS, TEXT_TASKS, TOKENIZER, WEIGHTS, TaskModel

def _get(meta: dict, key: str, kind: type, where: Path):
    value = meta.get(key)
    if not isinstance(value, kind):
        raise CheckpointError(f"{where} has no valid {key!r}; the task model is damaged: save it again")
    return value


def _encoder_config(cls: type, data: Any, where: str):
    cfg = from_dict(cls, data, where)
    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError(f"{where}.hidden_size ({cfg.hidden_size}) must be divisible by {where}.num_heads "
                          f"({cfg.num_heads})")
    return cfg


def _factory(meta: dict, where: Path) -> Callable[[], nn.Module]:
    """A function building the (empty) classifier that task.json describes."""
    head = _get(meta, "head", dict, where)
    model = _get(meta, "model", dict, where)
    try:
        n, dropout, dim = int(head["num_outputs"]), float(head["dropout"]), int(head["dim"])
        kind = head["type"]
        hidden = int(head["hidden"]) if kind == "multimodal" else None
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{where}: the head settings are incomplete; the task model is damaged") from None
    try:
        if kind == "text":
            tc = _encoder_config(TextEncoderConfig, model.get("text"), "model.text")
            return lambda: TextClassifier(TextTower(TextEncoder(tc)), TextHead(dim, n, dropout))
        if kind == "image":
            ic = _encoder_config(ImageEncoderConfig, model.get("image"), "model.image")
            return lambda: ImageClassifier(ImageEncoder(ic), ImageHead(dim, n, dropout))
        if kind == "multimodal":
            cfg = validate(from_dict(FlavaConfig, model, "model"))
            return lambda: MultimodalClassifier(FlavaModel(cfg), MultimodalHead(dim, hidden, n, dropout))
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    raise CheckpointError(f"{where}: unknown head type {kind!r}; the task model is damaged")


def _tokenizer(path: Path, max_length: int) -> TextTokenizer:
    file = path / TOKENIZER
    if not file.is_file():
        raise CheckpointError(f"task model {path} has no {TOKENIZER}; it is incomplete: save it again")
    try:
        return TextTokenizer(file, max_length)
    except DataError as e:
        raise CheckpointError(f"{file}: {e}") from None
    except Exception as e:  # the tokenizers library raises a bare Exception for unreadable files
        raise CheckpointError(f"{file} could not be read ({e}); copy or save the task model again") from None


def load_task(directory: str | os.PathLike, device: str | torch.device | None = None) -> TaskModel:
    """A task model saved by `save_task_model` (or `flava finetune`), in eval mode, ready to
    `predict`. CheckpointError, in one line, for a missing, incomplete or damaged directory."""
    from ..loading import check_device

    check_device(device)
    if not isinstance(directory, (str, os.PathLike)):
        raise CheckpointError(f"load_task takes a task model's directory; got {type(directory).__name__}")
    path = Path(directory)
    if path.is_file() and path.parent.joinpath(TASK_FILE).is_file():  # a file in it, as flava.load takes one
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(f"task model {path} does not exist (expected a directory written by `flava finetune`)")
    if not (path / TASK_FILE).is_file():
        hint = ("; it is a pretrained checkpoint: fine-tune it with `flava finetune` first"
                if (path / "config.json").is_file() else
                "; it holds a fine-tuning stopped before it finished: finish it with the same `flava finetune` "
                "command and --resume" if (path / TRAINING / "state.pt").is_file() else "")
        raise CheckpointError(f"{path} is not a task model: it has no {TASK_FILE}{hint}")
    why = damage(path)
    if why:
        raise CheckpointError(f"task model {path} is damaged: {why}; copy or save it again")
    where = path / TASK_FILE
    meta = read_json(where, "task model settings", CheckpointError, expect=dict)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a flava task model file (format {meta.get('format')!r})")
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer flava (task format {version}); upgrade flava")
    task = _get(meta, "task", str, where)
    if task not in TASKS:
        raise CheckpointError(f"{where}: unknown task {task!r}; known: {', '.join(TASKS)}")
    labels = _get(meta, "label_names", list, where)
    prep = _get(meta, "preprocessing", dict, where)
    info = meta.get("finetune") if isinstance(meta.get("finetune"), dict) else {}
    factory = _factory(meta, where)
    if not (path / WEIGHTS).is_file():
        raise CheckpointError(f"task model {path} has no {WEIGHTS}; it is incomplete: save it again")
    classifier = build_loaded(factory, read_weights(path), "task model", path)
    tokenizer = None
    max_length = prep.get("max_text_length")
    if task != "image-classification":
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise CheckpointError(f"{where}: preprocessing.max_text_length is missing or invalid; save it again")
        tokenizer = _tokenizer(path, max_length)
    image_size = prep.get("image_size")
    if task not in TEXT_TASKS and (isinstance(image_size, bool) or not isinstance(image_size, int)):
        raise CheckpointError(f"{where}: preprocessing.image_size is missing or invalid; save it again")
    tm = TaskModel(task, classifier, [str(x) for x in labels], tokenizer=tokenizer, max_text_length=max_length,
                   image_size=image_size, pairs=bool(prep.get("pairs", False)), info=info, path=path)
    if task != "text-regression" and len(tm.label_names) != classifier.head.out.out_features:
        raise CheckpointError(f"{where} names {len(tm.label_names)} labels but the head has "
                              f"{classifier.head.out.out_features} outputs; the task model is damaged")
    return tm.to(device) if device is not None else tm

