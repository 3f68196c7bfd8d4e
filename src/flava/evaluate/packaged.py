"""The packaged data sets suites name with `"data": NAME` (the demo suite uses only these): easy-vqa's
colours and shapes as classes or as retrieval galleries, scikit-learn's digits, BBC News; every split
one the demo's pretraining never sees."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConfigError
def easy_vqa_labels(split: str) -> tuple[list[Path], list[str], list[str]]:
    """easy-vqa images of `split` with the colour and shape their annotations give."""
    import easy_vqa

    from ..data.demo import easy_vqa_attributes

    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    attrs = easy_vqa_attributes(split)
    ids = sorted(i for i in attrs if i in paths)
    return [Path(paths[i]) for i in ids], [attrs[i][0] for i in ids], [attrs[i][1] for i in ids]


def easy_vqa_classes(what: str, split: str) -> tuple[list[Path], np.ndarray, list[str]]:
    """Images and class indices of easy-vqa's "test" split, or of "train" / "val": its training
    images without / with the held-out validation images (which pretraining never sees)."""
    import easy_vqa

    from ..data.demo import easy_vqa_validation_ids

    images, colours, shapes = easy_vqa_labels("test" if split == "test" else "train")
    names = colours if what == "easy-vqa-colours" else shapes
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    if split != "test":
        paths = easy_vqa.get_train_image_paths()  # lists the folder: once, not once per id
        held_out = {Path(paths[i]) for i in easy_vqa_validation_ids()}
        keep = [(p in held_out) == (split == "val") for p in images]
        images = [p for p, k in zip(images, keep) if k]
        names = [n for n, k in zip(names, keep) if k]
    return images, np.array([index[n] for n in names]), classes


def easy_vqa_galleries(count: int) -> list[tuple[list[Path], list[list[str]]]]:
    """Retrieval galleries from easy-vqa's test images: each holds one image of every
    colour-shape combination with all caption phrasings of it. Captions name only colour and
    shape, so a gallery with two images of one combination would hold identical captions that
    no model can tell apart; disjoint galleries keep every query answerable."""
    from ..data.demo import CAPTION_TEMPLATES

    images, colours, shapes = easy_vqa_labels("test")
    by_combo: dict[tuple[str, str], list[Path]] = {}
    for path, c, s in zip(images, colours, shapes):
        by_combo.setdefault((c, s), []).append(path)
    combos = sorted(by_combo)
    available = min(len(v) for v in by_combo.values())
    if count > available:
        raise ConfigError(f"easy-vqa has {available} disjoint retrieval galleries; galleries={count} asks for more")
    galleries = []
    for g in range(count):
        galleries.append(([by_combo[k][g] for k in combos],
                          [[t.format(color=c, shape=s) for t in CAPTION_TEMPLATES] for c, s in combos]))
    return galleries


def digits() -> tuple[list, np.ndarray, list, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits as RGB images, split by
    `flava.data.demo.digits_split_ids` (the demo pretrains on train, never on test)."""
    from PIL import Image

    from ..data.demo import digits_images, digits_split_ids

    arrays, labels = digits_images()
    images = [Image.fromarray(a).convert("RGB") for a in arrays]
    ids = digits_split_ids(labels)
    return ([images[i] for i in ids["train"]], labels[ids["train"]], [images[i] for i in ids["test"]],
            labels[ids["test"]])


def bbc_news_splits() -> tuple[dict[str, tuple[list[str], np.ndarray]], list[str]]:
    """BBC News's articles as {"train", "val", "test": (texts, labels)} (the fixed, stratified
    splits of `flava.data.demo.bbc_news_split_ids`, whose val and test hold no article of train,
    which alone the demo pretrains on) and the class names."""
    from ..data.demo import BBC_NEWS_CLASSES, bbc_news_articles, bbc_news_split_ids

    texts, labels = bbc_news_articles()
    y = np.asarray(labels)
    splits = {name: ([texts[i] for i in ids], y[ids]) for name, ids in bbc_news_split_ids().items()}
    return splits, list(BBC_NEWS_CLASSES)
