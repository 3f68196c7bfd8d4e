"""Text data: GLUE tasks from their TSV files, and tables of text with labels or regression
targets (CSV, TSV, JSONL, parquet: `flava.data.tables`)."""

from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ...data.tables import Row, read_table
from ...errors import ConfigError, DataError
from ...finetune.examples import TextData, TextExample, check_text_data
from .labels import class_names, label_text, look_alike_notes, numbers_as_classes_note, text_cell
from .splits import carve, check_limit, subsample, subsample_splits, val_and_test
# --------------------------------------------------------------------------- GLUE


@dataclass(frozen=True)
class GlueSpec:
    """Where a GLUE task's fields sit in its TSV files. Columns are header names, or positions
    for CoLA, whose files have no header."""

    name: str
    text: str | int
    text2: str | int | None
    label: str | int
    raw_labels: tuple[str, ...]
    """Label values as written in the files, in class-index order; empty for regression."""
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    dev: str = "dev.tsv"
    header: bool = True
    dev_parts: tuple[tuple[str, str], ...] = ()
    """Named dev files scored alone and averaged (MNLI: matched and mismatched, as the paper reports)."""


_NLI3 = ("contradiction", "entailment", "neutral")
_NLI2 = ("entailment", "not_entailment")
GLUE = {
    "cola": GlueSpec("CoLA", 3, None, 1, ("0", "1"), ("unacceptable", "acceptable"),
                     ("matthews_corrcoef", "accuracy"), header=False),
    "sst2": GlueSpec("SST-2", "sentence", None, "label", ("0", "1"), ("negative", "positive"), ("accuracy",)),
    "mrpc": GlueSpec("MRPC", "#1 String", "#2 String", "Quality", ("0", "1"), ("not_equivalent", "equivalent"),
                     ("f1", "accuracy")),
    "qqp": GlueSpec("QQP", "question1", "question2", "is_duplicate", ("0", "1"), ("not_duplicate", "duplicate"),
                    ("f1", "accuracy")),
    "stsb": GlueSpec("STS-B", "sentence1", "sentence2", "score", (), (), ("pearson", "spearman")),
    "mnli": GlueSpec("MNLI", "sentence1", "sentence2", "gold_label", _NLI3, _NLI3, ("accuracy",),
                     dev="dev_matched.tsv",
                     dev_parts=(("matched", "dev_matched.tsv"), ("mismatched", "dev_mismatched.tsv"))),
    "qnli": GlueSpec("QNLI", "question", "sentence", "label", _NLI2, _NLI2, ("accuracy",)),
    "rte": GlueSpec("RTE", "sentence1", "sentence2", "label", _NLI2, _NLI2, ("accuracy",)),
    "wnli": GlueSpec("WNLI", "sentence1", "sentence2", "label", ("0", "1"), ("not_entailment", "entailment"),
                     ("accuracy",)),
}



def finite_number(raw: str, where: str, what: str) -> float:
    """A table cell read as a regression label: one line naming the place when it is not a finite number."""
    try:
        value = float(raw)
    except ValueError:
        raise DataError(f"{where}: {what} {raw!r} is not a number") from None
    if not math.isfinite(value):
        raise DataError(f"{where}: {what} {raw!r} is not finite")
    return value

def _glue_rows(path: Path, spec: GlueSpec) -> tuple[list[TextExample], int]:
    """(examples, rows skipped for missing fields)."""
    if not path.is_file():
        raise DataError(f"{spec.name}: {path} does not exist (expected the GLUE task directory layout)")
    index = {v: i for i, v in enumerate(spec.raw_labels)}
    examples, skipped = [], 0
    # GLUE's TSVs are not quoted: a quote character is part of the sentence (QUOTE_NONE).
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        columns = {}
        if spec.header:
            header = next(reader, None) or []
            for key in (spec.text, spec.text2, spec.label):
                if key is not None and key not in header:
                    raise DataError(f"{path} has no column {key!r} (columns: {', '.join(header)}); "
                                    f"is this the {spec.name} file?")
            columns = {k: header.index(k) for k in (spec.text, spec.text2, spec.label) if k is not None}
        col = (lambda k: columns[k]) if spec.header else (lambda k: k)
        width = 1 + max(col(k) for k in (spec.text, spec.text2, spec.label) if k is not None)
        for line, row in enumerate(reader, start=2 if spec.header else 1):
            if not row or row == [""]:
                continue
            if len(row) < width:  # QQP's train file has a few broken lines; GLUE's own loaders skip them too
                skipped += 1
                continue
            raw = row[col(spec.label)].strip()
            if spec.raw_labels:
                if raw not in index:
                    raise DataError(f"{path}, line {line}: label {raw!r} is not one of "
                                    f"{', '.join(spec.raw_labels)}")
                label: int | float = index[raw]
            else:
                label = finite_number(raw, f"{path}, line {line}", "score")
            text2 = row[col(spec.text2)] if spec.text2 is not None else None
            examples.append(TextExample(row[col(spec.text)], label, text2))
    return examples, skipped


def glue_task_key(task_name: str) -> str:
    key = task_name.lower().replace("-", "").replace("_", "")
    if key not in GLUE:
        raise ConfigError(f"unknown GLUE task {task_name!r}; choose one of "
                          f"{', '.join(s.name for s in GLUE.values())}")
    return key


def read_glue(task_name: str, directory: str | Path, val_fraction: float = 0.1, seed: int = 0,
              test_file: str | None = None, limit: int | None = None) -> TextData:
    """A GLUE task from its directory as GLUE distributes it (train.tsv, dev.tsv; MNLI:
    dev_matched.tsv and dev_mismatched.tsv). GLUE's test.tsv has no labels, so dev is the test
    split (the paper reports dev) and validation is a seeded `val_fraction` of train. MNLI is
    scored as the paper reports it, the mean of matched and mismatched (`TextData.test_parts`);
    without dev_mismatched.tsv, on matched alone, with a note. `test_file` picks one other
    labelled file; `limit` caps each split (each test part, seeded)."""
    spec = GLUE[glue_task_key(task_name)]
    check_limit(limit)
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{spec.name}: directory {directory} does not exist")
    train, skipped_train = _glue_rows(directory / "train.tsv", spec)
    notes = []
    parts = list(spec.dev_parts) if test_file is None else []
    absent = [f for _, f in parts if not (directory / f).is_file()]
    if parts and absent and (directory / spec.dev).is_file():
        notes.append(f"{', '.join(absent)} absent: scored on {spec.dev} alone (the paper reports the mean of "
                     f"{' and '.join(name for name, _ in parts)})")
        parts = []
    if parts:
        tests, skipped_test = {}, 0
        for i, (name, f) in enumerate(parts):
            rows, skipped = _glue_rows(directory / f, spec)
            tests[name], skipped_test = subsample(rows, limit, seed + 2 + i), skipped_test + skipped
        test = [ex for rows in tests.values() for ex in rows]
        test_parts: dict[str, int] | None = {name: len(rows) for name, rows in tests.items()}
    else:
        test, skipped_test = _glue_rows(directory / (test_file or spec.dev), spec)
        test, test_parts = subsample(test, limit, seed + 2), None
    notes += [f"{n} {split} row(s) with missing fields skipped" for split, n in
              (("train", skipped_train), ("test", skipped_test)) if n]
    train, val = carve(train, val_fraction, seed)
    data = TextData(spec.name, subsample(train, limit, seed), subsample(val, limit, seed + 1), test,
                    list(spec.label_names), spec.metrics, notes, test_parts)
    check_text_data(data)
    return data


# --------------------------------------------------------------------------- generic tables


def read_text_classification(path_train: str | Path, path_val: str | Path | None, path_test: str | Path | None, *,
                             label_names: Sequence[str] | None = None, regression: bool = False,
                             metrics: Sequence[str] | None = None, val_fraction: float = 0.1, seed: int = 0,
                             name: str | None = None, limit: int | None = None) -> TextData:
    """Tables (CSV, TSV, JSONL, parquet: `flava.data.tables`) with columns `text`, `label` and
    optionally `text2` (sentence pairs). Labels are class names: `label_names` fixes their order, else the
    sorted train labels (numerically when they are all integers). `regression` reads numbers.
    Without `path_val`, validation is a seeded `val_fraction` of train; without `path_test`, the
    validation split is the test split too. Default metrics: accuracy (classification), Pearson
    and Spearman (regression)."""
    check_limit(limit)
    paths = {"train": Path(path_train), "val": Path(path_val) if path_val is not None else None,
             "test": Path(path_test) if path_test is not None else None}
    tables = {}
    for split, p in paths.items():
        if p is None:
            continue
        table = read_table(p)
        for c in ("text", "label"):
            table.column(c, fix="the file needs a header with text, label and optionally text2")
        tables[split] = (p, "text2" in table.columns, table.rows)
    pairs = tables["train"][1]
    for split, (p, has_pair, _) in tables.items():  # each split as train: a model reads one shape of input
        if has_pair != pairs:
            raise DataError(f"{p} {'has a' if has_pair else 'has no'} text2 column but the training file "
                            f"{tables['train'][0]} {'has' if pairs else 'has none'}: a model trained on "
                            f"{'sentence pairs' if pairs else 'single texts'} is scored on the same; "
                            f"{'add' if pairs else 'drop'} the column")
    if label_names is not None and not regression:
        names = [str(n) for n in label_names]
        if len(set(names)) != len(names) or len(names) < 2:
            raise ConfigError(f"label_names must be at least two distinct names; got {names}")
    notes: list[str] = []
    kept: dict[str, list[tuple[Row, str]]] = {}
    said: dict[str, str] = {}
    for split, (p, has_pair, rows) in tables.items():
        kept[split], skipped = [], Counter()
        for r in rows:
            # An empty label is no class, an empty text nothing to learn from: each counted by what it lacks.
            raw = label_text(r.get("label"), r.where)
            cells = {"text": text_cell(r.get("text"), r.where), "label": raw}
            if has_pair:
                cells["text2"] = text_cell(r.get("text2"), r.where, "text2")
            empty = [what for what in ("text", "text2", "label") if what in cells and not cells[what].strip()]
            if empty:
                skipped[f"an empty {' and '.join(empty)}"] += 1
            else:
                kept[split].append((r, raw))
        said[split] = ", ".join(f"{n} with {why}" for why, n in skipped.most_common())
        if skipped:
            notes.append(f"{skipped.total()} {split} row(s) skipped ({p}): {said[split]}")
        if not rows:
            raise DataError(f"{p} has no rows")
        if not kept[split]:
            raise DataError(f"{p} has no usable row: its {len(rows)} row(s) were skipped ({said[split]})")
    if regression:
        names = []
    elif label_names is None:
        # Train's classes are those of the rows kept: a label whose every row was skipped had been a
        # class with no example (and let one-class data pass as two).
        names = class_names({raw for _, raw in kept["train"]})
        gone = sorted({label_text(r.get("label"), r.where) for r in tables["train"][2]} - set(names) - {""})
        if gone and len(names) < 2:
            raise DataError(f"{tables['train'][0]}: only label(s) {', '.join(map(repr, names))} are left once rows "
                            f"with an empty cell were skipped ({said['train']}); "
                            f"{', '.join(map(repr, gone))} had no usable row: a classifier needs two classes")
        if gone:
            notes.append(f"label(s) {', '.join(map(repr, gone))} left with no training row once rows were skipped: "
                         "not classes of this model")
        notes += numbers_as_classes_note(names, len(kept["train"]))
    index = {n: i for i, n in enumerate(names)}
    splits: dict[str, list[TextExample]] = {}
    for split, (p, has_pair, _) in tables.items():
        out = []
        for r, raw in kept[split]:
            if regression:
                label: int | float = finite_number(raw, r.where, "target")
            elif raw not in index:
                raise DataError(f"{r.where}: label {raw!r} is not in the label set ({', '.join(names)}); "
                                f"labels of val and test must occur in train or in label_names")
            else:
                label = index[raw]
            out.append(TextExample(text_cell(r.get("text"), r.where),
                                   label, text_cell(r.get("text2"), r.where, "text2") if has_pair else None))
        splits[split] = out
        if regression and len({ex.label for ex in out}) == 1:  # Pearson and Spearman are 0 there by definition
            notes.append(f"every {split} target is {out[0].label:g}: nothing to regress on, and correlations with a "
                         "constant are scored 0")
        if split == "train" and names and label_names is None:
            notes += look_alike_notes([names[ex.label] for ex in out])
    val_and_test(splits, val_fraction, seed, notes, same=lambda ex: (ex.text, ex.text2), what="text",
                 label=None if regression else lambda ex: names[ex.label])
    if metrics is None:
        metrics = ("pearson", "spearman") if regression else ("accuracy",)
    data = TextData(name or paths["train"].stem, *subsample_splits(splits["train"], splits["val"], splits["test"],
                                                                   limit, seed), names, tuple(metrics), notes=notes)
    check_text_data(data)
    return data
