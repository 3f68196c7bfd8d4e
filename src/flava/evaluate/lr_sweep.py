"""Fine-tuning as a suite task, shared by the fine-tuning task kinds: settings over the suite's
defaults, an optional learning-rate sweep chosen on validation (as the paper tunes each task), the
paper's headline score, and the report's training curve and confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import ConfigError
from ..finetune.examples import MultimodalData, TextData
from ..finetune.loop import finetune_multimodal, finetune_text
from ..finetune.settings import FinetuneResult, FinetuneSettings
from .pictures import beside, confusion_picture, curve_picture
from .results import Measured, TaskResult, percent
from .task_spec import TaskSpec


@dataclass
class FinetuneJob:
    """A fine-tuning task ready to run: its data, its settings and the rates to sweep (None: settings.lr)."""

    data: TextData | MultimodalData
    settings: FinetuneSettings
    lr_sweep: list[float] | None = None


def read_settings(t: TaskSpec) -> tuple[FinetuneSettings, list[float] | None]:
    """The task's settings over the suite's, and its learning-rate sweep."""
    from ..config import from_dict

    merged = {**t.settings, **t.spec.get("settings", {})}
    try:  # the key path says where: "task 1: unknown config key 'settings.epoch'"
        settings = from_dict(FinetuneSettings, merged, "settings")
    except ConfigError as e:
        raise ConfigError(f"{t.where}: {e}") from None
    sweep = t.spec.get("lr_sweep")
    if sweep is None:
        return settings, None
    if not isinstance(sweep, list) or not sweep or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in sweep):
        raise ConfigError(f"{t.where}: lr_sweep takes a list of positive learning rates, e.g. [1e-4, 3e-4]; "
                          f"got {sweep!r}")
    if "lr" in t.spec.get("settings", {}):
        raise ConfigError(f"{t.where}: give either settings.lr or lr_sweep, not both")
    if len(set(map(float, sweep))) < len(sweep):  # each rate would fine-tune again for the same scores
        raise ConfigError(f"{t.where}: lr_sweep names a rate twice ({sweep!r}); give each once")
    return settings, [float(x) for x in sweep]


SHARES = ("accuracy", "vqa_score", "acc/F1")
"""Headline scores that are shares of the test items (VQA's soft score and MRPC's mean of accuracy
and F1 close enough to one for their noise)."""


def headline(metrics_: dict[str, float], task_metrics: tuple[str, ...]) -> dict[str, float]:
    """The paper's per-task score: accuracy and F1 averaged for MRPC/QQP, else the first metric."""
    if {"accuracy", "f1"} <= set(task_metrics):
        return {"acc/F1": (metrics_["accuracy"] + metrics_["f1"]) / 2}
    first = task_metrics[0]
    return {first: metrics_[first]}


def size(job: FinetuneJob) -> str:
    data, sweep = job.data, job.lr_sweep
    outputs = f"{len(data.label_names)} {'answers' if getattr(data, 'kind', '') == 'vqa' else 'classes'}" \
        if data.label_names else "regression"
    rates = f", learning rates {', '.join(f'{x:g}' for x in sweep)}" if sweep else ""
    return f"{len(data.train)}/{len(data.val)}/{len(data.test)} examples, {outputs}{rates}"


def run(job: FinetuneJob, model, tokenizer, progress) -> Measured:
    """Fine-tune once per learning rate and score the run best on validation, so every model of a
    comparison gets the rate that suits it."""
    data, settings, lr_sweep = job.data, job.settings, job.lr_sweep
    runs = [replace(settings, lr=lr) for lr in lr_sweep] if lr_sweep else [settings]
    fn = finetune_text if isinstance(data, TextData) else finetune_multimodal
    r: FinetuneResult | None = None  # only the best so far is kept: each holds a fine-tuned model copy
    chosen, tried = settings.lr, []
    for i, s in enumerate(runs):
        this = fn(model, data, s, tokenizer,
                  on_step=lambda step, total, loss, i=i: progress(i * total + step, len(runs) * total))
        tried.append(f"{s.lr:g}: {this.best_val:.4f}")
        if r is None or this.best_val > r.best_val:
            r, chosen = this, s.lr
    notes = list(data.notes) + [f"best validation {r.metric} {r.best_val:.4f} at step {r.best_step} of {r.steps}"]
    if lr_sweep:
        notes.append(f"learning rate {chosen:g} chosen on validation {r.metric} ({', '.join(tried)})")
    if not settings.train_encoders:
        notes.append("encoders frozen: the head alone was trained")
    scores = percent(headline(r.test_metrics, tuple(data.metrics)))
    shares = {k: len(data.test) for k in scores if k in SHARES}  # a correlation is no share of items
    return Measured(scores, r.test_metrics, notes, detail={"result": r}, examples=shares)


def pictures(result: TaskResult, base: Path) -> list[str | None]:
    """The training curve, and the confusion matrix of a classifier."""
    r = result.detail["result"]
    out = [curve_picture(result, beside(base, "-training.png"))]
    if r.confusion is not None:
        names = r.label_names if len(r.label_names) == len(r.confusion) else [str(i) for i in range(len(r.confusion))]
        out.append(confusion_picture(result, r.confusion, names, beside(base, "-confusion.png")))
    return out
