"""The loss curves of a run as a PNG, drawn from its metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def plot_losses(metrics: Path, png: Path) -> Path | None:
    """One panel for the total loss, one for each objective (steps where it applied). Returns the
    PNG's path, or None when the file holds no logged step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    if not rows:
        return None
    # Steps of different data kinds sum different objectives: one total line per kind.
    totals: dict[str, tuple[list[int], list[float]]] = {}
    series: dict[str, tuple[list[int], list[float]]] = {"total": ([], [])}
    for row in rows:
        steps, values = totals.setdefault(row.get("kind", "all"), ([], []))
        steps.append(row["step"])
        values.append(row["loss"])
        for name, value in row.get("losses", {}).items():
            steps, values = series.setdefault(name, ([], []))
            steps.append(row["step"])
            values.append(value)
    cols = min(3, len(series))
    rows_n = -(-len(series) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.0 * rows_n), squeeze=False)
    for ax, (name, (steps, values)) in zip(axes.flat, series.items()):
        lines = totals if name == "total" else {name: (steps, values)}
        for label, (xs, ys) in lines.items():
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, linewidth=1.2, label=label)
        if name == "total":
            ax.legend(fontsize=8, title="step kind", title_fontsize=8)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.suptitle("pretraining losses (weighted)")
    fig.tight_layout()
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)
    return png
