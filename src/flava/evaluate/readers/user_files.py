"""A user's own data for `flava finetune`: folders of class folders and tables of images with
labels, texts or VQA answers; validation carved from train when absent, and validation scored as
the test when no test split is given."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Callable

from ...data.members import Blob, ImageURL, table_image
from ...data.tables import SUFFIXES, Row, read_table
from ...errors import ConfigError, DataError
from ...finetune.examples import (
    ImageData,
    ImageExample,
    MultimodalData,
    MultimodalExample,
    check_image_data,
    check_multimodal_data,
)
from .labels import class_names, label_text, look_alike_notes, text_cell
from .multimodal import answer_vocabulary, normalize_answer, vqa_accuracy_scores, vqa_row_targets, vqa_soft_scores
from .splits import file_identity, val_and_test
class _Rows:
    """A fine-tuning table's rows with their cells as examples need them: a column none of whose
    accepted names is in the table is refused (a misspelt header); a row with an empty cell is
    skipped and counted by what it lacks, as text tables' are."""

    def __init__(self, path: Path):
        self.path, self.table = path, read_table(path)
        self.skipped: Counter = Counter()

    def need(self, *keys: str) -> None:
        self.table.column(*keys, fix=f"name it {keys[0]!r}")

    def filled(self, row: Row, *keys: str):
        """The first of `keys` the row fills; else None."""
        for key in keys:
            value = row.get(key)
            if value is not None and (not isinstance(value, str) or value.strip()):
                return value
        return None

    def lacks(self, **cells) -> bool:
        """Whether a row lacks one of `cells` (its values, None where empty): counted once, by what
        it lacks, as text tables count theirs."""
        empty = [name for name, value in cells.items() if value is None]
        if empty:
            self.skipped[f"an empty {' and '.join(empty)}"] += 1
        return bool(empty)

    def said(self) -> str:
        return ", ".join(f"{n} with {why}" for why, n in self.skipped.most_common())

    def check(self, split: str, kept: list, notes: list[str]) -> None:
        if self.skipped:
            notes.append(f"{self.skipped.total()} {split} row(s) skipped ({self.path}): {self.said()}")
        if not self.table.rows:
            raise DataError(f"{self.path} has no rows")
        if not kept:
            raise DataError(f"{self.path} has no usable row: its {len(self.table.rows)} row(s) were skipped "
                            f"({self.said()})")


def _image_path(base: Path, value, where: str) -> Path | Blob:
    image = table_image(base, value)
    if isinstance(image, ImageURL):
        raise DataError(f"{where}: image {image} is a URL, which flava does not fetch: download the images first "
                        "and name their files")
    return image


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


def answer_list(value) -> list[str] | None:
    """A VQA row's `answers` as a list: a JSONL or parquet list, or a CSV cell holding one as JSON
    (as `flava predict` writes it), its empty and null entries left out; None when the value is no
    list (a single answer, or none)."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, list):
        return None
    return [str(a) for a in value if a is not None and str(a).strip()]


def _optional_paths(train, val, test) -> dict[str, Path]:
    return {split: Path(p) for split, p in (("train", train), ("val", val), ("test", test)) if p is not None}


def read_image_classification(path_train: str | Path, path_val: str | Path | None = None,
                              path_test: str | Path | None = None, *, val_fraction: float = 0.1, seed: int = 0,
                              name: str | None = None) -> ImageData:
    """Each split a folder with one sub-folder of images per class (the folder name is the
    label), or a table (CSV, TSV, JSONL, parquet) with `image` (a path, relative to the file's folder) and
    `label`. Classes are train's, sorted; without `path_val` validation is a seeded
    `val_fraction` of train, without `path_test` validation is scored as the test."""
    from ...data.images import empty_class_folders, find_images, said_empty, said_left_out

    raw: dict[str, list] = {}
    notes: list[str] = []
    for split, p in _optional_paths(path_train, path_val, path_test).items():
        if p.is_dir():
            others: Counter = Counter()
            # The first sub-folder is the class, as data.sources.image_folder has it.
            files = [(f, f.relative_to(p).parts) for f in find_images([p], others)]
            if not any(len(parts) > 1 for _, parts in files):
                raise DataError(f"{p} has no class sub-folders; put each class's images in a folder named after it")
            loose = sum(len(parts) == 1 for _, parts in files)
            if loose:
                notes.append(f"{loose} image(s) directly in {p}, outside any class folder, skipped")
            if others:
                notes.append(f"in {p}: {said_left_out(others, '', '')}")
            empty = empty_class_folders(p, [f for f, _ in files])
            if empty:
                notes.append(said_empty(p, empty))
            raw[split] = [(f, f, parts[0]) for f, parts in files if len(parts) > 1]
        elif p.is_file():
            table, raw[split] = _Rows(p), []
            table.need("image"), table.need("label")
            for row in table.table.rows:
                image, label = table.filled(row, "image"), table.filled(row, "label")
                if not table.lacks(image=image, label=label):
                    raw[split].append((row.where, _image_path(p.parent, image, row.where),
                                       label_text(label, row.where)))
            table.check(split, raw[split], notes)
        else:
            raise DataError(f"{p} does not exist (expected a folder of class folders or a table: "
                            f"{', '.join(SUFFIXES)})")
        if not raw[split]:
            raise DataError(f"{p} holds no labelled images")
    names = class_names([r[-1] for r in raw["train"]])
    notes += look_alike_notes([r[-1] for r in raw["train"]], "image" if Path(path_train).is_dir() else "row")
    splits = _index_labels(raw, names, lambda f, label: ImageExample(f[0], label))
    val_and_test(splits, val_fraction, seed, notes, same=lambda ex: file_identity(ex.image), what="image file",
                 label=lambda ex: names[ex.label])
    data = ImageData(name or Path(path_train).stem, splits["train"], splits["val"], splits["test"], names,
                     ("accuracy",), notes)
    check_image_data(data)
    return data


def read_multimodal_table(path_train: str | Path, path_val: str | Path | None = None,
                          path_test: str | Path | None = None, *, kind: str = "classification",
                          val_fraction: float = 0.1, seed: int = 0, name: str | None = None) -> MultimodalData:
    """Tables (CSV, TSV, JSONL, parquet) with `image` (a path, relative to the file's folder), `text` (or
    `question`) and, for classification, `label`; for VQA, `answer`, or `answers`: a list of
    annotators' answers (in a CSV, a JSON list): trained on min(1, n/3) as in VQAv2 (one answer scores 1), validation
    and test scored by the official VQA accuracy (`vqa_accuracy_scores`).
    Classes are train's labels sorted; VQA's answers are train's (majority) answers, processed as the
    official VQA evaluator does (`normalize_answer`), by frequency. Validation, when not given, is a
    seeded share of train's images (questions about one image stay together); without `path_test`
    validation is scored as the test."""
    if kind not in ("classification", "vqa"):
        raise ConfigError(f"kind {kind!r} is neither 'classification' nor 'vqa'")
    raw: dict[str, list] = {}
    notes: list[str] = []
    for split, p in _optional_paths(path_train, path_val, path_test).items():
        rows, table = [], _Rows(p)
        table.need("image"), table.need("text", "question"), table.need(*(("answer", "answers") if kind == "vqa"
                                                                           else ("label",)))
        for row in table.table.rows:
            image, text = table.filled(row, "image"), table.filled(row, "text", "question")
            if kind == "vqa":
                answers = answer_list(row.get("answers"))
                # No list, or an empty one: the row's `answer`.
                answer = None if answers else table.filled(row, *(("answer", "answers") if answers is None
                                                                  else ("answer",)))
                if table.lacks(image=image, text=text, answer=answers or answer):
                    continue
                answers = answers or [text_cell(answer, row.where, "answer")]
                rows.append((_image_path(p.parent, image, row.where), text_cell(text, row.where), answers))
            else:
                label = table.filled(row, "label")
                if table.lacks(image=image, text=text, label=label):
                    continue
                rows.append((row.where, _image_path(p.parent, image, row.where), text_cell(text, row.where),
                             label_text(label, row.where)))
        table.check(split, rows, notes)
        raw[split] = rows
    if kind == "vqa":
        def majority(humans: list[str]) -> str:
            counts = Counter(humans)
            return min(counts, key=lambda a: (-counts[a], a))

        names = answer_vocabulary([majority([normalize_answer(a) for a in r[2]]) for r in raw["train"]])
        index = {a: i for i, a in enumerate(names)}
        # Grouped by the file, not the path as written: one image named two ways had been in both splits.
        val_and_test(raw, val_fraction, seed, notes, group=lambda r: file_identity(r[0]),
                     same=lambda r: (file_identity(r[0]), r[1]), what="image and question")

        def examples(rows, scores):
            return [MultimodalExample(image, text, answers=vqa_row_targets(h, index, scores))
                    for image, text, h in rows]

        # Trained on the soft targets, scored (validation and test) by the official VQA accuracy.
        splits = {split: examples(rows, vqa_soft_scores if split == "train" else vqa_accuracy_scores)
                  for split, rows in raw.items()}
        metrics: tuple[str, ...] = ("vqa_score",)
    else:
        names = class_names([r[-1] for r in raw["train"]])
        notes += look_alike_notes([r[-1] for r in raw["train"]])
        splits = _index_labels(raw, names, lambda f, label: MultimodalExample(f[0], f[1], label))
        val_and_test(splits, val_fraction, seed, notes, group=lambda ex: file_identity(ex.image),
                     same=lambda ex: (file_identity(ex.image), ex.text), what="image and text",
                     label=lambda ex: names[ex.label])
        metrics = ("accuracy",)
    data = MultimodalData(name or Path(path_train).stem, splits["train"], splits["val"], splits["test"], names,
                          metrics, kind, notes)
    check_multimodal_data(data)
    return data
