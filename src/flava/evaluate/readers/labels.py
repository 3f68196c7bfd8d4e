"""Class labels as every reader of a user's labelled data takes them (`flava finetune`'s tables and
folders, the linear probe's): a cell trimmed into a name, train's names ordered into classes, and
names that only look different said."""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Sequence

from ...errors import DataError


def label_text(value, where: str = "") -> str:
    """A label cell as a class name: text, trimmed (JSONL and parquet cells may be numbers; a CSV's
    "pos " is "pos"), a JSON boolean as JSON writes it (`true`, as a CSV's reads). A list or mapping
    (`where`: its row) is no name: DataError."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        what = "mapping" if isinstance(value, dict) else "list"
        raise DataError(f"{where}: the label {json.dumps(value)[:60]} is a {what}; a label is one text or number")
    return str(value).strip()


def text_cell(value, where: str, what: str = "text") -> str:
    """A text cell as text: CSV cells are strings already, JSONL and parquet ones may be numbers. A
    boolean, list or mapping is no text (it had been trained on as "True" or "['a', 'b']"):
    DataError naming the row (`where`) and the column (`what`)."""
    if value is None:
        return ""
    if isinstance(value, (bool, list, tuple, dict)):
        kind = "boolean" if isinstance(value, bool) else "mapping" if isinstance(value, dict) else "list"
        raise DataError(f"{where}: the {what} {json.dumps(value)[:60]} is a {kind}; write it as one string")
    return str(value)


def _integer(name: str) -> int | None:
    # Decimal digits alone, a minus allowed: "²" is a digit to str.isdigit, not to int, and "+1"
    # an int to int() that earlier releases sorted as text.
    return int(name) if name.lstrip("-").isdecimal() else None


def class_names(labels: Sequence[str]) -> list[str]:
    """Sorted label names, numerically when they all are integers."""
    seen = set(labels)
    if seen and all(_integer(s) is not None for s in seen):
        return sorted(seen, key=lambda s: (int(s), s))
    return sorted(seen)


def unseen_classes_note(split: str, labels: Sequence[str], trained: set[str]) -> list[str]:
    """A note when some of a split's examples have a class no training example has (a carve that
    took a class's only rows, a rare class): they cannot be predicted right, unsaid otherwise."""
    unseen = Counter(label for label in labels if label not in trained)
    if not unseen:
        return []
    named = ", ".join(repr(n) for n, _ in unseen.most_common(3)) + (" ..." if len(unseen) > 3 else "")
    return [f"{sum(unseen.values())} of the {len(labels)} {split} examples have a class no training example has "
            f"({named}): no model can get them right; give each class more examples, or a {split} file"]


def numbers_as_classes_note(names: Sequence[str], rows: int) -> list[str]:
    """A hint when the labels are numbers, nearly one per row: a score read as that many classes."""
    def number(name: str) -> bool:
        try:
            return math.isfinite(float(name))
        except ValueError:
            return False

    if len(names) >= 10 and len(names) > rows / 2 and all(number(n) for n in names):
        return [f"the {len(names)} labels are numbers, nearly one per training row: each is a class of its own; "
                "to predict a number, fine-tune with --task text-regression"]
    return []


def _alike(label: str):
    # One spelling per value: "1", "01" and "1.0" are one number; "pos", "Pos" and "p  os" one word.
    try:
        value = float(label)
    except ValueError:
        value = math.nan
    return ("number", value) if math.isfinite(value) else ("text", " ".join(label.split()).casefold())


def look_alike_notes(labels: Sequence[str], unit: str = "row") -> list[str]:
    """One note per group of label names that differ only in case, spacing or how a number is
    written, with each name's count of `unit`s (rows, images): they are separate classes (nothing is
    merged unasked), which a typo in a few rows had made unsaid."""
    rows = Counter(labels)
    groups: dict[tuple, list[str]] = {}
    for name in sorted(rows, key=lambda n: (-rows[n], n)):
        groups.setdefault(_alike(name), []).append(name)
    notes = []
    for names in groups.values():
        if len(names) > 1:
            each = ", ".join(f"{n!r} ({rows[n]} {unit}{'s' if rows[n] > 1 else ''})" for n in names[:4])
            more = f" and {len(names) - 4} more" if len(names) > 4 else ""
            notes.append(f"labels {each}{more} look alike but are {len(names)} classes; write them one way to merge")
    return notes
