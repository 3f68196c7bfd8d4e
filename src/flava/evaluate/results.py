"""What running a suite yields: `Measured` (what a task kind's run returns), `TaskResult` (that,
named and placed in a domain) and `SuiteResult` with the paper's domain and macro averages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

DOMAINS = ("vision", "language", "multimodal")


def percent(d: dict[str, float]) -> dict[str, float]:
    return {k: 100.0 * v for k, v in d.items()}


@dataclass
class Measured:
    """A task kind's outcome; the suite adds the task's name, kind and domain."""

    scores: dict[str, float]
    """Percent: the rows that enter the domain average."""
    metrics: dict[str, float]
    notes: list[str] = field(default_factory=list)
    detail: Any = None
    examples: dict[str, int] = field(default_factory=dict)
    """Per score row that is a share of test items (an accuracy, a recall), how many items: its
    noise is then a binomial one. Absent for scores that are no share (a correlation)."""


@dataclass
class TaskResult:
    """One task's outcome. `scores` (percent) are the rows that enter the domain average, as in
    the paper's Table 4 (e.g. TR R@1, TR R@5, IR R@1, IR R@5 for a retrieval task)."""

    name: str
    kind: str
    domain: str
    scores: dict[str, float]
    metrics: dict[str, float] = field(default_factory=dict)
    """Every number measured (fractions as measured, not percent)."""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    detail: Any = field(default=None, repr=False)
    """What the report draws from (a RetrievalResult, ProbeResult, FinetuneResult, ...)."""
    examples: dict[str, int] = field(default_factory=dict)
    """`Measured.examples`."""

    def standard_error(self, key: str) -> float | None:
        """The binomial standard error of score row `key` (percent), or None when it is no share."""
        return binomial_error(self.scores[key], self.examples.get(key))


@dataclass
class SuiteResult:
    name: str
    model: str
    tasks: list[TaskResult]

    def domain_averages(self) -> dict[str, float]:
        """Mean of the score rows of each domain's tasks (domains without a task are absent)."""
        out = {}
        for domain in DOMAINS:
            rows = [v for t in self.tasks if t.domain == domain for v in t.scores.values()]
            if rows:
                out[domain] = float(np.mean(rows))
        return out

    def scores(self) -> dict:
        """The scores alone, as ablation rows keep them: per task its domain, score rows and their
        test items (`TaskResult.examples`), and the domain averages."""
        return {"tasks": {t.name: {"domain": t.domain, "scores": t.scores, "examples": t.examples}
                          for t in self.tasks},
                "domain_averages": self.domain_averages()}

    def macro_average(self) -> float:
        """Mean of the domain averages (the paper's macro average)."""
        return float(np.mean(list(self.domain_averages().values())))


def binomial_error(score: float, items: int | None) -> float | None:
    """The standard error (percent points) of a score that is a share of `items` test items."""
    if not items:
        return None
    p = min(max(score / 100.0, 0.0), 1.0)
    return 100.0 * float(np.sqrt(p * (1 - p) / items))


def mean_error(parts: list[float | None], count: int | None = None) -> float | None:
    """The standard error of a mean of `count` (default: all of them) independent terms whose
    errors are `parts` (terms left out count 0); None when there is none or one is unknown."""
    if not parts or any(p is None for p in parts):
        return None
    return float(np.sqrt(sum(p * p for p in parts))) / (count or len(parts))


def domain_noise(a: dict, b: dict) -> dict[str, float | None]:
    """For two results in `SuiteResult.scores()` form: the standard error of the difference of
    each domain average (the binomial errors of its score rows, taken as independent, carried as
    means do), None where a row is no share of items or its items were not recorded."""
    out: dict[str, float | None] = {}
    for domain in DOMAINS:
        parts: list[float | None] = []
        for name, ta in a["tasks"].items():
            tb = b["tasks"].get(name)
            if ta["domain"] != domain or tb is None:
                continue
            for key, value in ta["scores"].items():
                ea = binomial_error(value, ta.get("examples", {}).get(key))
                eb = binomial_error(tb["scores"].get(key, value), tb.get("examples", {}).get(key))
                parts.append(None if ea is None or eb is None else float(np.hypot(ea, eb)))
        out[domain] = mean_error(parts)
    return out
