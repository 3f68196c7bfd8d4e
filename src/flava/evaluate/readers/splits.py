"""What every reader shares: seeded subsampling, carving validation out of train, the `limit` check."""

from __future__ import annotations

from typing import Callable

import numpy as np

from ...errors import ConfigError, DataError


FEW_TO_TRAIN = 5
"""A carve that leaves fewer training examples than this, and fewer than it took for validation, is
warned about: a model fit to one example (`--val-fraction 0.99`) had been trained and scored unsaid."""


def subsample(rows: list, limit: int | None, seed: int) -> list:
    """At most `limit` rows, a seeded random choice kept in file order."""
    if limit is None or len(rows) <= limit:
        return rows
    keep = np.sort(np.random.default_rng(seed).permutation(len(rows))[:limit])
    return [rows[i] for i in keep]


def subsample_splits(train: list, val: list, test: list, limit: int | None, seed: int) -> tuple[list, list, list]:
    """Each split `subsample`d to `limit` rows, each by its own seed (seed, seed + 1, seed + 2)."""
    return subsample(train, limit, seed), subsample(val, limit, seed + 1), subsample(test, limit, seed + 2)


def carve(rows: list, fraction: float, seed: int, group: Callable | None = None) -> tuple[list, list]:
    """Split off a seeded `fraction` of rows as validation. With `group`, whole groups go one way
    (questions about one image stay together, so validation images are unseen in training)."""
    if not 0 < fraction < 1:
        raise ConfigError(f"val_fraction must lie strictly between 0 and 1; got {fraction}")
    keys = sorted({group(r) for r in rows}) if group else list(range(len(rows)))
    if len(keys) < 2:
        what = f"{len(rows)} usable example(s)" + (f" of {len(keys)} image(s)" if group and rows else "")
        raise DataError(f"the training data holds {what}: too few to carve a validation split from; give more "
                        "rows, or a validation file")
    n_val = min(len(keys) - 1, max(1, round(fraction * len(keys))))
    val_keys = {keys[i] for i in np.random.default_rng(seed).permutation(len(keys))[:n_val]}
    if group:
        return [r for r in rows if group(r) not in val_keys], [r for r in rows if group(r) in val_keys]
    return ([r for i, r in enumerate(rows) if i not in val_keys], [r for i, r in enumerate(rows) if i in val_keys])


def check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive whole number (or null: no limit); got {limit!r}")


def file_identity(image) -> str:
    """An image file as the same file whatever path names it (relative, absolute, through a link);
    other images (a table's bytes) by what they are."""
    import os

    return os.path.realpath(image) if isinstance(image, (str, os.PathLike)) else repr(image)


def val_and_test(splits: dict[str, list], val_fraction: float, seed: int, notes: list[str],
                 group: Callable | None = None, same: Callable | None = None, what: str = "example",
                 label: Callable | None = None) -> None:
    """Carve validation out of train when it is absent; without a test split, validation is it.
    With `same` (an example's identity: its text, its image file), the validation and test
    examples that are also training examples are counted in a note: a file given twice, or rows
    copied, had scored the model on what it trained on, unsaid. With `label` (an example's class
    name), those whose class no training example has are counted in a note."""
    if "val" not in splits:
        rows = splits["train"]
        splits["train"], splits["val"] = carve(rows, val_fraction, seed, group)
        if group:  # whole images: their questions may be far more or fewer than the fraction
            images, held = len({group(r) for r in rows}), len({group(r) for r in splits["val"]})
            notes.append(f"validation: a seeded {_percent(val_fraction)} of the training images ({held} of {images}, "
                         f"with {len(splits['val'])} of the {len(rows)} examples)")
        else:
            notes.append(f"validation: a seeded {_percent(val_fraction)} of the training data")
        if len(splits["train"]) < min(FEW_TO_TRAIN, len(splits["val"])):  # the carve's doing, not the data's size
            notes.append(f"warning: val_fraction {val_fraction:g} leaves {len(splits['train'])} of {len(rows)} "
                         "examples to train on; lower it (--val-fraction) or give --val")
    if "test" not in splits:
        splits["test"] = splits["val"]
        notes.append("no test split: the validation split is scored as the test")
    if label is not None:
        from .labels import unseen_classes_note

        trained = {label(r) for r in splits["train"]}
        for split, called in (("val", "validation"), ("test", "test")):
            if not (split == "test" and splits["test"] is splits["val"]):
                notes += unseen_classes_note(called, [label(r) for r in splits[split]], trained)
    if same is None:
        return
    seen = {same(r) for r in splits["train"]}
    for split, called in (("val", "validation"), ("test", "test")):
        rows = splits[split]
        if split == "test" and rows is splits["val"]:
            continue
        n = sum(same(r) in seen for r in rows)
        if n:
            notes.append(f"{n} of the {len(rows)} {called} examples are also training examples (the same {what}): "
                         f"the {called} score flatters the model")


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.3g}%"  # 0.004 is 0.4%, not 0%
