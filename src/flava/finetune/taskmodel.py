"""Task models: a fine-tuned classifier kept with everything needed to use it on raw inputs.

A task model is a directory:

- `task.json`: {"format": "flava-task", "format_version": 1, "task": one of TASKS,
  "label_names": [...], "head": {"type", "dim", "hidden", "num_outputs", "dropout"},
  "model": the config sections of the encoders it runs ({"text": {...}}, {"image": {...}} or a
  whole FlavaConfig), "preprocessing": {"image_size", "max_text_length", "pairs"}, "finetune":
  what the fine-tuning run measured};
- `model.safetensors`: the classifier's state dict: the encoder copy it runs (the text encoder
  alone for text tasks, the image encoder alone for image classification, the whole FlavaModel
  for image + text tasks) and the head;
- `tokenizer.json`: the tokenizer it was trained with (tasks with text);
- `checksums.json`: the SHA-256 of the other files, so a damaged copy is told apart on loading.

The directory is written beside its target and renamed into place, so it is whole or absent.
`TaskModel.predict` runs raw texts and images through the same preprocessing as fine-tuning
(the tokenizer truncating to the trained length; the eval transform at the trained image size)
and gives the same logits as the in-memory classifier.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..config import to_dict
from ..data.tokenizer import SPECIAL_MAP, TextTokenizer
from ..data.transforms import eval_transform, single_threaded
from ..errors import CheckpointError, ConfigError, DataError, FlavaError, InputError
from ..io.checkpoint import CHECKSUMS, write_checksums
from ..io.files import left_by_replace, read_json, replace_dir, write_json_atomic
from ..io.runs import LOCK
from ..data.processor import load_image
from .heads import ImageClassifier, ImageHead, MultimodalClassifier, MultimodalHead, TextClassifier, TextHead
from .settings import TRAINING, FinetuneResult
from .text import encode, pad, truncating_copy

FORMAT = "flava-task"
FORMAT_VERSION = 1
TASK_FILE = "task.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
FILES = (TASK_FILE, WEIGHTS, TOKENIZER, SPECIAL_MAP, CHECKSUMS)

TEXT_TASKS = ("text-classification", "text-regression")
MULTIMODAL_TASKS = ("vqa", "visual-entailment", "image-text-classification")
TASKS = ("image-classification", *TEXT_TASKS, *MULTIMODAL_TASKS)


def a_model(task: str) -> str:
    """'an image-classification model', 'a vqa model'."""
    return f"{'an' if task[0] in 'aeiou' else 'a'} {task} model"

Progress = Callable[[int, int], None]
"""Called after every batch with (items done, items in total)."""


# --------------------------------------------------------------------------- the model


class TaskModel:
    """A fine-tuned classifier with its labels and preprocessing. `predict` takes raw inputs."""

    def __init__(self, task: str, classifier: nn.Module, label_names: Sequence[str], *,
                 tokenizer: TextTokenizer | None = None, max_text_length: int | None = None,
                 image_size: int | None = None, pairs: bool = False, info: dict[str, Any] | None = None,
                 path: Path | None = None):
        self.task = task
        self.classifier = classifier.eval()
        self.label_names = list(label_names)
        self.tokenizer = tokenizer
        self.max_text_length = max_text_length
        self.image_size = image_size
        self.pairs = pairs
        self.info = dict(info or {})
        """What the fine-tuning run measured (validation and test metrics, steps, settings)."""
        self.path = path
        # A private truncating copy, made once: the shared tokenizer's settings stay untouched.
        self._tok = truncating_copy(tokenizer, max_text_length, pairs) if tokenizer is not None else None

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        outputs = "regression" if self.task == "text-regression" else f"{len(self.label_names)} labels"
        return f"TaskModel(task={self.task!r}, {outputs}{where})"

    @property
    def uses_text(self) -> bool:
        return self.task != "image-classification"

    @property
    def uses_images(self) -> bool:
        return self.task not in TEXT_TASKS

    @property
    def device(self) -> torch.device:
        return next(self.classifier.parameters()).device

    def to(self, device: str | torch.device) -> TaskModel:
        self.classifier.to(device)
        return self

    # ------------------------------------------------------------------ prediction

    def _check_inputs(self, texts, images, texts2) -> tuple[int, list | None, list | None, list | None]:
        # A tensor was iterated along its first axis (one image, three error rows); a dict by its keys.
        if isinstance(images, torch.Tensor):
            raise InputError("images must be an image (PIL, an array, a path) or a list of them; got a tensor: a "
                             "task model prepares its images itself (convert it with .permute(1, 2, 0).numpy())")
        for name, given in (("texts", texts), ("texts2", texts2), ("images", images)):
            if isinstance(given, (dict, set)):
                raise InputError(f"{name} must be a list, in order; got a {type(given).__name__}")
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(texts2, str):
            texts2 = [texts2]
        single = isinstance(images, (Image.Image, str, os.PathLike)) or (
            isinstance(images, np.ndarray) and images.ndim in (2, 3))
        for name, given in (("texts", texts), ("texts2", texts2), ("images", None if single else images)):
            if given is not None and (isinstance(given, (bytes, bytearray)) or not hasattr(given, "__iter__")):
                raise InputError(f"{name} must be {'a string' if name != 'images' else 'an image'} or a list of "
                                 f"them; got {type(given).__name__}")
        images = [images] if single else (list(images) if images is not None else None)
        texts = list(texts) if texts is not None else None
        texts2 = list(texts2) if texts2 is not None else None
        kind, model = self.task, a_model(self.task)
        if self.uses_images and images is None:
            raise InputError(f"{model} needs images")
        if not self.uses_images and images is not None:
            raise InputError(f"{model} takes texts, not images")
        if self.uses_text and texts is None:
            raise InputError(f"{model} needs texts")
        if not self.uses_text and texts is not None:
            raise InputError(f"{model} takes images, not texts")
        if self.pairs and texts2 is None:
            raise InputError(f"this {kind} model was trained on sentence pairs; give texts2 too")
        if not self.pairs and texts2 is not None:
            raise InputError(f"this {kind} model was trained on single texts; leave texts2 out")
        lengths = {name: len(v) for name, v in (("texts", texts), ("images", images), ("texts2", texts2))
                   if v is not None}
        if len(set(lengths.values())) > 1:
            raise InputError("inputs differ in length: " + ", ".join(f"{k} {n}" for k, n in lengths.items()))
        for name, values in (("texts", texts), ("texts2", texts2)):
            bad = next((i for i, t in enumerate(values or []) if not isinstance(t, str)), None)
            if bad is not None:
                raise InputError(f"{name} must be strings; item {bad} is a {type(values[bad]).__name__}")
            blank = next((i for i, t in enumerate(values or []) if not t.strip()), None)
            if blank is not None:  # as `flava predict` and the server refuse one, not a confident prediction
                raise InputError(f"{name}[{blank}] is empty; give each input some text")
        return next(iter(lengths.values())), texts, images, texts2

    def _pixels(self, image, i: int) -> torch.Tensor:
        try:
            ic = self._image_config()
            return eval_transform(load_image(image), self.image_size, ic.image_mean, ic.image_std)
        except FlavaError as e:
            raise DataError(str(e)) from None
        except (TypeError, ValueError, OSError) as e:  # arrays PIL cannot take (dtype, shape)
            raise DataError(f"cannot use image {i} ({type(image).__name__}): {e}") from None

    def _decode(self, logits: torch.Tensor, top_k: int) -> dict[str, Any]:
        if self.task == "text-regression":
            return {"value": float(logits[0])}
        # As in fine-tuning's scoring: softmax over classes; VQA is multi-label, so a sigmoid per answer.
        probs = torch.sigmoid(logits.double()) if self.task == "vqa" else torch.softmax(logits.double(), dim=0)
        best = int(logits.argmax())
        order = [best] + [int(j) for j in torch.argsort(-probs, stable=True) if int(j) != best][:top_k - 1]
        top = [{"label": self.label_names[j], "score": float(probs[j])} for j in order]
        return {"label": top[0]["label"], "score": top[0]["score"], "top": top}

    def predict(self, texts: str | Sequence[str] | None = None, images: Any = None,
                texts2: str | Sequence[str] | None = None, top_k: int = 5, batch_size: int = 32,
                progress: Progress | None = None) -> list[dict[str, Any]]:
        """One dict per input, in input order:

        - classification tasks (text, image, visual entailment, image + text):
          {"label": str, "score": float, "top": [{"label": str, "score": float}, ...]}, scores
          being softmax probabilities, `top` the `top_k` best (at most the number of labels);
        - vqa: the same keys, the labels being answers and the scores each answer's sigmoid;
        - text-regression: {"value": float};
        - an image that cannot be used: {"error": "..."}; the other inputs are predicted.

        `texts` (and `texts2`, for models trained on sentence pairs) are strings; `images` are
        paths, PIL images or numpy arrays ([H, W] or [H, W, C]; a [N, H, W, C] array is N images).
        A single string or image gives a list of one. Runs in eval mode without autograd, in
        batches of `batch_size`; `progress(done, total)` is called after each batch."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise InputError(f"top_k must be a positive integer; got {top_k!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer; got {batch_size!r}")
        n, texts, images, texts2 = self._check_inputs(texts, images, texts2)
        top_k = min(top_k, max(1, len(self.label_names)))
        out: list[dict[str, Any] | None] = [None] * n
        device = self.device
        self.classifier.eval()
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                rows, pixels = [], []
                with single_threaded():
                    for i in range(start, min(n, start + batch_size)):
                        if images is not None:
                            try:
                                pixels.append(self._pixels(images[i], i))
                            except DataError as e:
                                out[i] = {"error": str(e)}
                                continue
                        rows.append(i)
                if rows:
                    logits = self.classifier(**self._batch(rows, texts, texts2, pixels, device)).float().cpu()
                    for i, row in zip(rows, logits):
                        out[i] = self._decode(row, top_k)
                if progress is not None:
                    progress(min(n, start + batch_size), n)
        return out

    def _batch(self, rows: list[int], texts, texts2, pixels: list[torch.Tensor], device) -> dict[str, torch.Tensor]:
        inputs: dict[str, torch.Tensor] = {}
        if texts is not None:
            tokens = encode(self._tok, [texts[i] for i in rows], [texts2[i] for i in rows] if texts2 is not None else None)
            ids, mask, types = pad(tokens, self.tokenizer.pad_id)
            inputs.update(input_ids=ids, attention_mask=mask, token_type_ids=types)
        if pixels:
            inputs["pixel_values"] = torch.stack(pixels)
            if self.task in MULTIMODAL_TASKS:
                inputs["image_index"] = torch.arange(len(pixels))
        return {k: v.to(device) for k, v in inputs.items()}

    # ------------------------------------------------------------------ saving

    def _head_settings(self) -> dict[str, Any]:
        head = self.classifier.head
        kind = {TextHead: "text", ImageHead: "image", MultimodalHead: "multimodal"}[type(head)]
        return {"type": kind, "dim": head.dense.in_features if kind != "image" else head.out.in_features,
                "hidden": head.dense.out_features if kind == "multimodal" else None,
                "num_outputs": head.out.out_features, "dropout": head.drop.p}

    def _image_config(self):
        """The image encoder's config: its pixel statistics are the ones inputs are normalised with."""
        clf = self.classifier
        return clf.encoder.cfg if isinstance(clf, ImageClassifier) else clf.flava.config.image

    def _model_config(self) -> dict[str, Any]:
        clf = self.classifier
        if isinstance(clf, TextClassifier):
            return {"text": to_dict(clf.tower.encoder.cfg)}
        if isinstance(clf, ImageClassifier):
            return {"image": to_dict(clf.encoder.cfg)}
        return to_dict(clf.flava.config)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the task model directory (replacing an earlier task model there, whole)."""
        target = Path(directory)
        check_output(target)
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "task": self.task, "label_names": self.label_names,
            "head": self._head_settings(), "model": self._model_config(),
            "preprocessing": {"image_size": self.image_size, "max_text_length": self.max_text_length,
                              "pairs": self.pairs},
            "finetune": self.info,
        }
        from safetensors.torch import save_file

        def fill(tmp: Path) -> None:
            state = {k: v.detach().to("cpu").contiguous() for k, v in self.classifier.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
            write_json_atomic(tmp / TASK_FILE, meta)
            if self.tokenizer is not None:  # with its special tokens' roles, which some vocabularies do not name
                self.tokenizer.save(tmp)
            write_checksums(tmp)

        replace_dir(target, fill)
        self.path = target
        return target


def check_output(directory: str | os.PathLike, task: str | None = None, replace: bool = False) -> str | None:
    """CheckpointError unless `directory` is absent, empty or an earlier task model: a task model
    replaces its directory whole, which must never take a checkpoint or other files with it. With
    `task`, an earlier task model is refused too unless `replace` (a rerun would discard a finished
    fine-tuning). Returns the kind of the task model that will be replaced, if any."""
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} is a file; choose a directory for the task model")
    if not target.is_dir():
        return None
    names = {p.name for p in target.iterdir() if not left_by_replace(p.name, TRAINING)}  # a killed save's leftovers
    if names and not names <= {*FILES, TRAINING, LOCK}:  # a stopped fine-tuning's state and lock are ours too
        raise CheckpointError(f"{target} already holds other files and is not a task model; "
                              f"choose another output directory")
    try:
        old = read_json(target / TASK_FILE, "task model", CheckpointError, expect=dict).get("task")
    except CheckpointError:
        return None
    if task is not None and not replace:
        raise CheckpointError(f"{target} holds a task model for {old}; fine-tuning {task} would replace it: choose "
                              f"another --output, or pass --replace")
    return str(old)


# --------------------------------------------------------------------------- from a fine-tuning run


def _summary(result: FinetuneResult) -> dict[str, Any]:
    best = result.eval_steps.index(result.best_step) if result.best_step in result.eval_steps else -1
    return {"name": result.task, "metric": result.metric, "best_step": result.best_step, "steps": result.steps,
            "best_val": result.best_val, "val_metrics": result.val_metrics[best] if result.val_metrics else {},
            "test_metrics": result.test_metrics, "train_encoders": result.train_encoders}


def _task_kind(clf: nn.Module, task: str | None, kind: str) -> str:
    """The task kind a classifier serves: stated by `task` or read off the classifier."""
    if isinstance(clf, TextClassifier):
        allowed = ("text-regression",) if kind == "regression" else ("text-classification",)
    elif isinstance(clf, ImageClassifier):
        allowed = ("image-classification",)
    elif isinstance(clf, MultimodalClassifier):
        allowed = ("vqa",) if kind == "vqa" else ("image-text-classification", "visual-entailment")
    else:
        raise ConfigError(f"cannot save a {type(clf).__name__} as a task model; give a FinetuneResult or a "
                          f"TextClassifier, ImageClassifier or MultimodalClassifier")
    if task is None:
        return allowed[0]
    if task not in allowed:
        raise ConfigError(f"task {task!r} does not fit this {type(clf).__name__} ({kind}); use "
                          f"{' or '.join(allowed)}")
    return task


def as_task_model(model: FinetuneResult | nn.Module, *, task: str | None = None,
                  tokenizer: TextTokenizer | None = None, label_names: Sequence[str] | None = None,
                  max_text_length: int | None = None, pairs: bool | None = None, vqa: bool = False,
                  info: dict[str, Any] | None = None) -> TaskModel:
    """A `TaskModel` around a fine-tuning result (or a bare classifier), sharing its weights.

    From a result, the label names, the text length and pairing come with it; a bare classifier
    needs `label_names` (none for a one-output text regressor), and `vqa=True` for a VQA head.
    `task` picks between the kinds one classifier can serve: image-text-classification
    (default) or visual-entailment. Tasks with text need the `tokenizer` they were trained with."""
    if isinstance(model, FinetuneResult):
        clf, kind = model.model, model.kind
        label_names = model.label_names if label_names is None else label_names
        max_text_length = model.max_text_length if max_text_length is None else max_text_length
        pairs = model.pairs if pairs is None else pairs
        info = {**_summary(model), **(info or {})}
    else:
        clf = model
        outputs = getattr(getattr(getattr(clf, "head", None), "out", None), "out_features", None)
        kind = "vqa" if vqa else ("regression" if isinstance(clf, TextClassifier) and outputs == 1
                                  and not label_names else "classification")
        label_names = list(label_names or [])
    kind_name = _task_kind(clf, task, kind)
    head_outputs = clf.head.out.out_features
    if kind_name == "text-regression":
        if label_names or head_outputs != 1:
            raise ConfigError(f"a text regressor has one output and no label names; this one has {head_outputs} "
                              f"outputs and {len(label_names)} label names")
    elif len(label_names) != head_outputs:
        raise ConfigError(f"the head has {head_outputs} outputs but {len(label_names)} label names were given")
    image_size = None
    if isinstance(clf, ImageClassifier):
        image_size = clf.encoder.cfg.image_size
    elif isinstance(clf, MultimodalClassifier):
        image_size = clf.flava.config.image.image_size
    if kind_name != "image-classification":
        if not isinstance(tokenizer, TextTokenizer):
            raise ConfigError(f"a {kind_name} task model needs the TextTokenizer it was trained with")
        text_cfg = clf.tower.encoder.cfg if isinstance(clf, TextClassifier) else clf.flava.config.text
        if tokenizer.vocab_size > text_cfg.vocab_size:
            raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the text encoder only "
                              f"{text_cfg.vocab_size}; use the model's tokenizer")
        # Fine-tuning's default: the tokenizer's length capped by the encoder's positions.
        max_text_length = max_text_length or min(tokenizer.max_length, text_cfg.max_length)
    else:
        tokenizer, max_text_length, pairs = None, None, False
    return TaskModel(kind_name, clf, label_names, tokenizer=tokenizer, max_text_length=max_text_length,
                     image_size=image_size, pairs=bool(pairs), info=info)


def save_task_model(model: FinetuneResult | nn.Module, directory: str | os.PathLike, *, task: str | None = None,
                    tokenizer: TextTokenizer | None = None, label_names: Sequence[str] | None = None,
                    max_text_length: int | None = None, pairs: bool | None = None, vqa: bool = False,
                    info: dict[str, Any] | None = None) -> TaskModel:
    """Save a fine-tuning result (or a bare classifier) as a task model directory; returns the
    `TaskModel`. Arguments as `as_task_model`."""
    tm = as_task_model(model, task=task, tokenizer=tokenizer, label_names=label_names,
                       max_text_length=max_text_length, pairs=pairs, vqa=vqa, info=info)
    tm.save(directory)
    return tm


__all__ = ["FILES", "TASKS", "TaskModel", "as_task_model", "check_output", "save_task_model"]
