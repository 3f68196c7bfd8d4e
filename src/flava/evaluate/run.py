"""`flava evaluate`: load a model, prepare a suite (every data error before any work), run it with
progress bars, write the report and print the results table."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..data.tokenizer import TextTokenizer
from ..errors import OutputError
from ..io.files import building, check_writable
from ..progress import progress_bar
from .report import summary_rows, verdict, write_report
from .results import SuiteResult
from .suite import Suite, load_suite, run_suite


STAGING = ".report-"
"""The prefix of the folder a report is written into inside its output before it is moved out."""


def untrained_like(model, seed: int = 0):
    """A newly initialised model of the same configuration: the baseline pretraining must beat. It
    reads texts with `model`'s tokenizer (a text tower's own, where the model was started from one)."""
    from ..model import FlavaModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = FlavaModel(model.config).eval()
    fresh.processor = model.processor
    return fresh


def load_model(path: str | Path):
    """A checkpoint directory, or a run directory's newest checkpoint, loaded for evaluation."""
    from ..loading import load
    from ..io.runs import resolve

    p = resolve(path)
    return load(p).eval(), p


def read_suite(source: str, console: Console) -> Suite:
    """`load_suite`, said first: reading and checking a suite's data takes seconds to minutes."""
    console.print(f"reading suite {escape(str(source))}'s data and checking it")
    return load_suite(source)


def print_plan(suite: Suite, console: Console) -> None:
    # Suite, task and data names are the suite's text: shown as written, never read as markup.
    console.print(f"suite [bold]{escape(suite.name)}[/]: {len(suite.tasks)} tasks, data read and checked")
    for task in suite.tasks:
        console.print(f"  {task.kind:<20} {escape(f'{task.name:<34}')} {task.domain:<10} {escape(task.size)}")


def evaluate_models(models: list[tuple[str, object, str]], suite: Suite, console: Console) -> list[SuiteResult]:
    """Run `suite` on each (label, model, description) with one progress bar per task."""
    results = []
    for label, model, description in models:
        # Each model's own tokenizer (a checkpoint records it when it is not BERT uncased).
        limit = model.config.text.max_length
        tokenizer = TextTokenizer(model.processor.tokenizer_file, max_length=min(limit, suite.max_text_length or limit))
        console.print(f"[bold]{escape(label)}[/]: {escape(description)}")
        with progress_bar(console) as progress:
            def on_task(task):
                bar = progress.add_task(f"  {escape(task.name)}", total=None, info=escape(task.size))

                def update(done: int, total: int) -> None:
                    progress.update(bar, completed=done, total=total)
                return update

            results.append(run_suite(suite, model, tokenizer, description, on_task))
    return results


def results_table(results: list[SuiteResult], labels: list[str], title: str) -> Table:
    table = Table(title=title)
    table.add_column("task")
    table.add_column("score")
    for label in labels:
        table.add_column(label, justify="right")
    if len(results) > 1:
        table.add_column("pretraining", justify="center")
    for task, key, values, noise in summary_rows(results):
        average = not key
        cells = [f"[bold]{v:.2f}[/]" if average else f"{v:.2f}" for v in values]
        v = verdict(values, noise)
        mark = {"better": "[green]better[/]", "worse": "[red]worse[/]", "same": "same"}.get(v, "")
        # Task names and score keys are the suite's text: shown as written, never read as markup.
        table.add_row(f"[bold]{escape(task)}[/]" if average else escape(task), escape(key), *cells,
                      *([mark] if len(results) > 1 else []),
                      end_section=average and task.startswith("macro"))
    return table


def report_files(folder: Path) -> set[str]:
    """The files of the report in `folder` (report.md, report.json and the pictures its JSON
    lists); empty where there is none."""
    try:
        report = json.loads((folder / "report.json").read_text())
        pictures = {p for r in report["results"] for t in r["tasks"] for p in t.get("pictures", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {"report.md", "report.json", *(p for p in pictures if isinstance(p, str) and "/" not in p)}


def place_report(write: Callable[[Path], None], output: Path) -> None:
    """`write(folder)` into a folder inside `output`, then each file moved into `output` (the JSON
    last) and the earlier report's files the new one lacks removed: a stop before leaves the
    earlier report as it was. The folder itself is never moved (it may be the current one)."""
    output.mkdir(parents=True, exist_ok=True)
    before = report_files(output)
    staging = Path(tempfile.mkdtemp(dir=output, prefix=STAGING, suffix=".tmp"))
    try:
        write(staging)
        made = sorted(p.name for p in staging.iterdir())
        for name in sorted(made, key=lambda n: n == "report.json"):
            os.replace(staging / name, output / name)
        for name in before - set(made):
            (output / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_evaluate(model_path: str, suite_source: str, output: Path, console: Console,
                 compare_untrained: bool = False, replace: bool = False) -> list[SuiteResult]:
    """The report goes to `output` when the suite has run (`place_report`); a folder with a
    report is written over only with `replace`, and one with other files not at all."""
    check_writable(output)  # before the suite's work, not after it
    with building(output, "--output"):
        for left in output.glob(f"{STAGING}*.tmp"):  # what a killed evaluation left
            shutil.rmtree(left, ignore_errors=True)
        ours = report_files(output)
        if ours and not replace:
            raise OutputError(f"--output {output} holds a report already; name another folder, or add --replace "
                              "to write over it")
        other = sorted(p.name for p in output.iterdir() if p.name not in ours and not p.name.startswith(".")) \
            if output.is_dir() else []
        if other:
            raise OutputError(f"--output {output} holds other files than a report (e.g. {other[0]}); choose a new or "
                              "empty folder")
        model, resolved = load_model(model_path)
        suite = read_suite(suite_source, console)
        print_plan(suite, console)
        models = [("model", model, str(resolved))]
        if compare_untrained:
            models.append(("untrained", untrained_like(model), "the same configuration, newly initialised"))
        results = evaluate_models(models, suite, console)
        labels = [m[0] for m in models]
        place_report(lambda folder: write_report(results, folder, labels), output)
    console.print(results_table(results, labels, f"{escape(suite.name)} suite (percent, higher is better)"))
    console.print(escape(f"report: {output / 'report.md'} and {output / 'report.json'}"))
    return results
