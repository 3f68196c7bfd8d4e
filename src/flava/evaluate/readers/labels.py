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


def class_names(labels: Sequence[str]) -> list[str]:
    """Sorted label names, numerically when they all are integers."""
    seen = set(labels)
    return sorted(seen, key=int) if all(s.lstrip("-").isdigit() for s in seen) else sorted(seen)


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
