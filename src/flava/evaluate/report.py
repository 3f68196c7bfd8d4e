"""A suite's report: report.md and report.json beside PNG pictures, optionally comparing several
models (the demo compares the pretrained model with the untrained one)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..io.files import atomic_path, write_json_atomic, write_text_atomic
from .suite import DOMAINS, SuiteResult, TaskResult

MAX_CONFUSION_CLASSES = 30


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    _plt().close(fig)
    return path.name


def retrieval_picture(task: TaskResult, path: Path, queries: int = 4) -> str:
    """Query images, each beside its five most similar captions (its own marked)."""
    from .features import load_image

    plt = _plt()
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
    plt = _plt()
    n = len(classes)
    fig, ax = plt.subplots(figsize=(2 + 0.45 * n, 1.6 + 0.45 * n))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = confusion.max() or 1
    for (r, c), v in np.ndenumerate(confusion):
        if v:
            ax.text(c, r, str(v), ha="center", va="center", fontsize=7, color="white" if v > top / 2 else "black")
    ax.set_title(task.name, fontsize=10)
    return _save(fig, path)


def curve_picture(task: TaskResult, path: Path) -> str:
    """Training loss per step and the validation metric at each evaluation."""
    plt = _plt()
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


def draw(task: TaskResult, directory: Path, prefix: str) -> list[str]:
    """The task's pictures, written to `directory`; returns their file names."""
    if task.detail is None:
        return []
    base = directory / f"{prefix}{_slug(task.name)}"
    out = []
    r = task.detail["result"]
    if task.kind == "retrieval":
        out.append(retrieval_picture(task, base.with_name(base.name + "-examples.png")))
    elif task.kind in ("zero-shot", "linear-probe"):
        out.append(confusion_picture(task, r.confusion, list(task.detail["classes"]),
                                     base.with_name(base.name + "-confusion.png")))
    else:
        out.append(curve_picture(task, base.with_name(base.name + "-training.png")))
        if r.confusion is not None:
            names = r.label_names if len(r.label_names) == len(r.confusion) \
                else [str(i) for i in range(len(r.confusion))]
            out.append(confusion_picture(task, r.confusion, names, base.with_name(base.name + "-confusion.png")))
    return [p for p in out if p]


def to_json(result: SuiteResult, pictures: dict[str, list[str]]) -> dict:
    return {
        "suite": result.name,
        "model": result.model,
        "tasks": [{"name": t.name, "kind": t.kind, "domain": t.domain, "scores": t.scores, "metrics": t.metrics,
                   "notes": t.notes, "seconds": round(t.seconds, 2), "pictures": pictures.get(t.name, [])}
                  for t in result.tasks],
        "domain_averages": result.domain_averages(),
        "macro_average": result.macro_average(),
    }


def summary_rows(results: list[SuiteResult]) -> list[tuple[str, str, list[float]]]:
    """(task, score name, value per model) for every score row, then the averages."""
    rows = []
    for i, task in enumerate(results[0].tasks):
        for key in task.scores:
            rows.append((task.name, key, [r.tasks[i].scores[key] for r in results]))
    for domain in DOMAINS:
        if domain in results[0].domain_averages():
            rows.append((f"{domain} average", "", [r.domain_averages()[domain] for r in results]))
    rows.append(("macro average", "", [r.macro_average() for r in results]))
    return rows


def verdict(values: list[float]) -> str:
    """How the first model compares with the second (scores are 'higher is better')."""
    if len(values) < 2:
        return ""
    diff = values[0] - values[1]
    if abs(diff) < 0.05:
        return "same"
    return "better" if diff > 0 else "worse"


def write_report(results: list[SuiteResult], directory: Path, labels: list[str] | None = None) -> Path:
    """report.md, report.json and the pictures of each result; the first result is the subject and
    the others are shown beside it. Returns the markdown path."""
    directory.mkdir(parents=True, exist_ok=True)
    labels = labels or [r.model for r in results]
    pictures: list[dict[str, list[str]]] = []
    for j, result in enumerate(results):
        prefix = "" if j == 0 else f"{_slug(labels[j])}-"
        pictures.append({t.name: draw(t, directory, prefix) for t in result.tasks})
    payload = {"models": labels, "results": [to_json(r, p) for r, p in zip(results, pictures)]}
    write_json_atomic(directory / "report.json", payload)

    lines = [f"# Evaluation: {results[0].name} suite", ""]
    for label, r in zip(labels, results):
        lines.append(f"- **{label}**: `{r.model}`")
    lines += ["", "## Summary (the shape of the paper's Table 3)", ""]
    head = "| task | score | " + " | ".join(labels) + (" | pretraining |" if len(results) > 1 else "")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for task, key, values in summary_rows(results):
        cells = " | ".join(f"{v:.2f}" for v in values)
        lines.append(f"| {task} | {key} | {cells} |" + (f" {verdict(values)} |" if len(results) > 1 else ""))
    lines += ["", "Scores are percentages (higher is better): R@k for retrieval (TR = image→text, "
              "IR = text→image), top-1 accuracy for classification and probes, the task's metric for fine-tuning "
              "(VQA score for VQA). Domain averages are over score rows, the macro average over domains.", ""]
    for j, (label, result) in enumerate(zip(labels, results)):
        lines += [f"## Details: {label}", ""]
        for task in result.tasks:
            lines.append(f"### {task.name} ({task.kind}, {task.domain}, {task.seconds:.0f} s)")
            lines.append("")
            lines.append(", ".join(f"{k} {v:.4g}" for k, v in task.metrics.items()))
            for note in task.notes:
                lines.append(f"- {note}")
            for pic in pictures[j].get(task.name, []):
                lines.append(f"\n![{task.name}]({pic})")
            lines.append("")
    md = directory / "report.md"
    write_text_atomic(md, "\n".join(lines) + "\n")
    return md

