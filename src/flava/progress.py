"""The progress bar every long-running command shows: count, throughput/losses, elapsed, ETA."""

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


def progress_bar(console: Console) -> Progress:
    """A bar whose tasks carry an `info` field (losses, samples/s)."""
    # MofN: "3/?" while the total is unknown (e.g. features computed before fine-tuning), not "3/None".
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console)
