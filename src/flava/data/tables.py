"""Tables: CSV, TSV, JSONL and parquet files of rows with named columns, read with one set of rules.

Every reader of a user's table (training pairs, evaluation tasks and suites, `flava embed`,
`finetune`, `predict`) goes through `read_table`, so the rules below hold everywhere and a new
format is a change to this file (and its test):

- the suffix decides the format, in any case: `.csv` comma-separated, `.tsv` and `.tab`
  tab-separated (both with a header row, quoted as Excel writes), `.jsonl` one JSON object a line
  (its columns: every key, in order of first appearance), `.parquet` (read with pyarrow);
- text is UTF-8; a leading byte-order mark is dropped; a row holding bytes that are not UTF-8, a
  CSV row that is not well formed (a quote never closed, which would swallow every row after it
  into one cell; text after a closing quote; more non-empty cells than the header names, mostly a
  comma in an unquoted text) and a JSONL line that is not an object are bad rows, which end the
  read in a `DataError` naming file and line (`bad_rows="raise"`) or are counted by reason and
  left out (`bad_rows="skip"`, for training, where one bad row must not stop a run); a stray
  quote makes only its own row bad there: the lines it took are read again as rows where each reads
  alone as one (else counted each), and a quoted cell closed lines later whose lines read as rows
  is kept (valid CSV) and recorded in `Table.spanning` for the run to say;
- CSV/TSV cells are strings, empty cells past the header are dropped and missing ones are None;
  JSONL and parquet cells keep their JSON / Arrow types;
- an empty file (not even a header) is an error; a header without rows is an empty table; a
  column named twice in a CSV/TSV header or a parquet schema is an error;
- `Table.column` finds a column by its names and otherwise fails naming the columns there are
  and the nearest one.
"""

from __future__ import annotations

import csv
import difflib
import json
import sys
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import DataError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}
SUFFIXES = tuple(FORMATS)
"""Every suffix `read_table` reads."""
# A caption or text may be long (a paragraph); csv's default 128 KiB field limit would make one
# such row abort the whole file, so the limit is lifted and length is judged by whoever uses it.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

BadRows = Literal["raise", "skip"]
UNCLOSED = "line after an unclosed quote"
"""The reason of each line a quote never closed took into its cell (counted, so none is lost unsaid)."""
INSIDE_BROKEN = "line inside a broken quoted cell"
"""The reason of each line a quote closed before other text took into its cell."""


@dataclass(slots=True)
class Row:
    """One row: its cells by column name and where it is (for messages)."""

    values: dict[str, Any]
    line: int
    """Line of a text file (the row's last line) or 1-based row number of a parquet file."""
    file: str
    unit: str = "line"

    @property
    def where(self) -> str:
        """'FILE, line N' (or 'FILE, row N' for parquet)."""
        return f"{self.file}, {self.unit} {self.line}"

    def get(self, key: str, default=None):
        return self.values.get(key, default)


@dataclass
class Table:
    path: Path
    columns: list[str]
    rows: list[Row]
    rejected: Counter = field(default_factory=Counter)
    """Bad rows left out under `bad_rows="skip"`, counted by reason."""
    first_bad: dict[str, tuple[int, str]] = field(default_factory=dict)
    """The line of each reason's first bad row and what is wrong with it (said at a run's start)."""
    spanning: list[tuple[int, int]] = field(default_factory=list)
    """(first, last) line of each well-formed row whose quoted cell runs over lines that read alone
    as rows: a stray quote closed lines later by another (an inch mark) takes those rows into one
    cell. Kept (it is valid CSV), and said by whoever reads the table for training."""

    def column(self, *names: str, fix: str | None = None) -> str:
        """The first of `names` that is a column; else a DataError naming the columns there are
        and the nearest to `names[0]`, then `fix` (default: rename the column)."""
        for name in names:
            if name in self.columns:
                return name
        wanted = " or ".join(map(repr, names))
        close = nearest(names, self.columns)
        hint = f"; the nearest is {close!r}" if close else ""
        raise DataError(f"{self.path} has no column {wanted} (columns: {', '.join(self.columns) or 'none'}"
                        f"{hint}); {fix or f'rename the column to {names[0]!r}'}")


def nearest(wanted: Sequence[str], present: Sequence[str]) -> str | None:
    """The name in `present` closest to any of `wanted` (a VQA table's `questoin` is nearest to
    `question`, its second name), if one is close at all."""
    scored = [(difflib.SequenceMatcher(None, w, p).ratio(), p) for w in wanted for p in present]
    best = max(scored, default=(0.0, None))
    return best[1] if best[0] >= 0.5 else None


def kept_name(name: str, taken: Collection[str]) -> str:
    """A table's column `name` as a command writes it beside its own columns (`taken`): as it is
    where free, else input_NAME (input_input_NAME, ...), never over another."""
    while name in taken:
        name = f"input_{name}"
    return name


def is_table(path: str | Path) -> bool:
    return str(path).lower().endswith(SUFFIXES)


def table_format(path: str | Path) -> str:
    """'csv', 'tsv', 'jsonl' or 'parquet' by suffix; other suffixes are refused."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        what = "a folder" if Path(path).is_dir() else suffix or "a file without suffix"
        raise DataError(f"{path}: a table is a {', '.join(SUFFIXES)} file, not {what}")
    return FORMATS[suffix]


def read_table(path: str | Path, bad_rows: BadRows = "raise") -> Table:
    """The table at `path` (see the module docstring for the rules)."""
    path = Path(path)
    kind = table_format(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    table = Table(path, [], [])
    reader = _read_parquet if kind == "parquet" else _read_jsonl if kind == "jsonl" else _read_delimited
    for row in reader(path, kind, table):
        if isinstance(row, Row):
            table.rows.append(row)
        elif bad_rows == "skip":
            table.rejected[row[1]] += 1
            table.first_bad.setdefault(row[1], (row[0], row[2]))
        else:
            raise DataError(f"{path}, line {row[0]}: {row[2]}")
    return table


def _bad(line: int, reason: str, message: str) -> tuple[int, str, str]:
    return line, reason, message


def undecodable(value: Any) -> bool:
    """Whether a text read with errors='surrogateescape' held bytes that are not UTF-8."""
    return isinstance(value, str) and any("\udc80" <= ch <= "\udcff" for ch in value)


NOT_UTF8 = "holds bytes that are not UTF-8 text; save the file as UTF-8"


def _refuse_repeated_columns(names: Sequence[str], where: str) -> None:
    """A column named twice is an error: a row keeps one of its cells (the last), so the other
    column's text had been trained on or predicted from unsaid. Unnamed columns (a spreadsheet's
    trailing empty ones) may repeat."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names, start=1):
        if name and name in seen:
            raise DataError(f"{where} names column {name!r} twice (columns {seen[name]} and {i}); rename or "
                            "remove one of them")
        seen.setdefault(name, i)


def _read_delimited(path: Path, kind: str, table: Table) -> Iterator[Row | tuple]:
    # Bytes that are not UTF-8 survive as surrogates, so the row that holds them can be named.
    with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        delimiter = "\t" if kind == "tsv" else ","
        reader = csv.reader(f, delimiter=delimiter, strict=True)
        try:
            header = next(reader, None)
        except csv.Error as e:
            raise DataError(f"{path}, line 1: the header cannot be read as {kind.upper()} ({e})") from None
        if not header:
            raise DataError(f"{path} is empty; a table needs a header row naming its columns")
        if any(map(undecodable, header)):
            raise DataError(f"{path}, line 1: the header {NOT_UTF8}")
        _refuse_repeated_columns(header, f"{path}, line 1: the header")
        table.columns = header
        yield from _delimited_rows(f, reader.line_num, header, kind, str(path), table)  # a header may span lines


def _delimited_rows(lines: Iterable[str], before: int, header: list[str], kind: str, file: str,
                    table: Table) -> Iterator[Row | tuple]:
    """The rows of `lines`, which follow line `before` of the file. A quote opened in a cell and
    never closed, or closed before other text, breaks its row; the lines it took are read as rows
    again where each reads alone as a row of the header's width (the quote was a stray one), else
    counted as lost."""
    delimiter = "\t" if kind == "tsv" else ","
    taken: list[str] = []  # the lines of the row being read

    def feed() -> Iterator[str]:
        for line in lines:
            taken.append(line)
            yield line

    reader = csv.reader(feed(), delimiter=delimiter, strict=True)
    while True:
        taken.clear()
        start = before + reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            end, inner = before + reader.line_num, taken[1:]
            unclosed = "unexpected end of data" in str(e)  # read to the end of the file looking for it
            broken = "is never closed" if unclosed else f"closes on line {end} before other text"
            if _rows_of_their_own(inner, delimiter, len(header)):
                yield _bad(start, "malformed csv row", f"a quote opened on this line {broken} (the {len(inner)} "
                           "line(s) after it read alone as rows, and are read so where bad rows are skipped); close "
                           "it, or double a quote inside a quoted cell")
                yield from _delimited_rows(inner, start, header, kind, file, table)
            elif unclosed:
                yield _bad(start, "malformed csv row", "a quote opened on this line is never closed; close it, "
                           "or double a quote inside a quoted cell")
                for line in range(start + 1, end + 1):  # each line it took counted, not lost unsaid
                    yield _bad(line, UNCLOSED, f"unread: the quote opened on line {start} is never closed")
            else:
                yield _bad(start, "malformed csv row", f"not a well-formed {kind.upper()} row ({e}): a quote opened "
                           f"on this line {broken}; a quote inside a quoted cell is written twice")
                for line in range(start + 1, end + 1):
                    yield _bad(line, INSIDE_BROKEN, f"unread: inside the quote opened on line {start}")
            if unclosed:
                return
            continue
        end = before + reader.line_num
        if not cells:
            continue
        if any(map(undecodable, cells)):
            yield _bad(end, "undecodable csv row", f"the row {NOT_UTF8}")
            continue
        if any(c.strip() for c in cells[len(header):]):
            yield _bad(end, "malformed csv row",
                       f"{len(cells)} cells under a header of {len(header)}; quote a cell that holds "
                       f"{'a tab' if kind == 'tsv' else 'a comma'}")
            continue
        if end > start and _rows_of_their_own(taken[1:], delimiter, len(header)):
            table.spanning.append((start, end))  # well formed, but most likely a stray quote: said, not skipped
        yield Row(dict(zip(header, cells + [None] * (len(header) - len(cells)))), end, file)


def _rows_of_their_own(lines: list[str], delimiter: str, width: int) -> bool:
    """Whether every one of `lines` that is not blank reads alone as a row of a table `width` cells
    wide: two cells or more (in a one-column table any line would), none past the width filled."""
    if width < 2 or not any(line.strip() for line in lines):
        return False
    for line in lines:
        if not line.strip():
            continue
        try:
            cells = next(csv.reader([line], delimiter=delimiter, strict=True))
        except csv.Error:
            return False
        if len(cells) < 2 or any(c.strip() for c in cells[width:]):
            return False
    return True


def _read_jsonl(path: Path, kind: str, table: Table) -> Iterator[Row | tuple]:
    columns: dict[str, None] = {}
    file = str(path)
    with path.open("rb") as f:
        for line, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
            except UnicodeDecodeError:
                yield _bad(line, "undecodable json line", f"the line {NOT_UTF8}")
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except (json.JSONDecodeError, RecursionError) as e:
                yield _bad(line, "unreadable json line", f"not valid JSON ({e})")
                continue
            if not isinstance(obj, dict):
                yield _bad(line, "json line that is not an object", "not a JSON object")
                continue
            columns.update(dict.fromkeys(obj))
            table.columns = list(columns)
            yield Row(obj, line, file)
    if not columns and path.stat().st_size == 0:
        raise DataError(f"{path} is empty; a JSONL table holds one JSON object a line")


def _read_parquet(path: Path, kind: str, table: Table) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        _refuse_repeated_columns(pq.read_schema(path).names, f"{path}: the schema")  # read_table fails in many lines
        data = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path} could not be read as parquet ({type(e).__name__}: {e}); write it again") from None
    table.columns = list(data.column_names)
    file = str(path)
    for i, values in enumerate(data.to_pylist(), start=1):
        yield Row(values, i, file, "row")
