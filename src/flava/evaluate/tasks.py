"""Fine-tuning tasks: examples split into train / val / test, and readers for the data sets
FLAVA is evaluated on (GLUE, VQAv2, SNLI-VE, Hateful Memes), for generic tables (read by
`flava.data.tables`) and for the packaged easy-vqa.

Every reader checks what it reads and raises `DataError` naming the file (and line) of the first
problem; `check_text_task` / `check_multimodal_task` repeat the checks for tasks built by hand.
Where a data set publishes no labelled test split (GLUE's test.tsv, VQAv2's test-dev), its
development split is the test split, as in the paper's tables, and the validation split that
picks the checkpoint is carved out of train with a seed.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from ..data.tables import SUFFIXES, Row, read_table
from ..errors import ConfigError, DataError
from ..io.files import read_json

# Metric names the fine-tuner knows (functions of flava.evaluate.metrics).
METRICS = ("accuracy", "f1", "matthews_corrcoef", "pearson", "spearman", "auroc", "vqa_score")


# --------------------------------------------------------------------------- task data


@dataclass
class TextExample:
    text: str
    label: int | float
    """Class index into the task's `label_names`, or the target value of a regression task."""
    text2: str | None = None
    """The second sentence of a pair task; encoded as [CLS] text [SEP] text2 [SEP]."""


@dataclass
class TextTask:
    """A text classification (or regression, when `label_names` is empty) task."""

    name: str
    train: list[TextExample]
    val: list[TextExample]
    test: list[TextExample]
    label_names: list[str]
    metrics: tuple[str, ...]
    """Reported on val and test; the first one picks the best checkpoint."""
    notes: list[str] = field(default_factory=list)
    """What the reader skipped, and why."""

    @property
    def regression(self) -> bool:
        return not self.label_names


@dataclass
class MultimodalExample:
    image: Path | Image.Image
    text: str
    label: int = -1
    """Class index (classification tasks)."""
    answers: dict[int, float] | None = None
    """VQA tasks: answer index -> soft score in (0, 1]; answers outside the vocabulary are absent."""


@dataclass
class MultimodalTask:
    """An image + text task classified from CLS_M: single-label ('classification') or
    multi-label soft-scored answers ('vqa')."""

    name: str
    train: list[MultimodalExample]
    val: list[MultimodalExample]
    test: list[MultimodalExample]
    label_names: list[str]
    """Class names, or the answer vocabulary of a VQA task."""
    metrics: tuple[str, ...]
    kind: str = "classification"
    notes: list[str] = field(default_factory=list)


@dataclass
class ImageExample:
    image: Path | Image.Image
    label: int
    """Class index into the task's `label_names`."""


@dataclass
class ImageTask:
    """An image classification task, classified from the image encoder's CLS state."""

    name: str
    train: list[ImageExample]
    val: list[ImageExample]
    test: list[ImageExample]
    label_names: list[str]
    metrics: tuple[str, ...] = ("accuracy",)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- checks


def _check_metrics(name: str, metrics: Sequence[str]) -> None:
    if not metrics:
        raise ConfigError(f"task {name!r} names no metric")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"task {name!r}: unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")


def _check_nonempty(name: str, splits: dict[str, list]) -> None:
    for split, rows in splits.items():
        if not rows:
            raise DataError(f"task {name!r} has an empty {split} split; every split needs at least one example")


def _check_both_classes(name: str, splits: dict[str, list], labels: Callable[[list], list[int]]) -> None:
    # AUROC is undefined on a split with one class; say so before training rather than after.
    for split in ("val", "test"):
        seen = set(labels(splits[split]))
        if len(seen) < 2:
            raise DataError(f"task {name!r}: AUROC needs both classes in the {split} split, which only has "
                            f"class {sorted(seen)}")


def check_text_task(task: TextTask) -> None:
    """DataError/ConfigError for an empty split, a label outside the label set or a bad metric."""
    splits = {"train": task.train, "val": task.val, "test": task.test}
    _check_nonempty(task.name, splits)
    _check_metrics(task.name, task.metrics)
    regression_metrics = {"pearson", "spearman"}
    if task.regression != (set(task.metrics) <= regression_metrics):
        kind = "a regression" if task.regression else "a classification"
        raise ConfigError(f"task {task.name!r} is {kind} task but asks for {', '.join(task.metrics)}")
    n = len(task.label_names)
    if n == 1:
        raise DataError(f"task {task.name!r} has one label ({task.label_names[0]}); a classifier needs at least two "
                        f"(no label names at all make a regression task)")
    for split, rows in splits.items():
        for i, ex in enumerate(rows):
            if not isinstance(ex.text, str) or (ex.text2 is not None and not isinstance(ex.text2, str)):
                raise DataError(f"task {task.name!r}, {split} example {i}: texts must be strings")
            if task.regression:
                if isinstance(ex.label, bool) or not isinstance(ex.label, (int, float)) or not math.isfinite(ex.label):
                    raise DataError(f"task {task.name!r}, {split} example {i}: regression target {ex.label!r} "
                                    f"is not a finite number")
            elif isinstance(ex.label, bool) or not isinstance(ex.label, (int, np.integer)) or not 0 <= ex.label < n:
                raise DataError(f"task {task.name!r}, {split} example {i}: label {ex.label!r} is not a class "
                                f"index in [0, {n}) ({', '.join(task.label_names)})")
    if n and n != 2 and ("f1" in task.metrics or "auroc" in task.metrics):
        raise ConfigError(f"task {task.name!r}: f1 and auroc are binary metrics but the task has {n} classes")
    if "auroc" in task.metrics:
        _check_both_classes(task.name, splits, lambda rows: [ex.label for ex in rows])


def _check_image_classifier(task, kind: str, texts: bool) -> None:
    """What image and image + text tasks share: splits, labels (or VQA soft scores), metrics, and
    every image a path that exists or a PIL image."""
    splits = {"train": task.train, "val": task.val, "test": task.test}
    _check_nonempty(task.name, splits)
    _check_metrics(task.name, task.metrics)
    n = len(task.label_names)
    if n < 2:
        raise DataError(f"task {task.name!r} has {n} label(s); a classifier needs at least two")
    allowed = {"vqa_score"} if kind == "vqa" else {"accuracy", "f1", "matthews_corrcoef", "auroc"}
    if not set(task.metrics) <= allowed:
        what = "image classification" if not texts else kind
        raise ConfigError(f"task {task.name!r} ({what}) cannot report {', '.join(task.metrics)}")
    if n != 2 and ("f1" in task.metrics or "auroc" in task.metrics):
        raise ConfigError(f"task {task.name!r}: f1 and auroc are binary metrics but the task has {n} classes")
    missing = []
    for split, rows in splits.items():
        for i, ex in enumerate(rows):
            where = f"task {task.name!r}, {split} example {i}"
            if texts and not isinstance(ex.text, str):
                raise DataError(f"{where}: the text must be a string")
            if isinstance(ex.image, Path):
                if not ex.image.is_file():
                    missing.append(ex.image)
            elif not isinstance(ex.image, Image.Image):
                raise DataError(f"{where}: the image must be a path or a PIL image, not {type(ex.image).__name__}")
            if kind == "vqa":
                if ex.answers is None:
                    raise DataError(f"{where}: a VQA example needs `answers` (answer index -> soft score)")
                for a, s in ex.answers.items():
                    if not 0 <= a < n or not 0 < s <= 1:
                        raise DataError(f"{where}: answer {a} with score {s} is outside the {n} answers or (0, 1]")
            elif isinstance(ex.label, bool) or not isinstance(ex.label, (int, np.integer)) or not 0 <= ex.label < n:
                raise DataError(f"{where}: label {ex.label!r} is not a class index in [0, {n})")
    if missing:
        raise DataError(f"task {task.name!r}: {len(missing)} image file(s) do not exist, e.g. {missing[0]}; "
                        f"check the image directory")
    if "auroc" in task.metrics:
        _check_both_classes(task.name, splits, lambda rows: [ex.label for ex in rows])


def check_multimodal_task(task: MultimodalTask) -> None:
    """Like `check_text_task`, plus: every image file exists, VQA soft scores lie in (0, 1]."""
    if task.kind not in ("classification", "vqa"):
        raise ConfigError(f"task {task.name!r}: kind {task.kind!r} is neither 'classification' nor 'vqa'")
    _check_image_classifier(task, task.kind, texts=True)


def check_image_task(task: ImageTask) -> None:
    """Like `check_multimodal_task` for image classification: splits, labels, metrics, files."""
    _check_image_classifier(task, "classification", texts=False)


# --------------------------------------------------------------------------- splitting helpers


def _subsample(rows: list, limit: int | None, seed: int) -> list:
    """At most `limit` rows, a seeded random choice kept in file order."""
    if limit is None or len(rows) <= limit:
        return rows
    keep = np.sort(np.random.default_rng(seed).permutation(len(rows))[:limit])
    return [rows[i] for i in keep]


def _carve(rows: list, fraction: float, seed: int, group: Callable | None = None) -> tuple[list, list]:
    """Split off a seeded `fraction` of rows as validation. With `group`, whole groups go one way
    (questions about one image stay together, so validation images are unseen in training)."""
    if not 0 < fraction < 1:
        raise ConfigError(f"val_fraction must lie strictly between 0 and 1; got {fraction}")
    keys = sorted({group(r) for r in rows}) if group else list(range(len(rows)))
    if len(keys) < 2:
        raise DataError("the training split is too small to carve a validation split from it")
    n_val = min(len(keys) - 1, max(1, round(fraction * len(keys))))
    val_keys = {keys[i] for i in np.random.default_rng(seed).permutation(len(keys))[:n_val]}
    if group:
        return [r for r in rows if group(r) not in val_keys], [r for r in rows if group(r) in val_keys]
    return ([r for i, r in enumerate(rows) if i not in val_keys], [r for i, r in enumerate(rows) if i in val_keys])


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer or None; got {limit!r}")


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
                     dev="dev_matched.tsv"),
    "qnli": GlueSpec("QNLI", "question", "sentence", "label", _NLI2, _NLI2, ("accuracy",)),
    "rte": GlueSpec("RTE", "sentence1", "sentence2", "label", _NLI2, _NLI2, ("accuracy",)),
    "wnli": GlueSpec("WNLI", "sentence1", "sentence2", "label", ("0", "1"), ("not_entailment", "entailment"),
                     ("accuracy",)),
}


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
                try:
                    label = float(raw)
                except ValueError:
                    raise DataError(f"{path}, line {line}: score {raw!r} is not a number") from None
                if not math.isfinite(label):
                    raise DataError(f"{path}, line {line}: score {raw!r} is not finite")
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
              test_file: str | None = None, limit: int | None = None) -> TextTask:
    """A GLUE task from its directory as GLUE distributes it (train.tsv, dev.tsv; MNLI:
    dev_matched.tsv). GLUE's test.tsv has no labels, so dev is the test split (the paper
    reports dev) and validation is a seeded `val_fraction` of train. `test_file` picks another
    labelled file (e.g. MNLI's dev_mismatched.tsv); `limit` caps each split (seeded)."""
    spec = GLUE[glue_task_key(task_name)]
    _check_limit(limit)
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{spec.name}: directory {directory} does not exist")
    train, skipped_train = _glue_rows(directory / "train.tsv", spec)
    test, skipped_test = _glue_rows(directory / (test_file or spec.dev), spec)
    notes = [f"{n} {split} row(s) with missing fields skipped" for split, n in
             (("train", skipped_train), ("test", skipped_test)) if n]
    train, val = _carve(train, val_fraction, seed)
    task = TextTask(spec.name, _subsample(train, limit, seed), _subsample(val, limit, seed + 1),
                    _subsample(test, limit, seed + 2), list(spec.label_names), spec.metrics, notes)
    check_text_task(task)
    return task


# --------------------------------------------------------------------------- generic tables


def read_text_classification(path_train: str | Path, path_val: str | Path | None, path_test: str | Path | None, *,
                             label_names: Sequence[str] | None = None, regression: bool = False,
                             metrics: Sequence[str] | None = None, val_fraction: float = 0.1, seed: int = 0,
                             name: str | None = None, limit: int | None = None) -> TextTask:
    """Tables (CSV, TSV, JSONL, parquet: `flava.data.tables`) with columns `text`, `label` and
    optionally `text2` (sentence pairs). Labels are class names: `label_names` fixes their order, else the
    sorted train labels (numerically when they are all integers). `regression` reads numbers.
    Without `path_val`, validation is a seeded `val_fraction` of train; without `path_test`, the
    validation split is the test split too. Default metrics: accuracy (classification), Pearson
    and Spearman (regression)."""
    _check_limit(limit)
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
    if regression:
        names: list[str] = []
    elif label_names is not None:
        names = [str(n) for n in label_names]
        if len(set(names)) != len(names) or len(names) < 2:
            raise ConfigError(f"label_names must be at least two distinct names; got {names}")
    else:
        seen = {_text(r.get("label")).strip() for r in tables["train"][2]}
        names = sorted(seen, key=int) if all(s.lstrip("-").isdigit() for s in seen) else sorted(seen)
    index = {n: i for i, n in enumerate(names)}
    splits: dict[str, list[TextExample]] = {}
    for split, (p, has_pair, rows) in tables.items():
        out = []
        for r in rows:
            raw = _text(r.get("label")).strip()
            if regression:
                try:
                    label: int | float = float(raw)
                except ValueError:
                    raise DataError(f"{r.where}: target {raw!r} is not a number") from None
                if not math.isfinite(label):
                    raise DataError(f"{r.where}: target {raw!r} is not finite")
            elif raw not in index:
                raise DataError(f"{r.where}: label {raw!r} is not in the label set ({', '.join(names)}); "
                                f"labels of val and test must occur in train or in label_names")
            else:
                label = index[raw]
            out.append(TextExample(_text(r.get("text")), label, _text(r.get("text2")) if has_pair else None))
        splits[split] = out
    if "val" not in splits:
        splits["train"], splits["val"] = _carve(splits["train"], val_fraction, seed)
    splits.setdefault("test", splits["val"])
    if metrics is None:
        metrics = ("pearson", "spearman") if regression else ("accuracy",)
    task = TextTask(name or paths["train"].stem, _subsample(splits["train"], limit, seed),
                    _subsample(splits["val"], limit, seed + 1), _subsample(splits["test"], limit, seed + 2),
                    names, tuple(metrics))
    check_text_task(task)
    return task


# --------------------------------------------------------------------------- VQA


def answer_vocabulary(answers: Sequence[str], min_count: int = 1, max_answers: int | None = None) -> list[str]:
    """Answers ordered by frequency (ties alphabetically), those seen at least `min_count`
    times, at most `max_answers` of them. VQAv2 practice: the questions' majority answers of
    train, min_count 9 (3,129 answers)."""
    counts = Counter(answers)
    vocab = sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))
    return vocab[:max_answers] if max_answers is not None else vocab


def vqa_soft_scores(human_answers: Sequence[str], vocab_index: dict[str, int]) -> dict[int, float]:
    """VQAv2 soft targets: an answer given by n annotators scores min(1, n / 3); answers outside
    the vocabulary are dropped."""
    counts = Counter(human_answers)
    return {vocab_index[a]: min(1.0, n / 3) for a, n in counts.items() if a in vocab_index}


def _normalize_answer(answer: str) -> str:
    # VQAv2's answers are already normalised by its authors; only case and outer space vary.
    return answer.strip().lower()


def easy_vqa_task(val_fraction: float | None = None, seed: int = 0, limit: int | None = None) -> MultimodalTask:
    """easy-vqa (packaged): its train questions split by image into train and validation (by
    default the fixed held-out images of `flava.data.demo.easy_vqa_validation_ids`, else a seeded
    `val_fraction`), its test questions as test. Each question has one answer, which is a soft
    target of 1.0. The answer vocabulary is train's answers by frequency. `limit` caps the
    questions of each split (a seeded choice)."""
    import easy_vqa

    _check_limit(limit)
    rows = {}
    for split in ("train", "test"):
        questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
        paths = getattr(easy_vqa, f"get_{split}_image_paths")()
        rows[split] = [(Path(paths[i]), q, _normalize_answer(a), i) for q, a, i in zip(questions, answers, image_ids)]
    if val_fraction is None:  # the held-out images the demo's pretraining never sees
        from ..data.demo import easy_vqa_validation_ids

        held_out = easy_vqa_validation_ids()
        train = [r for r in rows["train"] if r[3] not in held_out]
        val = [r for r in rows["train"] if r[3] in held_out]
    else:
        train, val = _carve(rows["train"], val_fraction, seed, group=lambda r: r[3])
    train, val, test = (_subsample(train, limit, seed), _subsample(val, limit, seed + 1),
                        _subsample(rows["test"], limit, seed + 2))
    vocab = answer_vocabulary([r[2] for r in train])
    index = {a: i for i, a in enumerate(vocab)}

    def examples(rs):
        # One given answer, so it is the right one outright (VQAv2's n/3 counts ten annotators).
        return [MultimodalExample(p, q, answers={index[a]: 1.0} if a in index else {}) for p, q, a, _ in rs]

    task = MultimodalTask("easy-vqa", examples(train), examples(val), examples(test), vocab, ("vqa_score",), "vqa")
    check_multimodal_task(task)
    return task


def _read_json(path: Path) -> dict:
    return read_json(path, "annotation file", DataError, expect=dict)


def _vqa_split(questions_file: Path, annotations_file: Path, image_dir: Path) -> list[tuple]:
    """(image path, question, majority answer, human answers, image id) per question."""
    qdata, adata = _read_json(questions_file), _read_json(annotations_file)
    if "questions" not in qdata:
        raise DataError(f"{questions_file} has no 'questions' list; is it a VQAv2 questions file?")
    if "annotations" not in adata:
        raise DataError(f"{annotations_file} has no 'annotations' list; is it a VQAv2 annotations file?")
    if not image_dir.is_dir():
        raise DataError(f"image directory {image_dir} does not exist")
    subtype = qdata.get("data_subtype")
    by_question = {a["question_id"]: a for a in adata["annotations"]}
    out = []
    for q in qdata["questions"]:
        a = by_question.get(q["question_id"])
        if a is None:
            raise DataError(f"{annotations_file} has no annotation for question {q['question_id']} of "
                            f"{questions_file}; are they the same split?")
        image_id = int(q["image_id"])
        # COCO 2014 names (COCO_train2014_000000000009.jpg), else COCO 2017 names (000000000009.jpg).
        named = image_dir / f"COCO_{subtype}_{image_id:012d}.jpg" if subtype else None
        path = named if named is not None and named.is_file() else image_dir / f"{image_id:012d}.jpg"
        humans = [_normalize_answer(h["answer"]) for h in a["answers"]]
        out.append((path, q["question"], _normalize_answer(a["multiple_choice_answer"]), humans, image_id))
    return out


def read_vqa(train_questions: str | Path, train_annotations: str | Path, train_images: str | Path,
             test_questions: str | Path, test_annotations: str | Path, test_images: str | Path, *,
             val_fraction: float = 0.1, seed: int = 0, min_answer_count: int = 9,
             limit: int | None = None) -> MultimodalTask:
    """VQAv2 from its JSON files (questions + annotations per split) and COCO image folders.
    Train on train2014 (minus a seeded validation share, split by image), test on val2014
    (test-dev needs the evaluation server). Answers: train's majority answers seen at least
    `min_answer_count` times; targets: min(1, n/3) over the 10 human answers."""
    _check_limit(limit)
    train = _vqa_split(Path(train_questions), Path(train_annotations), Path(train_images))
    test = _vqa_split(Path(test_questions), Path(test_annotations), Path(test_images))
    train, val = _carve(train, val_fraction, seed, group=lambda r: r[4])
    train, val, test = (_subsample(train, limit, seed), _subsample(val, limit, seed + 1),
                        _subsample(test, limit, seed + 2))
    vocab = answer_vocabulary([r[2] for r in train], min_answer_count)
    if len(vocab) < 2:
        raise DataError(f"fewer than two answers occur {min_answer_count}+ times in {train_annotations}; "
                        f"lower min_answer_count")
    index = {a: i for i, a in enumerate(vocab)}

    def examples(rs):
        return [MultimodalExample(p, q, answers=vqa_soft_scores(h, index)) for p, q, _, h, _ in rs]

    task = MultimodalTask("VQAv2", examples(train), examples(val), examples(test), vocab, ("vqa_score",), "vqa")
    check_multimodal_task(task)
    return task


# --------------------------------------------------------------------------- SNLI-VE, Hateful Memes


def _field(row: Row, key: str):
    if key not in row.values:
        raise DataError(f"{row.where} has no field {key!r}")
    return row.values[key]


SNLI_VE_LABELS = ("entailment", "neutral", "contradiction")


def read_snli_ve(directory: str | Path, image_root: str | Path, limit: int | None = None, seed: int = 0,
                 files: tuple[str, str, str] = ("snli_ve_train.jsonl", "snli_ve_dev.jsonl", "snli_ve_test.jsonl"),
                 ) -> MultimodalTask:
    """SNLI-VE: jsonl files (train, dev = validation, test) whose rows hold `Flickr30K_ID`, the
    hypothesis `sentence2` and `gold_label`; the premise is the Flickr30K image
    `<image_root>/<Flickr30K_ID>.jpg`. Rows with SNLI's no-consensus label '-' are skipped."""
    _check_limit(limit)
    directory, image_root = Path(directory), Path(image_root)
    if not image_root.is_dir():
        raise DataError(f"Flickr30K image directory {image_root} does not exist")
    index = {n: i for i, n in enumerate(SNLI_VE_LABELS)}
    splits, notes = [], []
    for split, name in zip(("train", "val", "test"), files):
        path, out, skipped = directory / name, [], 0
        for row in read_table(path).rows:
            label = str(_field(row, "gold_label"))
            if label == "-":
                skipped += 1
                continue
            if label not in index:
                raise DataError(f"{row.where}: gold_label {label!r} is not one of {', '.join(SNLI_VE_LABELS)}")
            image_id = str(_field(row, "Flickr30K_ID"))
            image = image_root / (image_id if image_id.endswith(".jpg") else f"{image_id}.jpg")
            out.append(MultimodalExample(image, str(_field(row, "sentence2")), index[label]))
        if skipped:
            notes.append(f"{skipped} {split} row(s) without a gold label ('-') skipped")
        splits.append(_subsample(out, limit, seed + len(splits)))
    task = MultimodalTask("SNLI-VE", *splits, list(SNLI_VE_LABELS), ("accuracy",), notes=notes)
    check_multimodal_task(task)
    return task


def read_hateful_memes(directory: str | Path, val_file: str = "dev_seen.jsonl", test_file: str = "test_seen.jsonl",
                       limit: int | None = None, seed: int = 0) -> MultimodalTask:
    """Hateful Memes: train.jsonl, `val_file`, `test_file` in `directory`, rows with `img`
    (relative to `directory`), `text` and `label` (0 or 1). Metrics: AUROC (selects), accuracy."""
    _check_limit(limit)
    directory = Path(directory)
    splits = []
    for name in ("train.jsonl", val_file, test_file):
        path, out = directory / name, []
        for row in read_table(path).rows:
            label = _field(row, "label")
            if label not in (0, 1) or isinstance(label, bool):
                raise DataError(f"{row.where}: label {label!r} is not 0 or 1 (a test file without "
                                f"labels cannot be scored; use one that has them)")
            out.append(MultimodalExample(directory / str(_field(row, "img")), str(_field(row, "text")), int(label)))
        splits.append(_subsample(out, limit, seed + len(splits)))
    task = MultimodalTask("Hateful Memes", *splits, ["not_hateful", "hateful"], ("auroc", "accuracy"))
    check_multimodal_task(task)
    return task


# --------------------------------------------------------------------------- user files (flava finetune)

def _text(value) -> str:
    """A cell as text: CSV cells are strings already, JSONL and parquet ones may be numbers."""
    return "" if value is None else str(value)


def _cell(row: Row, keys: tuple[str, ...]):
    """The first of `keys` that the row has and fills."""
    for key in keys:
        value = row.get(key)
        if value is not None and value != "":
            return value
    present = ", ".join(k for k in row.values if k is not None)
    raise DataError(f"{row.where} has no (or an empty) {' or '.join(map(repr, keys))} "
                    f"(fields: {present or 'none'})")


def _image_path(base: Path, value) -> Path:
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else base / p


def _class_names(labels: Sequence[str]) -> list[str]:
    """Sorted label names, numerically when they all are integers."""
    seen = set(labels)
    return sorted(seen, key=int) if all(s.lstrip("-").isdigit() for s in seen) else sorted(seen)


def _index_labels(raw: dict[str, list], names: list[str], make: Callable) -> dict[str, list]:
    """Rows (where, *fields, label name) turned into examples by `make(fields, index)`; a label
    outside `names` is named with its file and line."""
    index = {n: i for i, n in enumerate(names)}
    out = {}
    for split, rows in raw.items():
        examples = []
        for where, *fields, label in rows:
            if label not in index:
                raise DataError(f"{where}: label {label!r} is not a class of the training data "
                                f"({', '.join(names)})")
            examples.append(make(fields, index[label]))
        out[split] = examples
    return out


def _val_and_test(splits: dict[str, list], val_fraction: float, seed: int, notes: list[str],
                  group: Callable | None = None) -> None:
    """Carve validation out of train when it is absent; without a test split, validation is it."""
    if "val" not in splits:
        splits["train"], splits["val"] = _carve(splits["train"], val_fraction, seed, group)
        notes.append(f"validation: a seeded {val_fraction:.0%} of the training data")
    if "test" not in splits:
        splits["test"] = splits["val"]
        notes.append("no test split: the validation split is scored as the test")


def _optional_paths(train, val, test) -> dict[str, Path]:
    return {split: Path(p) for split, p in (("train", train), ("val", val), ("test", test)) if p is not None}


def read_image_classification(path_train: str | Path, path_val: str | Path | None = None,
                              path_test: str | Path | None = None, *, val_fraction: float = 0.1, seed: int = 0,
                              name: str | None = None) -> ImageTask:
    """Each split a folder with one sub-folder of images per class (the folder name is the
    label), or a table (CSV, TSV, JSONL, parquet) with `image` (a path, relative to the file's folder) and
    `label`. Classes are train's, sorted; without `path_val` validation is a seeded
    `val_fraction` of train, without `path_test` validation is scored as the test."""
    from ..data.sources import image_folder

    raw: dict[str, list] = {}
    notes: list[str] = []
    for split, p in _optional_paths(path_train, path_val, path_test).items():
        if p.is_dir():
            src = image_folder(str(p))
            if not src.classes:
                raise DataError(f"{p} has no class sub-folders; put each class's images in a folder named after it")
            loose = sum(r.label < 0 for r in src.records)
            if loose:
                notes.append(f"{loose} image(s) directly in {p}, outside any class folder, skipped")
            raw[split] = [(r.image, r.image, src.classes[r.label]) for r in src.records if r.label >= 0]
        elif p.is_file():
            raw[split] = [(row.where, _image_path(p.parent, _cell(row, ("image",))),
                           str(_cell(row, ("label",))).strip()) for row in read_table(p).rows]
        else:
            raise DataError(f"{p} does not exist (expected a folder of class folders or a table: "
                            f"{', '.join(SUFFIXES)})")
        if not raw[split]:
            raise DataError(f"{p} holds no labelled images")
    names = _class_names([r[-1] for r in raw["train"]])
    splits = _index_labels(raw, names, lambda f, label: ImageExample(f[0], label))
    _val_and_test(splits, val_fraction, seed, notes)
    task = ImageTask(name or Path(path_train).stem, splits["train"], splits["val"], splits["test"], names,
                     ("accuracy",), notes)
    check_image_task(task)
    return task


def read_multimodal_table(path_train: str | Path, path_val: str | Path | None = None,
                          path_test: str | Path | None = None, *, kind: str = "classification",
                          val_fraction: float = 0.1, seed: int = 0, name: str | None = None) -> MultimodalTask:
    """Tables (CSV, TSV, JSONL, parquet) with `image` (a path, relative to the file's folder), `text` (or
    `question`) and, for classification, `label`; for VQA, `answer`, or in JSONL `answers`: a
    list of annotators' answers, each scoring min(1, n/3) as in VQAv2 (one answer scores 1).
    Classes are train's labels sorted; VQA's answers are train's (majority) answers by
    frequency. Validation, when not given, is a seeded share of train's images (questions about
    one image stay together); without `path_test` validation is scored as the test."""
    if kind not in ("classification", "vqa"):
        raise ConfigError(f"kind {kind!r} is neither 'classification' nor 'vqa'")
    raw: dict[str, list] = {}
    for split, p in _optional_paths(path_train, path_val, path_test).items():
        rows = []
        for row in read_table(p).rows:
            image = _image_path(p.parent, _cell(row, ("image",)))
            text = str(_cell(row, ("text", "question")))
            if kind == "vqa":
                answers = row.get("answers") if isinstance(row.get("answers"), list) else None
                if answers is None:
                    answers = [_cell(row, ("answer", "answers"))]
                rows.append((image, text, [_normalize_answer(str(a)) for a in answers]))
            else:
                rows.append((row.where, image, text, str(_cell(row, ("label",))).strip()))
        if not rows:
            raise DataError(f"{p} holds no examples")
        raw[split] = rows
    notes: list[str] = []
    if kind == "vqa":
        def majority(humans: list[str]) -> str:
            counts = Counter(humans)
            return min(counts, key=lambda a: (-counts[a], a))

        names = answer_vocabulary([majority(r[2]) for r in raw["train"]])
        index = {a: i for i, a in enumerate(names)}
        splits = {split: [MultimodalExample(image, text, answers={index[h[0]]: 1.0} if len(h) == 1 and h[0] in index
                                            else vqa_soft_scores(h, index)) for image, text, h in rows]
                  for split, rows in raw.items()}
        metrics: tuple[str, ...] = ("vqa_score",)
    else:
        names = _class_names([r[-1] for r in raw["train"]])
        splits = _index_labels(raw, names, lambda f, label: MultimodalExample(f[0], f[1], label))
        metrics = ("accuracy",)
    _val_and_test(splits, val_fraction, seed, notes, group=lambda ex: str(ex.image))
    task = MultimodalTask(name or Path(path_train).stem, splits["train"], splits["val"], splits["test"], names,
                          metrics, kind, notes)
    check_multimodal_task(task)
    return task
