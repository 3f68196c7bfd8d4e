"""A suite task as written (`TaskSpec`) and the checks task kinds share when reading one: keys,
paths relative to the suite file, folders of class folders, tables of labelled text."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError, did_you_mean


@dataclass(frozen=True)
class TaskSpec:
    """One entry of a suite's task list, with what the suite worked out before its kind reads it."""

    spec: dict
    """The entry as written."""
    base: Path
    """Relative paths are read from here (the suite file's folder)."""
    where: str
    """How errors name the task ("task 3 (name)")."""
    name: str
    data: str | None
    """The packaged data set the task names, if any (already checked against its kind's)."""
    seed: int = 0
    settings: dict = field(default_factory=dict)
    """The suite's settings, which the task's own `settings` override."""

    def path(self, value: Any, where: str | None = None, must_exist: bool = True) -> Path:
        return resolve_path(self.base, value, where or self.where, must_exist)


def one_source(t: TaskSpec, sources: dict[str, tuple[str, ...]]) -> None:
    """ConfigError for a task that names several of its kind's data sources (each key of
    `sources`), or a key that goes with a source it does not name: a task reads one, and the
    others' keys had been read by nothing, unsaid (a folder beside data, a glue beside data)."""
    named = [k for k in sources if t.spec.get(k) is not None]  # "data": null names none, as the suite reads it
    if len(named) > 1:
        raise ConfigError(f"{t.where}: a task reads one data source, but this one names several "
                          f"({', '.join(named)}): keep one")
    for source, keys in sources.items():
        stray = [k for k in keys if t.spec.get(k) is not None and source not in named]
        if stray:
            raise ConfigError(f"{t.where}: {stray[0]} goes with {source}, which this task does not name"
                              + (f" (it reads {named[0]})" if named else "") + f": drop {stray[0]}")


def check_keys(spec: dict, allowed: set[str], where: str) -> None:
    for key in spec:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r}{did_you_mean(key, sorted(allowed))}")


@dataclass(frozen=True)
class Field:
    """What a task's key must hold: `ok(value)` says whether it does; `what` says it in the error."""

    what: str
    ok: Callable[[Any], bool]


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON's true is no count


def _name(n: Any) -> bool:
    # A number names a class as its text does (digits' 0-9, a table's labels 0/1/2).
    return (isinstance(n, str) and bool(n.strip())) or (isinstance(n, (int, float)) and not isinstance(n, bool))


def _names(v: Any) -> bool:
    return isinstance(v, list) and all(_name(n) for n in v)


def whole(least: int) -> Field:
    return Field(f"a whole number of at least {least}", lambda v: _whole(v) and v >= least)


def names(least: int) -> Field:
    """A list of at least `least` distinct non-empty strings."""
    return Field(f"a list of at least {least} distinct names (strings or numbers)",
                 lambda v: _names(v) and len(v) >= least and len({str(n) for n in v}) == len(v))


def one_of(*choices: str) -> Field:
    return Field(" or ".join(map(repr, choices)), lambda v: isinstance(v, str) and v in choices)


TEXT = Field("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip()))
PATH = Field("a path (a non-empty string)", TEXT.ok)
FLAG = Field("true or false", lambda v: isinstance(v, bool))
OBJECT = Field("an object", lambda v: isinstance(v, dict))
LIMIT = Field("a positive whole number (or null: no limit)", lambda v: v is None or (_whole(v) and v >= 1))
NAMES = Field("a list of names (strings or numbers)", _names)
TEMPLATES = Field("a template set's name, templates separated by |, or a list of templates (strings)",
                  lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(t, str) for t in v)))


def check_fields(spec: dict, fields: Mapping[str, Field], where: str) -> None:
    """Each key `fields` knows holds what it must, checked before any data is read: a wrong type
    met later is a traceback from deep in a reader, or a task that runs on a misread value."""
    for key, f in fields.items():
        if key in spec and not f.ok(spec[key]):
            got = repr(spec[key])
            raise ConfigError(f"{where}: {key} must be {f.what}; got {got if len(got) <= 60 else got[:57] + '...'}")


def resolve_path(base: Path, value: Any, where: str, must_exist: bool = True) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a path, got {value!r}")
    p = Path(value).expanduser()
    p = p if p.is_absolute() else base / p
    if must_exist and not p.exists():
        raise DataError(f"{where}: {p} does not exist")
    return p


def image_folder(path: Path, where: str, classes: list[str] | None = None, notes: list[str] | None = None,
                 ) -> tuple[list[Path], np.ndarray, list[str]]:
    """A folder of class folders: (images, class indices, class names); `classes` fixes the names
    another split (train) found, of which this one may hold some only. Class folders with no image
    are named in `notes`."""
    from ..data.images import empty_class_folders, said_empty
    from ..data.registry import open_source

    src = open_source("images", str(path))
    empty = empty_class_folders(path, [r.image for r in src.records])
    if empty and notes is not None:
        notes.append(said_empty(path, empty))
    if not src.classes:
        raise DataError(f"{where}: {path} has no class sub-folders (one folder of images per class)")
    names = src.classes if classes is None else classes
    extra = sorted(set(src.classes) - set(names))
    if extra:
        raise DataError(f"{where}: {path} has classes {extra} outside the training classes {classes}")
    records = [r for r in src.records if r.label >= 0]
    if not records:
        raise DataError(f"{where}: {path} holds no images")
    check_images([r.image for r in records], where)
    index = np.array([names.index(c) for c in src.classes])
    return [r.image for r in records], index[[r.label for r in records]], names


def check_images(images: list, where: str) -> None:
    """Refuse, while the suite's data is checked, an image file that does not open (empty, not an
    image): met when its task runs, it would end the suite after the tasks before it ran."""
    from PIL import Image

    from ..finetune.splits import NAMED_BAD

    bad = []  # all of them: named one at a time, a folder of broken files took a run per file to find
    for image in images:
        if isinstance(image, (str, Path)):
            try:
                with Image.open(image) as im:
                    im.size
            except Exception:  # PIL raises several types for files it cannot identify
                bad.append(str(image))
    if len(bad) == 1:
        raise DataError(f"{where}: {bad[0]} is not a readable image; remove or replace it")
    if bad:
        first = f"; the first {NAMED_BAD}" if len(bad) > NAMED_BAD else ""
        raise DataError(f"{where}: {len(bad)} of the {len(images)} images are not readable images{first}: "
                        f"{', '.join(bad[:NAMED_BAD])}; remove or replace them")


def labelled_text(path: Path, where: str) -> tuple[list[str], list[str]]:
    """A table (`flava.data.tables`) with `text` and `label` columns; labels trimmed as `flava finetune`
    reads them."""
    from ..data.tables import read_table
    from .readers.labels import label_text

    try:
        table = read_table(path)
        text, label = (table.column(c, fix="the file needs a header with columns text and label")
                       for c in ("text", "label"))
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    rows = [("" if r.get(text) is None else str(r.get(text)), label_text(r.get(label), r.where)) for r in table.rows]
    empty = sum(1 for t, lab in rows if not t.strip() or not lab)
    if empty:
        raise DataError(f"{where}: {path} has {empty} row(s) with an empty text or label")
    if not rows:
        raise DataError(f"{where}: {path} has no rows")
    return [t for t, _ in rows], [lab for _, lab in rows]
