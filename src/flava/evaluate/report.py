"""A suite's report: report.md and report.json beside PNG pictures, optionally comparing several
models (the demo compares the pretrained model with the untrained one). Each task's pictures are
its kind's (`flava.evaluate.kinds`)."""

from __future__ import annotations

import re
from pathlib import Path

from ..io.files import write_json_atomic, write_text_atomic
from .kinds import task_kind
from .results import DOMAINS, SuiteResult, TaskResult


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def draw(task: TaskResult, directory: Path, prefix: str) -> list[str]:
    """The task's pictures, written to `directory`; returns their file names."""
    if task.detail is None:
        return []
    pictures = task_kind(task.kind, task.name).pictures(task, directory / f"{prefix}{_slug(task.name)}")
    return [p for p in pictures if p]


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
    columns = ["task", "score", *labels, *(["pretraining"] if len(results) > 1 else [])]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
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

