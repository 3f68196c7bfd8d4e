"""The report's pictures, drawn with matplotlib (Agg) and written atomically: retrieval examples,
confusion matrices, fine-tuning curves. Task kinds choose which of them their results get."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io.files import atomic_path
from .results import TaskResult

MAX_CONFUSION_CLASSES = 30


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def beside(base: Path, suffix: str) -> Path:
    """`base` (a path prefix) with `suffix` appended to its name."""
    return base.with_name(base.name + suffix)


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    pyplot().close(fig)
    return path.name


def count_colour(value: float, top: float) -> str:
    """The colour of a count drawn on a cell of a 0..top "Blues" scale: readable on the dark half too."""
    return "white" if value > top / 2 else "black"


def retrieval_picture(task: TaskResult, path: Path, queries: int = 4) -> str:
    """Query images, each beside its five most similar captions (its own marked)."""
    from .features import load_image

    plt = pyplot()
    result, images = task.detail["result"], task.detail["images"]
    picks = np.linspace(0, len(images) - 1, min(queries, len(images))).astype(int)
    fig, axes = plt.subplots(len(picks), 2, figsize=(9, 1.9 * len(picks)),
                             gridspec_kw={"width_ratios": [1, 3.2]}, squeeze=False)
    for row, i in enumerate(picks):
        axes[row, 0].imshow(load_image(images[i]))
        axes[row, 0].axis("off")
        ax = axes[row, 1]
        ax.axis("off")
        for k, (caption, sim, own) in enumerate(result.top_captions(int(i), 5)):
            ax.text(0, 0.9 - 0.2 * k, f"{k + 1}. {'✓' if own else '✗'} {caption}  ({sim:.3f})",
                    color="darkgreen" if own else "dimgray", fontsize=9, transform=ax.transAxes, va="center")
    fig.suptitle(f"{task.name}: top-5 captions per image (✓ = one of its own)", fontsize=10)
    return _save(fig, path)


def confusion_picture(task: TaskResult, confusion: np.ndarray, classes: list[str], path: Path) -> str | None:
    """Counts, rows true class and columns predicted class."""
    if confusion is None or len(classes) > MAX_CONFUSION_CLASSES:
        return None
    plt = pyplot()
    n = len(classes)
    fig, ax = plt.subplots(figsize=(2 + 0.45 * n, 1.6 + 0.45 * n))
    top = confusion.max() or 1
    ax.imshow(confusion, cmap="Blues", vmin=0, vmax=top)
    ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (r, c), v in np.ndenumerate(confusion):
        if v:
            ax.text(c, r, str(v), ha="center", va="center", fontsize=7, color=count_colour(v, top))
    ax.set_title(task.name, fontsize=10)
    return _save(fig, path)


def curve_picture(task: TaskResult, path: Path) -> str:
    """Training loss per step and the validation metric at each evaluation."""
    plt = pyplot()
    r = task.detail["result"]
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    steps = np.arange(1, len(r.train_loss) + 1)
    ax.plot(steps, r.train_loss, color="tab:blue", alpha=0.35, linewidth=0.8)
    if len(r.train_loss) >= 10:
        w = max(1, len(r.train_loss) // 20)
        smooth = np.convolve(r.train_loss, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, color="tab:blue", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(r.eval_steps, r.val_curve, color="tab:orange", marker="o")
    ax2.axvline(r.best_step, color="tab:orange", linestyle=":", linewidth=1)
    ax2.set_ylabel(f"validation {r.metric}", color="tab:orange")
    ax.set_title(f"{task.name} (best step {r.best_step})", fontsize=10)
    return _save(fig, path)


def classifier_pictures(task: TaskResult, base: Path) -> list[str | None]:
    """The confusion matrix of a result whose detail holds the classifier's result and its classes."""
    return [confusion_picture(task, task.detail["result"].confusion, list(task.detail["classes"]),
                              beside(base, "-confusion.png"))]
