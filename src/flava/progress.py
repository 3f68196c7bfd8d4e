"""The progress bar every long-running command shows: count, throughput/losses, elapsed, ETA."""

import time
from datetime import timedelta

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

LINE_EVERY_S = 30.0
"""Where the output is no terminal (a log file under nohup, Slurm or CI): a line per task this often."""


def progress_bar(console: Console) -> Progress:
    """A bar whose tasks carry an `info` field (losses, samples/s); plain lines where the output
    is no terminal."""
    # MofN: "3/?" while the total is unknown (e.g. features computed before fine-tuning), not "3/None".
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    return Progress(*columns, console=console) if console.is_terminal else _Lines(*columns, console=console)


class _Lines(Progress):
    """Progress written to a log: rich draws its bar there once, at the end, and cut to the
    console's width (the step count and times became '…'); this writes each task's state as one
    plain line every LINE_EVERY_S seconds and when it ends."""

    def __init__(self, *columns, console: Console):
        super().__init__(*columns, console=console, disable=True)
        self._said: dict = {}
        """Task id -> (time, completed) of its last line (completed None: none yet)."""

    def update(self, task_id, **changes) -> None:
        super().update(task_id, **changes)
        self._line(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._line(task_id)

    def stop(self) -> None:
        for task in self.tasks:
            self._line(task.id, final=True)
        super().stop()

    def _line(self, task_id, final: bool = False) -> None:
        task, now = self._tasks[task_id], time.monotonic()
        final = final or task.finished  # said as it finishes, not when the whole block ends
        at, completed = self._said.setdefault(task_id, (now, None))
        if completed == task.completed or not final and now - at < LINE_EVERY_S:
            return
        self._said[task_id] = now, task.completed
        total = "?" if task.total is None else f"{task.total:,.0f}"
        parts = [f"{task.description} {task.completed:,.0f}/{total}", task.fields.get("info", ""),
                 f"{timedelta(seconds=int(task.finished_time or task.elapsed or 0))} elapsed"]
        if not task.finished and task.time_remaining is not None:
            parts.append(f"about {timedelta(seconds=int(task.time_remaining))} left")
        self.console.print(", ".join(p for p in parts if p), soft_wrap=True)
