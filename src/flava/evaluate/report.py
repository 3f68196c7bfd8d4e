"""A suite's report: report.md and report.json beside PNG pictures, optionally comparing several
models (the demo compares the pretrained model with the untrained one). Each task's pictures are
its kind's (`flava.evaluate.kinds`)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..io.files import write_json_atomic, write_text_atomic
from .kinds import task_kind
from .results import DOMAINS, SuiteResult, TaskResult, mean_error


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def draw(task: TaskResult, directory: Path, stem: str) -> list[str]:
    """The task's pictures, written to `directory` under `stem`; returns their file names."""
    if task.detail is None:
        return []
    pictures = task_kind(task.kind, task.name).pictures(task, directory / stem)
    return [p for p in pictures if p]


def picture_stems(results: list[SuiteResult], labels: list[str]) -> list[dict[str, str]]:
    """Each result's tasks' file stems: a model's label, then the task's name, made file-safe and
    made unique across the report ("Colours A" and "colours-a", two names of Chinese characters,
    a task called "untrained zs" beside the untrained model's "zs" had drawn over each other)."""
    taken: set[str] = set()
    stems = []
    for j, result in enumerate(results):
        prefix = "" if j == 0 else f"{_slug(labels[j])}-"
        own = {}
        for t in result.tasks:
            base = f"{prefix}{_slug(t.name) or 'task'}"
            stem, n = base, 2
            while stem in taken:
                stem, n = f"{base}-{n}", n + 1
            taken.add(stem)
            own[t.name] = stem
        stems.append(own)
    return stems


def to_json(result: SuiteResult, pictures: dict[str, list[str]]) -> dict:
    return {
        "suite": result.name,
        "model": result.model,
        "tasks": [{"name": t.name, "kind": t.kind, "domain": t.domain, "scores": t.scores, "metrics": t.metrics,
                   "examples": t.examples, "notes": t.notes, "seconds": round(t.seconds, 2),
                   "pictures": pictures.get(t.name, [])}
                  for t in result.tasks],
        "domain_averages": result.domain_averages(),
        "macro_average": result.macro_average(),
    }


def summary_rows(results: list[SuiteResult]) -> list[tuple[str, str, list[float], float | None]]:
    """(task, score name, value per model, the noise of the first two's difference) for every
    score row, then the averages. The noise is the standard error of that difference (percent
    points) where each score is a share of its test items, else None: binomial errors, taken as
    independent, so conservative for two models scored on the same items; averages carry them
    as means do."""
    def noise(a: TaskResult, b: TaskResult, key: str) -> float | None:
        sa, sb = a.standard_error(key), b.standard_error(key)
        return None if sa is None or sb is None else float(np.hypot(sa, sb))

    rows: list[tuple[str, str, list[float], float | None]] = []
    by_domain: dict[str, list[float | None]] = {}
    for i, task in enumerate(results[0].tasks):
        for key in task.scores:
            se = noise(task, results[1].tasks[i], key) if len(results) > 1 else None
            rows.append((task.name, key, [r.tasks[i].scores[key] for r in results], se))
            by_domain.setdefault(task.domain, []).append(se)
    domains = []
    for domain in DOMAINS:
        if domain in results[0].domain_averages():
            se = mean_error(by_domain.get(domain, []))
            domains.append(se)
            rows.append((f"{domain} average", "", [r.domain_averages()[domain] for r in results], se))
    rows.append(("macro average", "", [r.macro_average() for r in results], mean_error(domains)))
    return rows


def verdict(values: list[float], noise: float | None = None) -> str:
    """How the first model compares with the second (scores are 'higher is better'): 'same' within
    two standard errors of the difference (`noise`), or under 0.05 points where it is unknown."""
    if len(values) < 2:
        return ""
    diff = values[0] - values[1]
    if abs(diff) <= (2 * noise if noise is not None else 0.05):
        return "same"
    return "better" if diff > 0 else "worse"


def write_report(results: list[SuiteResult], directory: Path, labels: list[str] | None = None) -> Path:
    """report.md, report.json and the pictures of each result; the first result is the subject and
    the others are shown beside it. Returns the markdown path."""
    directory.mkdir(parents=True, exist_ok=True)
    labels = labels or [r.model for r in results]
    pictures: list[dict[str, list[str]]] = []
    for result, stems in zip(results, picture_stems(results, labels)):
        pictures.append({t.name: draw(t, directory, stems[t.name]) for t in result.tasks})
    payload = {"models": labels, "results": [to_json(r, p) for r, p in zip(results, pictures)]}
    write_json_atomic(directory / "report.json", payload)

    lines = [f"# Evaluation: {results[0].name} suite", ""]
    for label, r in zip(labels, results):
        lines.append(f"- **{label}**: `{r.model}`")
    lines += ["", "## Summary (the shape of the paper's Table 3)", ""]
    columns = ["task", "score", *labels, *(["pretraining"] if len(results) > 1 else [])]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for task, key, values, noise in summary_rows(results):
        cells = " | ".join(f"{v:.2f}" for v in values)
        lines.append(f"| {task} | {key} | {cells} |" + (f" {verdict(values, noise)} |" if len(results) > 1 else ""))
    lines += ["", "Scores are percentages (higher is better): R@k for retrieval (TR = image→text, "
              "IR = text→image), top-1 accuracy for classification and probes, the task's metric for fine-tuning "
              "(VQA score for VQA). Domain averages are over score rows, the macro average over domains."
              + (" 'same': the difference is within two standard errors of the test items' sampling noise "
                 "(binomial, per score row and through the averages), or under 0.05 points for scores that are "
                 "no share of items." if len(results) > 1 else ""), ""]
    for j, (label, result) in enumerate(zip(labels, results)):
        lines += [f"## Details: {label}", ""]
        for task in result.tasks:
            lines.append(f"### {task.name} ({task.kind}, {task.domain}, {task.seconds:.0f} s)")
            lines.append("")
            measured = ", ".join(f"{k} {v:.4g}" for k, v in task.metrics.items())
            lines.append(f"measured (fractions, not percent): {measured}")
            for note in task.notes:
                lines.append(f"- {note}")
            for pic in pictures[j].get(task.name, []):
                lines.append(f"\n![{task.name}]({pic})")
            lines.append("")
    md = directory / "report.md"
    write_text_atomic(md, "\n".join(lines) + "\n")
    return md

