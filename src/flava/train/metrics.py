"""What a run reports as it goes: metrics.jsonl, TensorBoard events, and the loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path

from ..io.files import atomic_path, write_text_atomic


class MetricsLog:
    """One writer of a run's logged steps: a JSON line each, and TensorBoard scalars."""

    def __init__(self, output: Path, tensorboard: bool):
        self.output = Path(output)
        self.path = self.output / "metrics.jsonl"
        self.tensorboard = tensorboard
        self._file = None
        self._writer = None

    def __enter__(self) -> "MetricsLog":
        self.output.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._file.close()
        except OSError:  # the write that failed (a full disk) is what to say, not its repeat on close
            if exc[0] is None:
                raise
        self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def write(self, row: dict) -> None:
        try:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        except OSError as e:  # a full disk's error names no file: the message would say "a file"
            e.filename = e.filename or str(self.path)
            raise
        if self.tensorboard:
            self._add_scalars(row)

    def _add_scalars(self, row: dict) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed run wrote after the checkpoint it resumes from.
            self._writer = SummaryWriter(str(self.output / "tensorboard"), purge_step=row["step"])
        w, step = self._writer, row["step"]
        if row["loss"] is not None:  # None: a step that measured nothing (no token masked)
            w.add_scalar("loss", row["loss"], step)
        for group in ("losses", "metrics", "skipped", "bad_records"):
            for k, v in row.get(group, {}).items():
                w.add_scalar(f"{group}/{k}", v, step)
        for enc, d in row.get("gradients", {}).items():
            for what in ("norm", "cosine"):
                for k, v in d[what].items():
                    w.add_scalar(f"gradients/{enc}/{what}/{k}", v, step)
        w.add_scalar("lr", row["lr"], step)
        w.add_scalar("samples_per_s", row["samples_per_s"], step)

    def truncate_after(self, step: int) -> None:
        """Drop the lines of steps after `step` (a resumed run logs them again), and a partial
        line a killed write left."""
        if self.path.is_file():
            kept = [line for line, row in _rows(self.path) if row["step"] <= step]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))


def _rows(path: Path) -> list[tuple[str, dict]]:
    """(line, row) of every complete JSON line; a line cut short by a crash is passed over."""
    out = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            out.append((line, row))
    return out


def plot_losses(metrics: Path, png: Path) -> Path | None:
    """One panel for the total loss, one for each objective (steps where it applied). Returns the
    PNG's path, or None when the file holds no logged step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for _, row in _rows(metrics)]
    if not rows:
        return None
    # Steps of different data kinds sum different objectives: one total line per kind.
    totals: dict[str, tuple[list[int], list[float]]] = {}
    series: dict[str, tuple[list[int], list[float]]] = {"total": ([], [])}
    for row in rows:
        steps, values = totals.setdefault(row.get("kind", "all"), ([], []))
        if row.get("loss") is not None:  # a step that measured nothing has no loss to draw
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
        # Placed where matplotlib would put it (no labels above a panel): left to itself it measures
        # every tick label to check, a fifth of the figure's time.
        ax.set_title(name, y=1.0)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.suptitle("pretraining losses (weighted)")
    # Fixed margins for panels of this size: tight_layout measured every label, two thirds of the time.
    width, height = 4.2 * cols, 3.0 * rows_n
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.2 / width, bottom=0.55 / height, top=1 - 0.8 / height,
                        wspace=0.3, hspace=0.45)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return png
