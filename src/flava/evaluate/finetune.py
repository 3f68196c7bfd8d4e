"""Fine-tuning FLAVA on downstream tasks, as the paper's supplement (B.2) describes.

- Text tasks (GLUE and the like): a head on the text encoder's CLS state (after its final
  LayerNorm). The head is RoBERTa's classification head, since the paper fine-tunes GLUE "following
  the setup of RoBERTa": dropout → Linear(d, d) → tanh → dropout → Linear(d, classes), or one
  output trained with MSE for regression (STS-B). Its dense + tanh is a BERT pooler of its own,
  freshly initialised: no pretraining objective trains the encoder's `pooler`, so copying it would
  only copy its initialisation. Only the text encoder is copied and run.
- Image + text tasks (VQA, SNLI-VE, Hateful Memes): "a 2-layer classifier head with a hidden
  dimension of 1536 on top of h_CLS,M". The supplement names no layers beyond that; we follow
  ViLT's VQA head, whose hidden size is the same 2 × 768 = 1536 and which FLAVA's VQA loss also
  follows: Linear(d, 1536) → LayerNorm → GELU → dropout → Linear(1536, classes). (TorchMultimodal's
  `flava_model_for_classification` defaults differ: hidden 768, ReLU, dropout 0.5, no norm.)
  VQA is multi-label: BCE-with-logits on the soft scores, times the number of answers (ViLT);
  the others are single-label cross-entropy.

- Image classification: a copy of the image encoder and a linear head (after dropout) on its CLS
  state after the final LayerNorm, the feature the paper's linear probes read; ViT and BEiT
  fine-tune with a linear head on this state too. Images get the eval transform (resize +
  center crop), computed once: no augmentation.

All modes: `train_encoders=True` fine-tunes everything on the path (full fine-tuning);
`train_encoders=False` freezes the encoders, computes every example's feature once, then trains
the head alone on those vectors (orders of magnitude faster on a CPU).

The training loop: AdamW with FLAVA's decay rules, linear warmup then cosine decay, evaluation on
the validation split every epoch (or every `eval_every` steps, and always after the last step),
the best state on the task's first metric kept in memory and restored for scoring the test
split. The caller's model is deep-copied and never changed; given a seed the run is
deterministic (it forks the global RNG, so the caller's random state is untouched too).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from PIL import Image
from torch import nn

from .. import stopping
from ..config import NonNegative, PositiveInt, Range, check
from ..data.batch import attention_mask, pad_rows
from ..data.sources import BadSample, open_image
from ..data.tokenizer import PAD_ID, TextTokenizer
from ..data.transforms import normalize, resize_center_crop
from ..errors import ConfigError, DataError
from ..io.files import replace_dir
from ..model.encoders import ImageEncoder
from ..model.flava import FlavaModel, TextTower, init_weights
from ..model.layers import Activation
from ..optim import build_optimizer, warmup_cosine
from . import metrics as M
from .examples import (
    ImageData as ImageTask,
    ImageExample,
    MultimodalData as MultimodalTask,
    MultimodalExample,
    TextData as TextTask,
    check_image_data as check_image_task,
    check_multimodal_data as check_multimodal_task,
    check_text_data as check_text_task,
)

# Confusion matrices of VQA tasks only for vocabularies small enough to read (easy-vqa's 13
# answers, not VQAv2's 3,129).
MAX_CONFUSION_ANSWERS = 100
# Rows of dense VQA targets built at a time when scoring (VQAv2 val is 214k × 3,129 answers).
_VQA_SCORE_CHUNK = 8192


TRAINING = "training"
"""OUTPUT/training/: the state of a fine-tuning stopped on request, which --resume continues."""


@dataclass
class Resumable:
    """Where a fine-tuning keeps its state when it stops on request (SIGTERM/SIGINT), and what it
    was started with (a resumed run must match it)."""

    directory: Path
    started_with: dict


@dataclass
class FinetuneSettings:
    """How to fine-tune. The paper's values: VQAv2 lr 1e-4, SNLI-VE and Hateful Memes 1e-5, all
    with weight decay 0.01, batch 256, 2,000 warmup steps then cosine; GLUE follows RoBERTa
    (lr 1e-5 to 3e-5, batch 16 or 32, 6 % warmup, 10 epochs)."""

    lr: Annotated[float, Range(0, low_open=True)] = 1e-4
    """Peak learning rate. A frozen encoder's head trains well with about 1e-3."""
    epochs: PositiveInt = 3
    """Passes over the training split (fewer if `max_steps` stops earlier)."""
    batch_size: PositiveInt = 32
    """Training examples per step."""
    weight_decay: NonNegative = 0.01
    """AdamW weight decay (not applied to norms, biases and tokens)."""
    warmup_fraction: Annotated[float, Range(0, 1, high_open=True)] = 0.06
    """Share of the steps spent warming the learning rate up linearly; cosine decay to 0 after."""
    max_steps: PositiveInt | None = None
    """Stop after this many steps even within an epoch."""
    eval_every: PositiveInt | None = None
    """Evaluate on validation every this many steps; None: at the end of every epoch."""
    train_encoders: bool = True
    """Full fine-tuning; False trains the head alone on features computed once."""
    head_hidden: PositiveInt = 1536
    """Hidden width of the image + text head (the paper: 1536)."""
    head_dropout: Annotated[float, Range(0, 1, high_open=True)] = 0.1
    """Dropout inside the heads (RoBERTa's head uses 0.1)."""
    max_grad_norm: NonNegative = 1.0
    """Clip the gradient norm to this; 0 turns clipping off."""
    eval_batch_size: PositiveInt = 128
    """Examples per forward pass when computing features and evaluating."""
    max_text_length: PositiveInt | None = None
    """Tokens per text (pair) including [CLS]/[SEP]; default: the tokenizer's, capped by the model."""
    seed: int = 0
    """Seeds the head's initialisation, dropout and the order of training examples."""


@dataclass
class FinetuneResult:
    """What a fine-tuning run measured. Curves are for plotting: `train_loss[i]` is step i + 1's
    loss; `val_curve[j]` is the selection metric after step `eval_steps[j]`."""

    task: str
    metric: str
    """The validation metric that picked the checkpoint (the task's first)."""
    label_names: list[str]
    train_loss: list[float]
    eval_steps: list[int]
    val_curve: list[float]
    val_metrics: list[dict[str, float]]
    """Every metric of the task at each evaluation."""
    best_step: int
    best_val: float
    test_metrics: dict[str, float]
    """The task's metrics on test, scored with the best state."""
    predictions: np.ndarray
    """Test predictions: class / answer indices, or values for regression."""
    probabilities: np.ndarray | None
    """[N, classes] softmax over the test split (single-label classification only)."""
    confusion: np.ndarray | None
    """[classes, classes] test confusion matrix, rows true, columns predicted (scikit-learn's
    layout); VQA: against each question's top answer, for vocabularies of at most
    MAX_CONFUSION_ANSWERS. None for regression."""
    train_encoders: bool
    steps: int
    seconds: float
    """Wall time of the whole run."""
    feature_seconds: float
    """Of which: computing frozen features (0 in full fine-tuning)."""
    model: nn.Module = field(repr=False)
    """The fine-tuned classifier (encoder copy + head) in the best state, in eval mode."""
    kind: str = "classification"
    """'classification', 'regression' or 'vqa'."""
    max_text_length: int | None = None
    """Tokens per text (pair) the model was trained with; None for image classification."""
    pairs: bool = False
    """Whether the text task's examples were sentence pairs."""


# --------------------------------------------------------------------------- heads and classifiers


class TextHead(nn.Module):
    """RoBERTa's classification head on a CLS state."""

    def __init__(self, dim: int, num_outputs: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.dense = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.tanh(self.dense(self.drop(x)))))


class MultimodalHead(nn.Module):
    """The 2-layer head on CLS_M (ViLT's layout, FLAVA's hidden size)."""

    def __init__(self, dim: int, hidden: int, num_outputs: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.act = Activation("gelu")
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.act(self.norm(self.dense(x)))))


class ImageHead(nn.Module):
    """A linear layer on the image CLS state (after dropout)."""

    def __init__(self, dim: int, num_outputs: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(dim, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(x))


class ImageClassifier(nn.Module):
    """A copy of FLAVA's image encoder and a head on its CLS state after the final LayerNorm."""

    def __init__(self, encoder: ImageEncoder, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixel_values, cls_only=True).last_hidden_state[:, 0]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixel_values))


class TextClassifier(nn.Module):
    """A copy of FLAVA's text encoder and a head on its CLS state."""

    def __init__(self, tower: TextTower, head: nn.Module):
        super().__init__()
        self.tower = tower
        self.head = head

    def features(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        # cls_only: the last block updates token 0 alone, the only state the head reads.
        return self.tower(input_ids, attention_mask, token_type_ids, cls_only=True).last_hidden_state[:, 0]

    def forward(self, **inputs) -> torch.Tensor:
        return self.head(self.features(**inputs))


class MultimodalClassifier(nn.Module):
    """A copy of FlavaModel and a head on CLS_M."""

    def __init__(self, flava: FlavaModel, head: nn.Module):
        super().__init__()
        self.flava = flava
        self.head = head

    def features(self, pixel_values, image_index, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        """`pixel_values` holds each distinct image of the batch once; `image_index[i]` is row i's
        image. Questions about one image share its image-encoder pass (exact: the rows are copies)."""
        f = self.flava
        image = f.image_to_multimodal(f.encode_image_tokens(pixel_values))[image_index]
        # skip_padding: zeros at text padding, which the multimodal encoder masks out anyway.
        text = f.text_to_multimodal(f.encode_text_tokens(input_ids, attention_mask, token_type_ids, skip_padding=True))
        return f.fuse_tokens(image, text, attention_mask, skip_padding=True).cls

    def forward(self, **inputs) -> torch.Tensor:
        return self.head(self.features(**inputs))


def _freeze_unused(flava: FlavaModel) -> None:
    """Parameters off the CLS_M path get no gradient; leaving them out keeps them out of the
    optimizer."""
    for p in flava.unused_by_fusion():
        p.requires_grad_(False)


# --------------------------------------------------------------------------- text encoding


@dataclass
class TokenizedPairs:
    input_ids: torch.Tensor
    """[B, L] [CLS] a [SEP] (b [SEP]) then [PAD]."""
    attention_mask: torch.Tensor
    """[B, L] 1 for real tokens."""
    token_type_ids: torch.Tensor
    """[B, L] 0 for [CLS] a [SEP], 1 for b [SEP] (and padding)."""


def _truncating_copy(tokenizer: TextTokenizer, max_length: int) -> Tokenizer:
    # A private copy: changing the shared tokenizer's truncation would leak into its other users.
    tok = Tokenizer.from_str(tokenizer.tok.to_str())
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok


def _encode(tok: Tokenizer, texts: list[str], texts2: list[str | None] | None) -> list[tuple[list[int], list[int]]]:
    """(ids, type ids) per text. Pairs use the tokenizer's BERT template, [CLS] a [SEP] b [SEP],
    truncated longest-first so both keep their [SEP]."""
    if texts2 is None or all(t is None for t in texts2):
        encodings = tok.encode_batch(list(texts))
    else:
        if any(t is None for t in texts2):
            raise DataError("a task mixes single texts and sentence pairs; give every example a text2 or none")
        encodings = tok.encode_batch(list(zip(texts, texts2)))
    return [(e.ids, e.type_ids) for e in encodings]


def _pad(rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = [r[0] for r in rows]
    return pad_rows(ids, PAD_ID), attention_mask(ids), pad_rows([r[1] for r in rows], 0)


def encode_pairs(tokenizer: TextTokenizer, texts: list[str], texts2: list[str] | None = None,
                 max_length: int | None = None) -> TokenizedPairs:
    """Tokenize single texts or sentence pairs ([CLS] a [SEP] b [SEP], token types 0 then 1),
    truncated to `max_length` (default: the tokenizer's) and padded to the longest."""
    if not texts:
        raise DataError("no texts to encode")
    if texts2 is not None and len(texts2) != len(texts):
        raise DataError(f"{len(texts)} first texts but {len(texts2)} second texts")
    tok = _truncating_copy(tokenizer, max_length or tokenizer.max_length)
    return TokenizedPairs(*_pad(_encode(tok, texts, texts2)))


# --------------------------------------------------------------------------- prepared splits


@dataclass
class _Split:
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
class _Images:
    """Every distinct image of a task, resized and center-cropped once, kept as uint8 (a quarter
    of float32's memory); normalised per batch, which gives exactly `eval_transform`'s values."""

    pixels: torch.Tensor
    """[M, 3, S, S] uint8."""

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised pixels of the distinct images, each row's position among them)."""
        unique, inverse = torch.unique(rows, return_inverse=True)
        return normalize(self.pixels[unique].float().div_(255.0)), inverse


def _image_cache(splits: list[list[MultimodalExample]] | list[list[ImageExample]], size: int,
                 ) -> tuple[_Images, list[torch.Tensor]]:
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
    for i, ref in enumerate(refs):
        try:
            image = open_image(ref)
        except BadSample as e:
            raise DataError(f"image {ref}: {e.kind}; fix or remove it from the task") from None
        arr = np.asarray(resize_center_crop(image, size), dtype=np.uint8)
        pixels[i] = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    return _Images(pixels), rows


def _dense_soft(soft: list[dict[int, float]], num_answers: int) -> torch.Tensor:
    t = torch.zeros((len(soft), num_answers))
    for i, d in enumerate(soft):
        for a, s in d.items():
            t[i, a] = s
    return t


# --------------------------------------------------------------------------- metrics


def _scores(kind: str, names: tuple[str, ...], logits: torch.Tensor, split: _Split, num_classes: int):
    """(metrics dict, predictions, probabilities or None, confusion or None)."""
    out: dict[str, float] = {}
    if kind == "regression":
        values = logits[:, 0].double().numpy()
        y = split.targets.double().numpy()
        for name in names:
            out[name] = getattr(M, name)(values, y)
        return out, values, None, None
    preds = logits.argmax(dim=1).numpy()
    if kind == "vqa":
        total = 0.0
        for start in range(0, len(preds), _VQA_SCORE_CHUNK):
            chunk = split.soft[start:start + _VQA_SCORE_CHUNK]
            total += M.vqa_score(preds[start:start + len(chunk)], _dense_soft(chunk, num_classes).numpy()) * len(chunk)
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


# --------------------------------------------------------------------------- the loop


@dataclass
class _Job:
    """Everything the generic loop needs from a text or multimodal task."""

    name: str
    kind: str  # "classification", "regression" or "vqa"
    metrics: tuple[str, ...]
    label_names: list[str]
    num_outputs: int
    classifier: nn.Module
    splits: dict[str, _Split]
    inputs: Callable[[_Split, torch.Tensor], dict]
    """Model inputs of the rows `idx` of a split."""


def _loss(kind: str, logits: torch.Tensor, split: _Split, idx: torch.Tensor, num_outputs: int) -> torch.Tensor:
    if kind == "classification":
        return F.cross_entropy(logits, split.targets[idx])
    if kind == "regression":
        return F.mse_loss(logits[:, 0], split.targets[idx])
    target = _dense_soft([split.soft[i] for i in idx.tolist()], num_outputs)
    # Summed over answers, averaged over questions (ViLT and FLAVA's VQA loss).
    return F.binary_cross_entropy_with_logits(logits, target) * num_outputs


def _save_state(resumable: Resumable, state: dict) -> None:
    replace_dir(resumable.directory, lambda tmp: torch.save(state, tmp / "state.pt"))


def _load_state(resumable: Resumable) -> dict | None:
    path = resumable.directory / "state.pt"
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    started = json.loads(state["started_with"])
    if started != json.loads(json.dumps(resumable.started_with)):
        differ = ", ".join(k for k in sorted(started.keys() | resumable.started_with.keys())
                           if started.get(k) != resumable.started_with.get(k))
        raise ConfigError(f"the fine-tuning in {resumable.directory.parent} was started with other {differ}; resume "
                          "it with the same arguments, or choose another --output")
    return state


def _run(job: _Job, settings: FinetuneSettings, on_step, resumable: Resumable | None = None) -> FinetuneResult:
    started = time.perf_counter()
    s = settings
    clf = job.classifier
    feature_seconds = 0.0
    if s.train_encoders:
        trainable: nn.Module = clf

        def forward(split, idx):
            return clf(**job.inputs(split, idx))
    else:
        t0 = time.perf_counter()
        clf.eval()
        with torch.no_grad():  # not inference_mode: the features feed an autograd graph later
            for split in job.splits.values():
                order = split.eval_order()
                feats = None
                for start in range(0, len(order), s.eval_batch_size):
                    idx = torch.tensor(order[start:start + s.eval_batch_size])
                    f = clf.features(**job.inputs(split, idx))
                    if feats is None:
                        feats = torch.empty((len(split), f.shape[1]), dtype=f.dtype)
                    feats[idx] = f
                split.features = feats
        feature_seconds = time.perf_counter() - t0
        trainable = clf.head

        def forward(split, idx):
            return clf.head(split.features[idx])

    def predict(split: _Split) -> torch.Tensor:
        trainable.eval()
        order = split.eval_order()
        logits = torch.empty((len(split), job.num_outputs))
        with torch.inference_mode():
            for start in range(0, len(order), s.eval_batch_size):
                idx = torch.tensor(order[start:start + s.eval_batch_size])
                logits[idx] = forward(split, idx).float()
        return logits

    train, val, test = job.splits["train"], job.splits["val"], job.splits["test"]
    n = len(train)
    steps_per_epoch = math.ceil(n / s.batch_size)
    total = s.epochs * steps_per_epoch if s.max_steps is None else min(s.max_steps, s.epochs * steps_per_epoch)
    optimizer = build_optimizer(trainable, s.lr, s.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(round(s.warmup_fraction * total), total))
    order_rng = torch.Generator().manual_seed(s.seed)
    params = [p for p in trainable.parameters() if p.requires_grad]
    select = job.metrics[0]

    losses: list[float] = []
    eval_steps: list[int] = []
    curve: list[float] = []
    val_metrics: list[dict[str, float]] = []
    best_state, best_val, best_step = None, -math.inf, 0
    step = 0
    perm, first = None, 0
    saved = _load_state(resumable) if resumable is not None else None
    if saved is not None:  # everything the next step depends on, as it was when the run stopped
        trainable.load_state_dict(saved["trainable"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        order_rng.set_state(saved["order_rng"])
        torch.set_rng_state(saved["rng"])
        step, perm, first, best_state = int(saved["step"]), saved["perm"], int(saved["next"]), saved["best_state"]
        record = json.loads(saved["record"])
        losses, eval_steps, curve, val_metrics = (record[k] for k in ("losses", "eval_steps", "curve", "val_metrics"))
        best_val, best_step = record["best_val"], record["best_step"]
    while step < total:
        if perm is None or first >= n:
            perm, first = torch.randperm(n, generator=order_rng), 0
        for start in range(first, n, s.batch_size):
            idx = perm[start:start + s.batch_size]
            trainable.train()
            loss = _loss(job.kind, forward(train, idx), train, idx, job.num_outputs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if s.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            optimizer.step()
            schedule.step()
            step += 1
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                raise ConfigError(f"{job.name}: the training loss became {losses[-1]} at step {step}; "
                                  f"lower the learning rate (lr={s.lr})")
            if on_step is not None:
                on_step(step, total, losses[-1])
            epoch_end = start + s.batch_size >= n
            if step == total or (step % s.eval_every == 0 if s.eval_every else epoch_end):
                scores = _scores(job.kind, job.metrics, predict(val), val, job.num_outputs)[0]
                eval_steps.append(step)
                val_metrics.append(scores)
                curve.append(scores[select])
                # Strictly better: on a tie the earlier (less trained) state stays.
                if best_state is None or scores[select] > best_val:
                    best_val, best_step = scores[select], step
                    best_state = {k: v.detach().clone() for k, v in trainable.state_dict().items()}
            if step == total:
                break
            if resumable is not None and (signum := stopping.requested()):
                _save_state(resumable, {
                    "started_with": json.dumps(resumable.started_with), "trainable": trainable.state_dict(),
                    "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "order_rng": order_rng.get_state(), "rng": torch.get_rng_state(), "step": step, "perm": perm,
                    "next": start + s.batch_size, "best_state": best_state,
                    "record": json.dumps({"losses": losses, "eval_steps": eval_steps, "curve": curve,
                                          "val_metrics": val_metrics, "best_val": best_val, "best_step": best_step},
                                         default=float)})
                at = f"at step {step} of {total}"
                raise stopping.Stopped(signum, f"stopped by {stopping.name(signum)} {at}; saved in "
                                               f"{resumable.directory}: continue with the same command and --resume",
                                       at)
        perm = None
    trainable.load_state_dict(best_state)
    test_metrics, preds, probs, confusion = _scores(job.kind, job.metrics, predict(test), test, job.num_outputs)
    clf.eval()
    for split in job.splits.values():
        split.features = None
    return FinetuneResult(
        task=job.name, metric=select, label_names=list(job.label_names), train_loss=losses, eval_steps=eval_steps,
        val_curve=curve, val_metrics=val_metrics, best_step=best_step, best_val=best_val, test_metrics=test_metrics,
        predictions=preds, probabilities=probs, confusion=confusion, train_encoders=s.train_encoders, steps=step,
        seconds=time.perf_counter() - started, feature_seconds=feature_seconds, model=clf, kind=job.kind,
    )


# --------------------------------------------------------------------------- public entry points


def _check_common(model, tokenizer, settings) -> int:
    if not isinstance(model, FlavaModel):
        raise ConfigError(f"fine-tuning needs a flava FlavaModel, not {type(model).__name__} "
                          f"(flava.load gives one)")
    if not isinstance(tokenizer, TextTokenizer):
        raise ConfigError(f"tokenizer must be a flava TextTokenizer, not {type(tokenizer).__name__}")
    if not isinstance(settings, FinetuneSettings):
        raise ConfigError(f"settings must be FinetuneSettings, not {type(settings).__name__}")
    check(settings)
    tc = model.config.text
    if tokenizer.vocab_size > tc.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the text encoder only "
                          f"{tc.vocab_size}; use the model's tokenizer")
    if settings.max_text_length is not None and settings.max_text_length > tc.max_position_embeddings:
        raise ConfigError(f"max_text_length {settings.max_text_length} exceeds the text encoder's "
                          f"{tc.max_position_embeddings} positions")
    return settings.max_text_length or min(tokenizer.max_length, tc.max_position_embeddings)


def _text_inputs(split: _Split, idx: torch.Tensor) -> dict:
    ids, mask, types = _pad([split.tokens[i] for i in idx.tolist()])
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def finetune_text(model: FlavaModel, task: TextTask, settings: FinetuneSettings, tokenizer: TextTokenizer,
                  on_step: Callable[[int, int, float], None] | None = None,
                  resumable: Resumable | None = None) -> FinetuneResult:
    """Fine-tune a copy of `model`'s text encoder with a head on its CLS state; score `task.test`
    with the state that was best on `task.val` by `task.metrics[0]`."""
    max_length = _check_common(model, tokenizer, settings)
    check_text_task(task)
    regression = task.regression
    tok = _truncating_copy(tokenizer, max_length)
    splits = {}
    for name, examples in (("train", task.train), ("val", task.val), ("test", task.test)):
        tokens = _encode(tok, [e.text for e in examples], [e.text2 for e in examples])
        dtype = torch.float32 if regression else torch.long
        splits[name] = _Split(tokens, torch.tensor([e.label for e in examples], dtype=dtype))
    num_outputs = 1 if regression else len(task.label_names)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        tower = model.text_tower().eval().requires_grad_(settings.train_encoders)
        head = TextHead(model.config.text.hidden_size, num_outputs, settings.head_dropout)
        init_weights(head, model.config.init_std)
        job = _Job(task.name, "regression" if regression else "classification", tuple(task.metrics),
                   list(task.label_names), num_outputs, TextClassifier(tower, head), splits, _text_inputs)
        result = _run(job, settings, on_step, resumable)
    result.max_text_length = max_length
    result.pairs = any(e.text2 is not None for e in task.train)
    return result


def finetune_multimodal(model: FlavaModel, task: MultimodalTask, settings: FinetuneSettings,
                        tokenizer: TextTokenizer, on_step: Callable[[int, int, float], None] | None = None,
                        resumable: Resumable | None = None) -> FinetuneResult:
    """Fine-tune a copy of `model` with the 2-layer head on CLS_M; score `task.test` with the state
    that was best on `task.val` by `task.metrics[0]`. Images are decoded, resized and
    center-cropped to the model's image size once, before training."""
    max_length = _check_common(model, tokenizer, settings)
    check_multimodal_task(task)
    tok = _truncating_copy(tokenizer, max_length)
    parts = (task.train, task.val, task.test)
    images, image_rows = _image_cache(list(parts), model.config.image.image_size)
    splits = {}
    for name, examples, rows in zip(("train", "val", "test"), parts, image_rows):
        tokens = _encode(tok, [e.text for e in examples], None)
        if task.kind == "vqa":
            splits[name] = _Split(tokens, torch.zeros(len(examples), dtype=torch.long),
                                  [dict(e.answers) for e in examples], rows)
        else:
            splits[name] = _Split(tokens, torch.tensor([e.label for e in examples], dtype=torch.long), None, rows)

    def inputs(split: _Split, idx: torch.Tensor) -> dict:
        pixels, image_index = images.batch(split.image_index[idx])
        return {"pixel_values": pixels, "image_index": image_index, **_text_inputs(split, idx)}

    num_outputs = len(task.label_names)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        flava = copy.deepcopy(model).eval()
        _freeze_unused(flava)
        if not settings.train_encoders:
            flava.requires_grad_(False)
        head = MultimodalHead(model.config.multimodal.hidden_size, settings.head_hidden, num_outputs,
                              settings.head_dropout)
        init_weights(head, model.config.init_std)
        job = _Job(task.name, task.kind, tuple(task.metrics), list(task.label_names), num_outputs,
                   MultimodalClassifier(flava, head), splits, inputs)
        result = _run(job, settings, on_step, resumable)
    result.max_text_length = max_length
    return result


def finetune_image(model: FlavaModel, task: ImageTask, settings: FinetuneSettings,
                   on_step: Callable[[int, int, float], None] | None = None,
                   resumable: Resumable | None = None) -> FinetuneResult:
    """Fine-tune a copy of `model`'s image encoder with a linear head on its CLS state; score
    `task.test` with the state that was best on `task.val` by `task.metrics[0]`. Images are
    decoded, resized and center-cropped once, before training."""
    if not isinstance(model, FlavaModel):
        raise ConfigError(f"fine-tuning needs a flava FlavaModel, not {type(model).__name__} "
                          f"(flava.load gives one)")
    if not isinstance(settings, FinetuneSettings):
        raise ConfigError(f"settings must be FinetuneSettings, not {type(settings).__name__}")
    check(settings)
    check_image_task(task)
    parts = (task.train, task.val, task.test)
    images, image_rows = _image_cache(list(parts), model.config.image.image_size)
    splits = {name: _Split([], torch.tensor([e.label for e in examples], dtype=torch.long), None, rows)
              for name, examples, rows in zip(("train", "val", "test"), parts, image_rows)}

    def inputs(split: _Split, idx: torch.Tensor) -> dict:
        pixels, inverse = images.batch(split.image_index[idx])
        return {"pixel_values": pixels[inverse]}

    num_outputs = len(task.label_names)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        encoder = copy.deepcopy(model.image_encoder).eval().requires_grad_(settings.train_encoders)
        # Off the CLS path: the pooler (heads bring their own) and the mask token (no masking here).
        encoder.pooler.requires_grad_(False)
        if encoder.mask_token is not None:
            encoder.mask_token.requires_grad_(False)
        head = ImageHead(model.config.image.hidden_size, num_outputs, settings.head_dropout)
        init_weights(head, model.config.init_std)
        job = _Job(task.name, "classification", tuple(task.metrics), list(task.label_names), num_outputs,
                   ImageClassifier(encoder, head), splits, inputs)
        return _run(job, settings, on_step, resumable)


__all__ = [
    "FinetuneResult", "FinetuneSettings", "ImageClassifier", "ImageHead", "MultimodalClassifier", "MultimodalHead",
    "TextClassifier", "TextHead", "TokenizedPairs", "encode_pairs", "finetune_image", "finetune_multimodal",
    "finetune_text",
]
