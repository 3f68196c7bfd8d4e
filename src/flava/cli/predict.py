"""`flava predict`: run a task model (from `flava finetune`) on a file, an image folder or images;
write one row per input, print a short table, count what could not be used."""

from __future__ import annotations

import argparse
import codecs
import csv
import glob
import io
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

OUTPUT_SUFFIXES = (".csv", ".tsv", ".jsonl")
OUTPUT_COLUMNS = ("true_label", "prediction", "score", "top", "value", "error")
SHOWN_ROWS = 20
SHOWN_ERRORS = 5


def add(sub) -> None:
    p = sub.add_parser("predict", help="predict with a task model from `flava finetune` on a file, an image folder "
                                       "or images")
    p.add_argument("--model", required=True, help="a task model directory written by `flava finetune`")
    p.add_argument("--input", required=True, nargs="+",
                   help="a table: FILE.csv/.tsv/.jsonl/.parquet (columns as in training: text, text2, image, "
                        "question; a label column is scored), FILE.txt (one text per line), an image folder "
                        "(class sub-folders are scored as labels), or image files")
    p.add_argument("--output", help="write the predictions to this .csv, .tsv or .jsonl file")
    p.add_argument("--replace", action="store_true", help="write over an --output file that exists")
    p.add_argument("--top-k", dest="top_k", type=int, default=3, help="best labels kept per input (default 3)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=32)
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda when available, else cpu)")
    p.set_defaults(run=run)


@dataclass
class Inputs:
    """What to predict on: per item its input fields (for the output), the model's inputs, and a
    given label or an error found while reading."""

    fields: list[dict[str, Any]] = field(default_factory=list)
    texts: list[str | None] = field(default_factory=list)
    texts2: list[str | None] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    answers: list[list[str] | None] = field(default_factory=list)
    """A VQA row's annotators' answers as written, what its prediction is scored against."""
    errors: list[str | None] = field(default_factory=list)
    kept: list[dict[str, Any]] = field(default_factory=list)
    """A table's other columns of each row, written beside the predictions."""
    left_out: Counter = field(default_factory=Counter)
    """Files in the folder given that are not images, by suffix (said with the count of inputs)."""
    renamed: dict[str, str] = field(default_factory=dict)
    """A table's columns named as an output column (a rating called `score`, an earlier run's
    `prediction`), by the name they are written under beside the predictions."""

    def add(self, fields: dict, text=None, text2=None, image=None, label=None, error=None, answers=None) -> None:
        self.fields.append(fields)
        self.texts.append(text)
        self.texts2.append(text2)
        self.images.append(image)
        self.labels.append(label)
        self.answers.append(answers)
        self.errors.append(error)


def vqa_row_score(prediction: str, answers: list[str]) -> float:
    """A prediction's score as fine-tuning scores a validation or test row (`vqa_row_targets`: one
    given answer is right outright, more are scored by the official VQA accuracy)."""
    from ..evaluate.readers.multimodal import vqa_row_targets

    return vqa_row_targets(answers, {prediction: 0}).get(0, 0.0)


def _table_inputs(path: Path, tm) -> Inputs:
    from ..data.members import Blob, table_image
    from ..data.tables import kept_name, read_table
    from ..errors import DataError
    from ..evaluate.readers.labels import label_text, text_cell
    from ..finetune.taskmodel import MULTIMODAL_TASKS, a_model
    from ..evaluate.readers.multimodal import normalize_answer
    from ..evaluate.readers.text import finite_number
    from ..evaluate.readers.user_files import answer_list

    table = read_table(path)
    rows = table.rows
    if not rows:
        raise DataError(f"{path} holds no rows")
    vqa = tm.task == "vqa"
    # As fine-tuning reads a table of images and texts, whatever its task: `text` or `question`.
    text_keys = ("text", "question") if tm.task in MULTIMODAL_TASKS else ("text",)
    # VQA's answers as `read_multimodal_table` reads them ("label" last: a lenience of predict's own).
    label_keys = ("answer", "answers", "label") if vqa else ("label",)
    needed = ([text_keys] if tm.uses_text else []) + ([("image",)] if tm.uses_images else []) + \
        ([("text2",)] if tm.pairs else [])
    for options in needed:
        table.column(*options, fix=f"{a_model(tm.task)} needs it")
    out = Inputs()
    for name in table.columns:
        if name in OUTPUT_COLUMNS:  # itself among the table's columns: renamed at least once
            out.renamed[name] = kept_name(name, {*table.columns, *out.renamed.values()})

    def cell(row, options):  # a blank cell (spaces alone) is a missing one
        return next((row[k] for k in options if row.get(k) is not None and str(row[k]).strip()), None)

    for r in rows:
        row = r.values
        text, text2, image = cell(row, text_keys), cell(row, ("text2",)), cell(row, ("image",))
        answers = answer_list(row.get("answers")) if vqa else None
        if answers:
            # Annotators' answers, which the reader scores by even beside an `answer`; the most common
            # (processed, ties alphabetically) is the label shown, as the reader builds its vocabulary.
            processed = [normalize_answer(a) for a in answers]
            label = min(set(processed), key=lambda a: (-processed.count(a), a))
        else:  # an empty `answers` list is no answer (the reader would score it 0)
            listed = answers is not None
            label = cell(row, tuple(k for k in label_keys if not isinstance(row.get(k), list)
                                    and not (listed and k == "answers")))
            answers = None if label is None or not vqa else [str(label)]
        shown = {k: row[k] for k in ("image", *text_keys, "text2") if k in row}
        # The input's other columns (an id to join on) go to the output too, renamed where an
        # output column has the name.
        out.kept.append({out.renamed.get(k, k): v for k, v in row.items() if k not in shown})
        missing = [opts[0] for opts in needed if cell(row, opts) is None]
        if missing:
            out.add(shown, error=f"{r.where}: no {' or '.join(missing)}")
            continue
        if image is not None:
            image = table_image(path.parent, image)
            if isinstance(image, Blob):  # the output names where the image was, not its bytes
                shown["image"] = r.where
        # A VQA model's answers are processed as the VQA evaluator processes them ("Two" is "2").
        if isinstance(label, dict):  # no label to score by, as a list is none (`cell` passes lists over)
            label = None
        label = None if label is None else (normalize_answer(str(label)) if vqa else label_text(label, r.where))
        if label is not None and tm.task == "text-regression":  # refused as finetune refuses it, before predicting
            finite_number(label, r.where, "target")
        try:  # a list or a boolean is no text (it had been predicted on as "['a', 'b']" or "True")
            text = None if text is None else text_cell(text, r.where)
            text2 = None if text2 is None else text_cell(text2, r.where, "text2")
        except DataError as e:
            out.add(shown, error=str(e))
            continue
        out.add(shown, text, text2, image, label, answers=answers)
    return out


def read_inputs(specs: list[str], tm) -> Inputs:
    """Inputs from one table or text file, one image folder, or image files."""
    from ..data.images import IMAGE_SUFFIXES, find_images, utf8_name
    from ..data.tables import NOT_UTF8, undecodable
    from ..data.tables import SUFFIXES as TABLE_SUFFIXES
    from ..errors import DataError
    from ..finetune.taskmodel import a_model

    # Image globs as `embed` and `classify` read them (a quoted pattern reaches here unexpanded).
    paths = [p for s in specs for p in (find_images([s], utf8_names=True) if _pattern(s) else [Path(s)])]
    first = paths[0]
    listed = first.suffix.lower() in (*TABLE_SUFFIXES, ".txt")
    if listed or first.is_dir() or (len(paths) > 1 and any(p.suffix.lower() in (*TABLE_SUFFIXES, ".txt") or p.is_dir()
                                                           for p in paths)):
        if len(paths) > 1:
            raise DataError(f"give one CSV/JSONL/TXT file or one folder as --input, or image files; got {len(paths)} "
                            f"inputs starting with {first}")
        if not first.exists():
            raise DataError(f"input {first} does not exist")
    if listed and first.suffix.lower() != ".txt":
        return _table_inputs(first, tm)
    out = Inputs()
    if listed:
        if tm.uses_images or tm.pairs:
            raise DataError(f"{first}: a .txt input holds one text per line, but this {tm.task} model needs "
                            f"{'images' if tm.uses_images else 'sentence pairs'}; give a CSV/JSONL file")
        raw = first.read_bytes()
        if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\0" in raw:
            raise DataError(f"{first} is not UTF-8 text (UTF-16, or holds NUL bytes); save it as UTF-8")
        # Bytes that are not UTF-8 survive as surrogates, so their line is named, as a table's row is;
        # lines end at \n, \r\n or a lone \r (old Mac files), as training's text files do, and at
        # nothing else (str.splitlines also splits at form feeds and the like).
        text = raw.decode("utf-8", "surrogateescape").removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
        lines = text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")
        for n, line in enumerate(lines, start=1):
            # A blank line is an input not used, as a table's empty text is: output rows stay line for line.
            error = None if line.strip() else f"{first}, line {n}: no text"
            if undecodable(line):
                line, error = line.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), \
                    f"{first}, line {n}: {NOT_UTF8}"
            out.add({"text": line}, text=line, error=error)
        if all(e is not None for e in out.errors):
            raise DataError(f"{first} holds no text")
        return out
    if tm.uses_text:
        raise DataError(f"{a_model(tm.task)} needs texts; give a CSV/JSONL file with "
                        f"{'image and text' if tm.uses_images else 'text'} columns")
    if first.is_dir():
        root = first
        for image in find_images([root], out.left_out, utf8_names=True):
            parts = image.relative_to(root).parts
            # Images inside class sub-folders carry the folder's name as their label.
            out.add({"image": str(image)}, image=image, label=parts[0] if len(parts) > 1 else None)
        return out
    for p in paths:
        if p.suffix.lower() not in IMAGE_SUFFIXES and not p.is_file():
            raise DataError(f"input {p} is neither an image file nor a CSV/JSONL/TXT file or folder")
        if not utf8_name(p):  # an error row: the output table is UTF-8 and cannot hold the name as it is
            shown = os.fsencode(p).decode("utf-8", "replace")
            out.add({"image": shown}, error=f"{shown}: its name is not UTF-8; rename it")
            continue
        out.add({"image": str(p)}, image=p)
    return out


def _pattern(spec: str) -> bool:
    return glob.has_magic(spec) and not Path(spec).exists()


def _rows(inputs: Inputs, preds: list[dict]) -> list[dict[str, Any]]:
    rows = []
    kept = inputs.kept or [{}] * len(preds)
    for fields, other, label, pred, image in zip(inputs.fields, kept, inputs.labels, preds, inputs.images):
        row = {k: str(v) for k, v in fields.items()} | other
        if isinstance(image, Path):  # the file predict read: a table's path was relative to the table's folder
            row["image"] = os.path.abspath(image)
        if label is not None:
            row["true_label"] = label
        if "error" in pred:
            row["error"] = pred["error"]
        elif "value" in pred:
            row["value"] = pred["value"]
        else:
            row.update(prediction=pred["label"], score=pred["score"], top=pred["top"])
        rows.append(row)
    return rows


def write_predictions(path: Path, rows: list[dict[str, Any]]) -> None:
    from ..io.files import write_text_atomic

    # A folder not there yet is made, as `classify --output` makes it (`check_writable` refused a file in the way).
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".jsonl":
        write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return
    # The same header whatever the rows hold: the input's columns, then the outputs in one order,
    # `error` always (empty where every input was used).
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns and k not in OUTPUT_COLUMNS]
    columns += [k for k in OUTPUT_COLUMNS if k == "error" or any(k in r for r in rows)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, delimiter="\t" if path.suffix.lower() == ".tsv" else ",",
                            lineterminator="\n")
    writer.writeheader()
    for r in rows:
        # A list or mapping (a VQA row's answers) as JSON, not Python's repr.
        flat = {k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v for k, v in r.items()}
        if "top" in flat:
            flat["top"] = "|".join(f"{t['label']}:{t['score']:.4f}" for t in r["top"])
        writer.writerow(flat)
    write_text_atomic(path, buf.getvalue())


def _few(names: list[str], shown: int = 3, quote: bool = True) -> str:
    """A few of `names` for a message: the most frequent first (ties in first-seen order)."""
    distinct = [n for n, _ in Counter(names).most_common()]
    text = ", ".join(repr(n) if quote else n for n in distinct[:shown])
    return text + (f" and {len(distinct) - shown} more" if len(distinct) > shown else "")


def _shown(fields: dict[str, Any], width: int = 60) -> str:
    text = " | ".join(str(v) for v in fields.values())
    return text if len(text) <= width else text[:width - 1] + "…"


def run(args: argparse.Namespace, console: Console) -> None:
    from rich.markup import escape
    from rich.table import Table

    from ..data.images import said_left_out
    from ..errors import ConfigError, DataError
    from .. import scores as M
    from ..finetune.load import load_task
    from .embed import inference_device
    from ..io.files import check_new_file
    from ..progress import progress_bar

    output = Path(args.output) if args.output else None
    if output is not None and output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ConfigError(f"--output {output}: choose a .csv, .tsv or .jsonl file")
    if output is not None:
        check_new_file(output, args.input, args.replace)
    if args.top_k < 1 or args.batch_size < 1:
        raise ConfigError("--top-k and --batch-size must be at least 1")
    tm = load_task(args.model, device=inference_device(args.device))
    inputs = read_inputs(args.input, tm)
    if inputs.renamed and output is not None:
        console.print(escape(f"note: the input's columns {', '.join(inputs.renamed)} are written as "
                             f"{', '.join(inputs.renamed.values())}: the predictions use those names"))
    usable = [i for i, e in enumerate(inputs.errors) if e is None]
    preds: list[dict] = [{"error": e} if e is not None else {} for e in inputs.errors]
    with progress_bar(console) as progress:
        bar = progress.add_task("predicting", total=len(usable), info=f"{tm.task}")
        got = tm.predict(texts=[inputs.texts[i] for i in usable] if tm.uses_text else None,
                         texts2=[inputs.texts2[i] for i in usable] if tm.pairs else None,
                         images=[inputs.images[i] for i in usable] if tm.uses_images else None,
                         top_k=args.top_k, batch_size=args.batch_size,
                         progress=lambda done, total: progress.update(bar, completed=done, total=total))
    for i, pred in zip(usable, got):
        preds[i] = pred
    errors = [(i, p["error"]) for i, p in enumerate(preds) if "error" in p]
    if len(errors) == len(preds):
        raise DataError(f"none of the {len(preds)} inputs could be used; the first: {errors[0][1]}")

    table = Table(title=escape(f"{tm.task} predictions ({len(preds) - len(errors)} of {len(preds)} inputs"
                               f"{said_left_out(inputs.left_out, '; ', '')})"))
    regression = tm.task == "text-regression"
    table.add_column("#", justify="right")
    table.add_column("input")
    # A regressor's prediction is its value alone: no score column, which would stay empty and unnamed.
    table.add_column("predicted value" if regression else "prediction", justify="right" if regression else "left")
    if not regression:
        table.add_column("score", justify="right")
    for i, (fields, pred) in enumerate(zip(inputs.fields[:SHOWN_ROWS], preds[:SHOWN_ROWS])):
        if "error" in pred:  # not a class called "error": the input could not be used (listed below)
            table.add_row(str(i), escape(_shown(fields)), "[red](not used)[/]", *([] if regression else [""]))
        elif "value" in pred:
            table.add_row(str(i), escape(_shown(fields)), f"{pred['value']:.4f}")
        else:
            table.add_row(str(i), escape(_shown(fields)), escape(pred["label"]), f"{pred['score']:.3f}")
    console.print(table)
    if len(preds) > SHOWN_ROWS:
        console.print(f"… and {len(preds) - SHOWN_ROWS} more")
    if errors:
        console.print(f"[red]{len(errors)} input(s) could not be used[/]; predicted the other "
                      f"{len(preds) - len(errors)}:")
        for i, e in errors[:SHOWN_ERRORS]:
            console.print(f"  #{i}: {escape(e)}")

    labelled = [(inputs.labels[i], p) for i, p in enumerate(preds) if inputs.labels[i] is not None and "error" not in p]
    if labelled and regression:
        truth = [float(t) for t, _ in labelled]  # numbers: others were refused while reading
        values = [p["value"] for _, p in labelled]
        mae = sum(abs(a - b) for a, b in zip(values, truth)) / len(truth)
        pearson, spearman = (M.pearson(values, truth), M.spearman(values, truth)) if len(truth) > 1 else \
            (math.nan, math.nan)
        console.print(f"mean absolute error [bold]{mae:.4f}[/], Pearson {pearson:.4f}, Spearman {spearman:.4f} on "
                      f"{len(truth)} labelled inputs")
    elif labelled and tm.task == "vqa":
        # Scored as fine-tuning scores validation and test, not by matching one answer.
        scores = [vqa_row_score(p["label"], inputs.answers[i]) for i, p in enumerate(preds)
                  if inputs.labels[i] is not None and "error" not in p]
        console.print(f"VQA score [bold]{100 * sum(scores) / len(scores):.1f} %[/] on {len(scores)} labelled inputs "
                      f"({sum(s == 1 for s in scores)} scored 1)")
    elif labelled:
        # A label the model was not trained on can never be predicted: counted and named, not scored as
        # wrong (`finetune` and `classify --labels` refuse one), so the accuracy is the model's on its labels.
        known = set(tm.label_names)
        unknown = [t for t, _ in labelled if t not in known]
        labelled = [(t, p) for t, p in labelled if t in known]
        outside = f"not among the model's labels ({_few(tm.label_names, quote=False)})"
        if not labelled:
            console.print(f"no accuracy: the {len(unknown)} labelled inputs are labelled {escape(_few(unknown))}, "
                          f"{escape(outside)}")
        else:
            right = sum(p["label"] == t for t, p in labelled)
            skipped = f"; not scored: {len(unknown)} labelled {escape(_few(unknown))}, {escape(outside)}" \
                if unknown else ""
            console.print(f"accuracy [bold]{100 * right / len(labelled):.1f} %[/] ({right} of {len(labelled)} labelled "
                          f"inputs{skipped})")
    if output is not None:
        write_predictions(output, _rows(inputs, preds))
        console.print(f"predictions: {output}")
