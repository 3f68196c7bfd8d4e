"""The fine-tuning loop (AdamW, warmup then cosine, evaluation on validation, the best state kept,
stop on request and resume) and its entry points: finetune_text, finetune_multimodal, finetune_image."""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import stopping
from ..config import check, differences, said
from ..data.tokenizer import TextTokenizer
from ..errors import CheckpointError, ConfigError, first_line
from ..io.checkpoint import damage, save_state, write_checksums
from ..io.files import replace_dir
from ..model.flava import FlavaModel, init_weights
from ..optim import build_optimizer, warmup_cosine
from .examples import (
    ImageData as ImageTask,
    MultimodalData as MultimodalTask,
    TextData as TextTask,
    check_image_data as check_image_task,
    check_multimodal_data as check_multimodal_task,
    check_text_data as check_text_task,
)
from .heads import (ImageClassifier, ImageHead, MultimodalClassifier, MultimodalHead, TextClassifier, TextHead,
                    freeze_unused)
from .settings import FinetuneResult, FinetuneSettings, Resumable
from .splits import VQA_SCORE_CHUNK, Split, dense_soft, image_cache, part_scores, split_scores
from .text import encode, pad, truncating_copy


@dataclass
class _Job:
    """Everything the generic loop needs from a text or multimodal task."""

    name: str
    kind: str  # "classification", "regression" or "vqa"
    metrics: tuple[str, ...]
    label_names: list[str]
    num_outputs: int
    classifier: nn.Module
    splits: dict[str, Split]
    inputs: Callable[[Split, torch.Tensor], dict]
    """Model inputs of the rows `idx` of a split (on the host)."""
    test_parts: dict[str, int] | None = None
    """`TextData.test_parts`."""


def _loss(kind: str, logits: torch.Tensor, split: Split, idx: torch.Tensor, num_outputs: int) -> torch.Tensor:
    if kind == "classification":
        return F.cross_entropy(logits, split.targets[idx].to(logits.device))
    if kind == "regression":
        return F.mse_loss(logits[:, 0], split.targets[idx].to(logits.device))
    target = dense_soft([split.soft[i] for i in idx.tolist()], num_outputs).to(logits.device)
    # Summed over answers, averaged over questions (ViLT and FLAVA's VQA loss).
    return F.binary_cross_entropy_with_logits(logits, target) * num_outputs


def _val_loss(kind: str, logits: torch.Tensor, split: Split, num_outputs: int) -> float:
    """The training loss over a whole split, in chunks: VQA's dense targets for all of VQAv2 val
    (214k x 3,129 answers) would not fit at once."""
    total = 0.0
    for start in range(0, len(split), VQA_SCORE_CHUNK):
        idx = torch.arange(start, min(start + VQA_SCORE_CHUNK, len(split)))
        total += float(_loss(kind, logits[idx], split, idx, num_outputs)) * len(idx)
    return total / max(1, len(split))


def _save_state(resumable: Resumable, state: dict) -> None:
    def fill(tmp: Path) -> None:
        save_state(state, tmp / "state.pt")
        write_checksums(tmp)

    replace_dir(resumable.directory, fill)


def _load_state(resumable: Resumable) -> dict | None:
    path = resumable.directory / "state.pt"
    if not path.is_file():
        return None
    try:
        why = damage(resumable.directory)
        if why:
            raise CheckpointError(why)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for a damaged file
        raise CheckpointError(f"the stopped fine-tuning's state in {resumable.directory} is damaged ({first_line(e)}); "
                              f"delete it and run without --resume to fine-tune from the start") from None
    started, asked = json.loads(state["started_with"]), json.loads(json.dumps(resumable.started_with))
    now = _known(asked, started)  # what a state saved by an earlier release recorded is what it can be held to
    if "data" in started:  # the data itself, not how it was named (relative, absolute, through a link)
        now["data"] = asked["data"]
        for name in ("train", "val", "test"):
            started.pop(name, None), now.pop(name, None)
        gone = [name for name, was in started["data"].items()
                if was and "name" not in was and (now["data"].get(name) or {}).get("name")]
        if gone:  # a file or folder it was started on, not there now
            raise ConfigError(f"{now['data'][gone[0]]['name']} does not exist (the fine-tuning stopped in "
                              f"{resumable.directory.parent} was started on it as --{gone[0]}); give it back, or "
                              "fine-tune into another --output")
        if started["data"] != now["data"]:
            raise ConfigError(f"the data of the fine-tuning stopped in {resumable.directory.parent} changed since it "
                              f"stopped ({said(differences(started['data'], now['data']))}): a resumed fine-tuning "
                              "reads the examples it was started with; give them back as they were, or fine-tune "
                              "into another --output")
    if "model_weights" in started:  # the checkpoint itself, not how it was named or where it lies
        was, weights = started.pop("model_weights"), now.pop("model_weights", "")
        started.pop("model", None), now.pop("model", None)
        if _fingerprint(was) != _fingerprint(weights):
            raise ConfigError(f"the fine-tuning in {resumable.directory.parent} was started from other weights "
                              f"({was}; --model now gives {weights}): resume it from the checkpoint it was started "
                              "from, or choose another --output")
    if started != now:
        raise ConfigError(f"the fine-tuning in {resumable.directory.parent} was started with other settings "
                          f"({said(differences(started, now))}); "
                          "resume it with the arguments it was started with, or choose another --output")
    return state


def _fingerprint(weights: str) -> str:
    """The fingerprint in a recorded `PATH (FINGERPRINT)`."""
    return weights.rsplit(" (", 1)[-1].rstrip(")")


def check_resume(resumable: Resumable) -> None:
    """Refuse, before any work, to resume a fine-tuning with settings it was not started with."""
    _load_state(resumable)


def _known(now: dict, started: dict) -> dict:
    """`now` with only the keys `started` has (at every level)."""
    return {k: _known(v, started[k]) if isinstance(v, dict) and isinstance(started[k], dict) else v
            for k, v in now.items() if k in started}


def _run(job: _Job, settings: FinetuneSettings, on_step, resumable: Resumable | None = None) -> FinetuneResult:
    """Train on the device the classifier is on (the model's), the splits' data kept on the host."""
    started = time.perf_counter()
    s = settings
    clf = job.classifier
    device = next(clf.parameters()).device

    def inputs(split, idx):
        return {k: v.to(device, non_blocking=True) for k, v in job.inputs(split, idx).items()}

    feature_seconds = 0.0
    if s.train_encoders:
        trainable: nn.Module = clf

        def forward(split, idx):
            return clf(**inputs(split, idx))
    else:
        t0 = time.perf_counter()
        clf.eval()
        with torch.no_grad():  # not inference_mode: the features feed an autograd graph later
            for split in job.splits.values():
                order = split.eval_order()
                feats = None
                for start in range(0, len(order), s.eval_batch_size):
                    idx = torch.tensor(order[start:start + s.eval_batch_size])
                    f = clf.features(**inputs(split, idx))
                    if feats is None:
                        feats = torch.empty((len(split), f.shape[1]), dtype=f.dtype, device=device)
                    feats[idx] = f
                split.features = feats
        feature_seconds = time.perf_counter() - t0
        trainable = clf.head

        def forward(split, idx):
            return clf.head(split.features[idx])

    def predict(split: Split) -> torch.Tensor:
        trainable.eval()
        order = split.eval_order()
        logits = torch.empty((len(split), job.num_outputs))
        with torch.inference_mode():
            for start in range(0, len(order), s.eval_batch_size):
                idx = torch.tensor(order[start:start + s.eval_batch_size])
                logits[idx] = forward(split, idx).float().cpu()
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
    val_losses: list[float] = []
    best_state, best_val, best_step, best_loss = None, -math.inf, 0, math.inf
    step = 0
    perm, first = None, 0
    saved = _load_state(resumable) if resumable is not None else None
    if saved is not None:  # everything the next step depends on, as it was when the run stopped
        trainable.load_state_dict(saved["trainable"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        order_rng.set_state(saved["order_rng"])
        torch.set_rng_state(saved["rng"])
        if device.type == "cuda" and "cuda_rng" in saved:  # dropout's draws on the GPU
            torch.cuda.set_rng_state(saved["cuda_rng"], device)
        step, perm, first, best_state = int(saved["step"]), saved["perm"], int(saved["next"]), saved["best_state"]
        record = json.loads(saved["record"])
        losses, eval_steps, curve, val_metrics = (record[k] for k in ("losses", "eval_steps", "curve", "val_metrics"))
        val_losses = record.get("val_losses", [])
        best_val, best_step, best_loss = record["best_val"], record["best_step"], record.get("best_loss", math.inf)
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
                val_logits = predict(val)
                scores = split_scores(job.kind, job.metrics, val_logits, val, job.num_outputs)[0]
                val_loss = _val_loss(job.kind, val_logits, val, job.num_outputs)
                eval_steps.append(step)
                val_metrics.append(scores)
                val_losses.append(val_loss)
                curve.append(scores[select])
                # A tie on the metric (frequent on a small validation split) goes to the lower loss.
                if best_state is None or (scores[select], -val_loss) > (best_val, -best_loss):
                    best_val, best_step, best_loss = scores[select], step, val_loss
                    # On the host: a second copy of the model on the GPU would halve what fits there.
                    best_state = {k: v.detach().to("cpu", copy=True) for k, v in trainable.state_dict().items()}
            if step == total:
                break
            if resumable is not None and (signum := stopping.requested()):
                _save_state(resumable, {
                    "started_with": json.dumps(resumable.started_with), "trainable": trainable.state_dict(),
                    "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "order_rng": order_rng.get_state(), "rng": torch.get_rng_state(), "step": step, "perm": perm,
                    **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
                    "next": start + s.batch_size, "best_state": best_state,
                    "record": json.dumps({"losses": losses, "eval_steps": eval_steps, "curve": curve,
                                          "val_metrics": val_metrics, "best_val": best_val, "best_step": best_step,
                                          "best_loss": best_loss, "val_losses": val_losses},
                                         default=float)})
                at = f"at step {step} of {total}"
                raise stopping.Stopped(signum, f"stopped by {stopping.name(signum)} {at}; saved in "
                                               f"{resumable.directory}: continue with the same command and --resume",
                                       at)
        perm = None
    trainable.load_state_dict(best_state)
    logits = predict(test)
    test_metrics, preds, probs, confusion = split_scores(job.kind, job.metrics, logits, test, job.num_outputs)
    if job.test_parts:
        test_metrics = part_scores(job.kind, job.metrics, logits, test, job.num_outputs, job.test_parts)
    clf.eval()
    for split in job.splits.values():
        split.features = None
    return FinetuneResult(
        task=job.name, metric=select, label_names=list(job.label_names), train_loss=losses, eval_steps=eval_steps,
        val_curve=curve, val_metrics=val_metrics, best_step=best_step, best_val=best_val, test_metrics=test_metrics,
        predictions=preds, probabilities=probs, confusion=confusion, train_encoders=s.train_encoders, steps=step,
        seconds=time.perf_counter() - started, feature_seconds=feature_seconds, model=clf, kind=job.kind,
        val_losses=val_losses,
    )



def _cuda_index(model: FlavaModel) -> list[int]:
    """The GPU whose random state a fine-tuning on it seeds (and gives back after), if any."""
    d = model.device
    return [torch.cuda.current_device() if d.index is None else d.index] if d.type == "cuda" else []


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
    check_max_text_length(settings, model)
    return settings.max_text_length or min(tokenizer.max_length, tc.max_length)


def check_max_text_length(settings: FinetuneSettings, model: FlavaModel) -> None:
    tc = model.config.text
    if settings.max_text_length is not None and settings.max_text_length > tc.max_length:
        raise ConfigError(f"max_text_length {settings.max_text_length} exceeds the {tc.max_length} tokens the text "
                          f"encoder takes")


def _text_inputs(pad_id: int) -> Callable[[Split, torch.Tensor], dict]:
    """A split's rows `idx` as padded text inputs (ids padded with the tokenizer's `pad_id`)."""
    def inputs(split: Split, idx: torch.Tensor) -> dict:
        ids, mask, types = pad([split.tokens[i] for i in idx.tolist()], pad_id)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return inputs


def finetune_text(model: FlavaModel, task: TextTask, settings: FinetuneSettings, tokenizer: TextTokenizer,
                  on_step: Callable[[int, int, float], None] | None = None,
                  resumable: Resumable | None = None) -> FinetuneResult:
    """Fine-tune a copy of `model`'s text encoder with a head on its CLS state; score `task.test`
    with the state that was best on `task.val` by `task.metrics[0]`."""
    max_length = _check_common(model, tokenizer, settings)
    check_text_task(task)
    regression = task.regression
    tok = truncating_copy(tokenizer, max_length, pairs=any(e.text2 is not None for e in task.train))
    splits = {}
    for name, examples in (("train", task.train), ("val", task.val), ("test", task.test)):
        tokens = encode(tok, [e.text for e in examples], [e.text2 for e in examples])
        dtype = torch.float32 if regression else torch.long
        splits[name] = Split(tokens, torch.tensor([e.label for e in examples], dtype=dtype))
    num_outputs = 1 if regression else len(task.label_names)
    with torch.random.fork_rng(devices=_cuda_index(model)):
        torch.manual_seed(settings.seed)
        tower = model.text_tower().eval().requires_grad_(settings.train_encoders)
        head = TextHead(model.config.text.hidden_size, num_outputs, settings.head_dropout)
        init_weights(head, model.config.init_std)
        job = _Job(task.name, "regression" if regression else "classification", tuple(task.metrics),
                   list(task.label_names), num_outputs, TextClassifier(tower, head).to(model.device), splits,
                   _text_inputs(tokenizer.pad_id), getattr(task, "test_parts", None))
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
    tok = truncating_copy(tokenizer, max_length)
    parts = (task.train, task.val, task.test)
    images, image_rows = image_cache(list(parts), model.config.image.image_size,
                                      model.config.image.image_mean, model.config.image.image_std)
    splits = {}
    for name, examples, rows in zip(("train", "val", "test"), parts, image_rows):
        tokens = encode(tok, [e.text for e in examples], None)
        if task.kind == "vqa":
            splits[name] = Split(tokens, torch.zeros(len(examples), dtype=torch.long),
                                  [dict(e.answers) for e in examples], rows)
        else:
            splits[name] = Split(tokens, torch.tensor([e.label for e in examples], dtype=torch.long), None, rows)

    text_inputs = _text_inputs(tokenizer.pad_id)

    def inputs(split: Split, idx: torch.Tensor) -> dict:
        pixels, image_index = images.batch(split.image_index[idx])
        return {"pixel_values": pixels, "image_index": image_index, **text_inputs(split, idx)}

    num_outputs = len(task.label_names)
    with torch.random.fork_rng(devices=_cuda_index(model)):
        torch.manual_seed(settings.seed)
        flava = copy.deepcopy(model).eval()
        freeze_unused(flava)
        if not settings.train_encoders:
            flava.requires_grad_(False)
        head = MultimodalHead(model.config.multimodal.hidden_size, settings.head_hidden, num_outputs,
                              settings.head_dropout)
        init_weights(head, model.config.init_std)
        job = _Job(task.name, task.kind, tuple(task.metrics), list(task.label_names), num_outputs,
                   MultimodalClassifier(flava, head).to(model.device), splits, inputs)
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
    images, image_rows = image_cache(list(parts), model.config.image.image_size,
                                      model.config.image.image_mean, model.config.image.image_std)
    splits = {name: Split([], torch.tensor([e.label for e in examples], dtype=torch.long), None, rows)
              for name, examples, rows in zip(("train", "val", "test"), parts, image_rows)}

    def inputs(split: Split, idx: torch.Tensor) -> dict:
        pixels, inverse = images.batch(split.image_index[idx])
        return {"pixel_values": pixels[inverse]}

    num_outputs = len(task.label_names)
    with torch.random.fork_rng(devices=_cuda_index(model)):
        torch.manual_seed(settings.seed)
        encoder = copy.deepcopy(model.image_encoder).eval().requires_grad_(settings.train_encoders)
        # Off the CLS path: the pooler (heads bring their own) and the mask token (no masking here).
        encoder.pooler.requires_grad_(False)
        if encoder.mask_token is not None:
            encoder.mask_token.requires_grad_(False)
        head = ImageHead(model.config.image.hidden_size, num_outputs, settings.head_dropout)
        init_weights(head, model.config.init_std)
        job = _Job(task.name, "classification", tuple(task.metrics), list(task.label_names), num_outputs,
                   ImageClassifier(encoder, head).to(model.device), splits, inputs)
        return _run(job, settings, on_step, resumable)


__all__ = ["finetune_image", "finetune_multimodal", "finetune_text"]
