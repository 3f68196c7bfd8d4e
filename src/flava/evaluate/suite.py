"""Evaluation suites: a JSON list of tasks, every one prepared (data read and checked) before any
is run, then run on one model into a SuiteResult that `report` writes out.

A suite file::

    {"name": "mine",
     "tasks": [
       {"kind": "retrieval", "karpathy": "dataset_flickr30k.json", "split": "test", "image_root": "flickr30k"},
       {"kind": "zero-shot", "folder": "pets/test", "templates": "clip"},
       {"kind": "linear-probe", "modality": "image", "train": "pets/train", "test": "pets/test"},
       {"kind": "linear-probe", "modality": "text", "train": "news_train.csv", "test": "news_test.csv"},
       {"kind": "finetune-text", "glue": "MRPC", "dir": "glue/MRPC", "settings": {"lr": 2e-5}},
       {"kind": "finetune-multimodal", "hateful-memes": "hateful_memes", "settings": {"epochs": 2}},
       {"kind": "finetune-text", "glue": "RTE", "dir": "glue/RTE", "lr_sweep": [1e-5, 2e-5, 3e-5]}]}

Relative paths are read from the suite file's directory. `"data": NAME` instead names a packaged
data set (see DATASETS); the demo suite uses only those.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ConfigError, DataError, FlavaError, did_you_mean
from .finetune import FinetuneResult, FinetuneSettings
from .examples import MultimodalData, TextData

KINDS = ("retrieval", "zero-shot", "linear-probe", "finetune-text", "finetune-multimodal")
DOMAINS = ("vision", "language", "multimodal")

# Packaged data sets by task kind (the demo suite's sources).
DATASETS = {
    "retrieval": ("easy-vqa",),
    "zero-shot": ("easy-vqa-shapes", "easy-vqa-colours"),
    "linear-probe": ("digits", "easy-vqa-shapes", "easy-vqa-colours", "bbc-news"),
    "finetune-text": ("bbc-news",),
    "finetune-multimodal": ("easy-vqa",),
}
GLUE_KEYS = {"glue", "dir"}
KEYS = {
    "retrieval": {"data", "karpathy", "split", "image_root", "csv", "galleries"},
    "zero-shot": {"data", "folder", "class_names", "templates", "limit"},
    "linear-probe": {"modality", "data", "train", "val", "test", "limit"},
    "finetune-text": {"data", "train", "val", "test", "regression", "label_names", "limit", "lr_sweep"} | GLUE_KEYS,
    "finetune-multimodal": {"data", "vqa", "snli-ve", "hateful-memes", "limit", "lr_sweep"},
}
COMMON = {"kind", "name", "domain", "settings", "seed"}


@dataclass
class TaskResult:
    """One task's outcome. `scores` (percent) are the rows that enter the domain average, as in
    the paper's Table 4 (e.g. TR R@1, TR R@5, IR R@1, IR R@5 for a retrieval task)."""

    name: str
    kind: str
    domain: str
    scores: dict[str, float]
    metrics: dict[str, float] = field(default_factory=dict)
    """Every number measured (fractions as measured, not percent)."""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    detail: Any = field(default=None, repr=False)
    """What the report draws from (a RetrievalResult, ProbeResult, FinetuneResult, ...)."""


@dataclass
class SuiteResult:
    name: str
    model: str
    tasks: list[TaskResult]

    def domain_averages(self) -> dict[str, float]:
        """Mean of the score rows of each domain's tasks (domains without a task are absent)."""
        out = {}
        for domain in DOMAINS:
            rows = [v for t in self.tasks if t.domain == domain for v in t.scores.values()]
            if rows:
                out[domain] = float(np.mean(rows))
        return out

    def macro_average(self) -> float:
        """Mean of the domain averages (the paper's macro average)."""
        return float(np.mean(list(self.domain_averages().values())))


# --------------------------------------------------------------------------- packaged data


def _easy_vqa_labels(split: str) -> tuple[list[Path], list[str], list[str]]:
    """easy-vqa images of `split` with the colour and shape their annotations give."""
    import easy_vqa

    from ..data.demo import easy_vqa_attributes

    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    attrs = easy_vqa_attributes(split)
    ids = sorted(i for i in attrs if i in paths)
    return [Path(paths[i]) for i in ids], [attrs[i][0] for i in ids], [attrs[i][1] for i in ids]


def _easy_vqa_classes(what: str, split: str) -> tuple[list[Path], np.ndarray, list[str]]:
    """Images and class indices of easy-vqa's "test" split, or of "train" / "val": its training
    images without / with the held-out validation images (which pretraining never sees)."""
    import easy_vqa

    from ..data.demo import easy_vqa_validation_ids

    images, colours, shapes = _easy_vqa_labels("test" if split == "test" else "train")
    names = colours if what == "easy-vqa-colours" else shapes
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    if split != "test":
        held_out = {Path(easy_vqa.get_train_image_paths()[i]) for i in easy_vqa_validation_ids()}
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

    images, colours, shapes = _easy_vqa_labels("test")
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


def _digits() -> tuple[list, np.ndarray, list, np.ndarray]:
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
    """The 2,225 BBC News articles as {"train", "val", "test": (texts, labels)} (the fixed,
    stratified splits of `flava.data.demo.bbc_news_split_ids`, whose val and test the demo's
    pretraining never sees) and the class names."""
    from ..data.demo import BBC_NEWS_CLASSES, bbc_news_articles, bbc_news_split_ids

    texts, labels = bbc_news_articles()
    y = np.asarray(labels)
    splits = {name: ([texts[i] for i in ids], y[ids]) for name, ids in bbc_news_split_ids().items()}
    return splits, list(BBC_NEWS_CLASSES)


# --------------------------------------------------------------------------- prepared tasks


@dataclass
class Prepared:
    """A task whose data has been read and checked; `run(model, tokenizer, progress)`."""

    name: str
    kind: str
    domain: str
    run: Callable[..., TaskResult]
    size: str
    """A short description of the data for the plan printed before running."""


def _percent(d: dict[str, float]) -> dict[str, float]:
    return {k: 100.0 * v for k, v in d.items()}


def _retrieval(name, domain, galleries) -> Prepared:
    from .zero_shot import retrieval

    def run(model, tokenizer, progress) -> TaskResult:
        results = []
        for i, (images, captions) in enumerate(galleries):
            results.append(retrieval(model, images, captions, tokenizer,
                                     progress=lambda d, t, i=i: progress(i * t + d, len(galleries) * t)))
        keys = results[0].metrics.keys()
        mean = {k: float(np.mean([r.metrics[k] for r in results])) for k in keys}
        scores = {"TR R@1": mean["image_to_text_R@1"], "TR R@5": mean["image_to_text_R@5"],
                  "IR R@1": mean["text_to_image_R@1"], "IR R@5": mean["text_to_image_R@5"]}
        notes = [f"mean over {len(galleries)} galleries"] if len(galleries) > 1 else []
        return TaskResult(name, "retrieval", domain, _percent(scores), mean, notes,
                          detail={"result": results[0], "images": galleries[0][0]})

    n_img = sum(len(g[0]) for g in galleries)
    n_cap = sum(len(c) for g in galleries for c in g[1])
    return Prepared(name, "retrieval", domain, run, f"{n_img} images, {n_cap} captions")


def _zero_shot(name, domain, images, labels, classes, templates) -> Prepared:
    from .zero_shot import zero_shot_classification

    def run(model, tokenizer, progress) -> TaskResult:
        r = zero_shot_classification(model, images, labels, classes, tokenizer, templates, progress=progress)
        return TaskResult(name, "zero-shot", domain, _percent({"top-1": r.top1}), r.metrics,
                          detail={"result": r, "classes": classes})

    return Prepared(name, "zero-shot", domain, run, f"{len(images)} images, {len(classes)} classes")


def _probe(name, domain, modality, train, val, test, classes) -> Prepared:
    from .features import image_cls_features, text_cls_features
    from .probe import linear_probe

    def run(model, tokenizer, progress) -> TaskResult:
        parts = [p for p in (train, val, test) if p is not None]
        total = sum(len(p[0]) for p in parts)
        done = 0
        feats = []
        for x, _ in parts:
            step = lambda d, t, base=done: progress(base + d, total)  # noqa: E731
            if modality == "image":
                feats.append(image_cls_features(model, x, progress=step))
            else:
                feats.append(text_cls_features(model, x, tokenizer, progress=step))
            done += len(x)
        fx = dict(zip([k for k, p in zip(("train", "val", "test"), (train, val, test)) if p is not None], feats))
        r = linear_probe(fx["train"], train[1], fx["test"], test[1],
                         val=(fx["val"], val[1]) if val is not None else None)
        return TaskResult(name, "linear-probe", domain, _percent({"top-1": r.accuracy}), r.metrics,
                          [f"λ = {r.lam:.3g} chosen on validation"], detail={"result": r, "classes": classes})

    sizes = "/".join(str(len(p[0])) for p in (train, val, test) if p is not None)
    return Prepared(name, "linear-probe", domain, run, f"{modality} {sizes} examples, {len(classes)} classes")


def _headline(metrics_: dict[str, float], task_metrics: tuple[str, ...]) -> dict[str, float]:
    """The paper's per-task score: accuracy and F1 averaged for MRPC/QQP, else the first metric."""
    if {"accuracy", "f1"} <= set(task_metrics):
        return {"acc/F1": (metrics_["accuracy"] + metrics_["f1"]) / 2}
    first = task_metrics[0]
    return {first: metrics_[first]}


def _finetune(name, domain, task: TextData | MultimodalData, settings: FinetuneSettings, text: bool,
              lr_sweep: list[float] | None = None) -> Prepared:
    """`lr_sweep`: fine-tune once per learning rate and score the run best on validation, as the
    paper tunes each task; every model of a comparison then gets the rate that suits it."""
    from dataclasses import replace

    from .finetune import finetune_multimodal, finetune_text

    runs = [replace(settings, lr=lr) for lr in lr_sweep] if lr_sweep else [settings]

    def run(model, tokenizer, progress) -> TaskResult:
        fn = finetune_text if text else finetune_multimodal
        r: FinetuneResult | None = None  # only the best so far is kept: each holds a fine-tuned model copy
        chosen, tried = settings.lr, []
        for i, s in enumerate(runs):
            this = fn(model, task, s, tokenizer,
                      on_step=lambda step, total, loss, i=i: progress(i * total + step, len(runs) * total))
            tried.append(f"{s.lr:g}: {this.best_val:.4f}")
            if r is None or this.best_val > r.best_val:
                r, chosen = this, s.lr
        notes = list(task.notes) + [f"best validation {r.metric} {r.best_val:.4f} at step {r.best_step} of {r.steps}"]
        if lr_sweep:
            notes.append(f"learning rate {chosen:g} chosen on validation {r.metric} ({', '.join(tried)})")
        if not settings.train_encoders:
            notes.append("encoders frozen: the head alone was trained")
        return TaskResult(name, "finetune-text" if text else "finetune-multimodal", domain,
                          _percent(_headline(r.test_metrics, tuple(task.metrics))), r.test_metrics, notes,
                          detail={"result": r})

    kind = "finetune-text" if text else "finetune-multimodal"
    outputs = f"{len(task.label_names)} {'answers' if getattr(task, 'kind', '') == 'vqa' else 'classes'}" \
        if task.label_names else "regression"
    sweep = f", learning rates {', '.join(f'{x:g}' for x in lr_sweep)}" if lr_sweep else ""
    return Prepared(name, kind, domain, run,
                    f"{len(task.train)}/{len(task.val)}/{len(task.test)} examples, {outputs}{sweep}")


# --------------------------------------------------------------------------- parsing


def _check_keys(spec: dict, allowed: set[str], where: str) -> None:
    for key in spec:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r}{did_you_mean(key, sorted(allowed))}")


def _path(base: Path, value: Any, where: str, must_exist: bool = True) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a path, got {value!r}")
    p = Path(value).expanduser()
    p = p if p.is_absolute() else base / p
    if must_exist and not p.exists():
        raise DataError(f"{where}: {p} does not exist")
    return p


def _image_folder(path: Path, where: str, classes: list[str] | None = None) -> tuple[list[Path], np.ndarray, list[str]]:
    from ..data.registry import open_source

    src = open_source("images", str(path))
    if not src.classes:
        raise DataError(f"{where}: {path} has no class sub-folders (one folder of images per class)")
    if classes is not None and src.classes != classes:
        extra = sorted(set(src.classes) - set(classes))
        raise DataError(f"{where}: {path} has classes {extra or src.classes} outside the training classes {classes}")
    records = [r for r in src.records if r.label >= 0]
    if not records:
        raise DataError(f"{where}: {path} holds no images")
    return [r.image for r in records], np.array([r.label for r in records]), src.classes


def _labelled_text(path: Path, where: str) -> tuple[list[str], list[str]]:
    """A table (`flava.data.tables`) with `text` and `label` columns."""
    from ..data.tables import read_table

    try:
        table = read_table(path)
        text, label = (table.column(c, fix="the file needs a header with columns text and label")
                       for c in ("text", "label"))
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    rows = [tuple("" if r.get(c) is None else str(r.get(c)) for c in (text, label)) for r in table.rows]
    empty = sum(1 for t, lab in rows if not t.strip() or not lab.strip())
    if empty:
        raise DataError(f"{where}: {path} has {empty} row(s) with an empty text or label")
    if not rows:
        raise DataError(f"{where}: {path} has no rows")
    return [t for t, _ in rows], [lab for _, lab in rows]


def _settings(spec: dict, defaults: dict, where: str) -> FinetuneSettings:
    from ..config import from_dict

    merged = {**defaults, **spec.get("settings", {})}
    try:
        return from_dict(FinetuneSettings, merged, f"{where}.settings")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _lr_sweep(spec: dict, where: str) -> list[float] | None:
    sweep = spec.get("lr_sweep")
    if sweep is None:
        return None
    if not isinstance(sweep, list) or not sweep or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in sweep):
        raise ConfigError(f"{where}: lr_sweep takes a list of positive learning rates, e.g. [1e-4, 3e-4]; "
                          f"got {sweep!r}")
    if "lr" in spec.get("settings", {}):
        raise ConfigError(f"{where}: give either settings.lr or lr_sweep, not both")
    return [float(x) for x in sweep]


def prepare_task(spec: dict, base: Path, index: int, defaults: dict | None = None) -> Prepared:
    """Read and check one task's data (every error here comes before any task runs)."""
    where = f"task {index + 1}" + (f" ({spec['name']})" if isinstance(spec.get("name"), str) else "")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: a task is a JSON object, got {type(spec).__name__}")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{where}: kind {kind!r} is not a task kind{did_you_mean(str(kind), KINDS, 'choose one of')}")
    _check_keys(spec, KEYS[kind] | COMMON, where)
    data = spec.get("data")
    if data is not None and data not in DATASETS[kind]:
        raise DataError(f"{where}: no packaged data set {data!r} for {kind}; packaged: {', '.join(DATASETS[kind])}")
    seed = int(spec.get("seed", 0))
    modality = spec.get("modality", "image")
    if kind == "linear-probe" and modality not in ("image", "text"):
        raise ConfigError(f"{where}: modality {modality!r} must be 'image' or 'text'")
    domain = spec.get("domain") or {
        "retrieval": "multimodal", "zero-shot": "vision", "finetune-text": "language",
        "finetune-multimodal": "multimodal", "linear-probe": "vision" if modality == "image" else "language",
    }[kind]
    if domain not in DOMAINS:
        raise ConfigError(f"{where}: domain {domain!r} must be one of {', '.join(DOMAINS)}")
    name = spec.get("name") or f"{kind} {data or ''}".strip()

    if kind == "retrieval":
        from .zero_shot import read_karpathy_json, read_retrieval_csv

        if data == "easy-vqa":
            return _retrieval(name, domain, easy_vqa_galleries(int(spec.get("galleries", 1))))
        if "karpathy" in spec:
            rs = read_karpathy_json(_path(base, spec["karpathy"], where), spec.get("split", "test"),
                                    _path(base, spec.get("image_root", "."), where))
        elif "csv" in spec:
            rs = read_retrieval_csv(_path(base, spec["csv"], where))
        else:
            raise ConfigError(f"{where}: a retrieval task needs data, karpathy or csv")
        return _retrieval(name, domain, [(rs.images, rs.captions)])

    if kind == "zero-shot":
        from .zero_shot import parse_templates

        if data:
            images, labels, classes = _easy_vqa_classes(data, "test")
        elif "folder" in spec:
            images, labels, classes = _image_folder(_path(base, spec["folder"], where), where)
            classes = [c.replace("_", " ") for c in classes]
        else:
            raise ConfigError(f"{where}: a zero-shot task needs data or folder")
        if "class_names" in spec:
            names = spec["class_names"]
            if not isinstance(names, list) or len(names) != len(classes):
                raise ConfigError(f"{where}: class_names must list {len(classes)} names (one per class folder)")
            classes = [str(n) for n in names]
        try:
            templates = parse_templates(spec.get("templates", "clip"))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        return _zero_shot(name, domain, images, labels, classes, list(templates))

    if kind == "linear-probe":
        val = None
        if data == "digits":
            xtr, ytr, xte, yte = _digits()
            classes = [str(i) for i in range(10)]
        elif data in ("easy-vqa-shapes", "easy-vqa-colours"):
            xtr, ytr, classes = _easy_vqa_classes(data, "train")
            val = _easy_vqa_classes(data, "val")[:2]
            xte, yte, _ = _easy_vqa_classes(data, "test")
        elif data == "bbc-news":
            splits, classes = bbc_news_splits()
            (xtr, ytr), val, (xte, yte) = splits["train"], splits["val"], splits["test"]
        elif "train" in spec and "test" in spec:
            if modality == "image":
                xtr, ytr, classes = _image_folder(_path(base, spec["train"], where), where)
                xte, yte, _ = _image_folder(_path(base, spec["test"], where), where, classes)
                if "val" in spec:
                    val = _image_folder(_path(base, spec["val"], where), where, classes)[:2]
            else:
                xtr, ltr = _labelled_text(_path(base, spec["train"], where), where)
                classes = sorted(set(ltr))
                index = {c: i for i, c in enumerate(classes)}
                ytr = np.array([index[c] for c in ltr])

                def labelled(key):
                    x, labels = _labelled_text(_path(base, spec[key], where), where)
                    unknown = sorted(set(labels) - set(classes))
                    if unknown:
                        raise DataError(f"{where}: {spec[key]} has labels {unknown[:5]} outside the training labels "
                                        f"{classes[:10]}")
                    return x, np.array([index[c] for c in labels])

                xte, yte = labelled("test")
                val = labelled("val") if "val" in spec else None
        else:
            raise ConfigError(f"{where}: a linear-probe task needs data, or train and test")
        limit = spec.get("limit")
        if limit:
            xtr, ytr = xtr[:limit], ytr[:limit]
        if modality == "text" and data in ("digits", "easy-vqa-shapes", "easy-vqa-colours"):
            raise ConfigError(f"{where}: {data} holds images; use modality 'image'")
        if modality == "image" and data == "bbc-news":
            raise ConfigError(f"{where}: bbc-news holds text; use modality 'text'")
        return _probe(name, domain, modality, (xtr, ytr), val, (xte, yte), classes)

    settings = _settings(spec, defaults or {}, where)
    lr_sweep = _lr_sweep(spec, where)
    limit = spec.get("limit")
    if kind == "finetune-text":
        from .examples import TextExample
        from .readers.text import read_glue, read_text_classification

        if data == "bbc-news":
            splits, classes = bbc_news_splits()
            tr, va, te = ([TextExample(t, int(y)) for t, y in zip(*splits[k])] for k in ("train", "val", "test"))
            task = TextData(name, tr[:limit] if limit else tr, va, te, classes, ("accuracy",))
        elif "glue" in spec:
            task = read_glue(spec["glue"], _path(base, spec.get("dir", "."), where), seed=seed, limit=limit)
        elif "train" in spec and "test" in spec:
            task = read_text_classification(
                _path(base, spec["train"], where), _path(base, spec["val"], where) if "val" in spec else None,
                _path(base, spec["test"], where), label_names=spec.get("label_names"),
                regression=bool(spec.get("regression", False)), seed=seed, name=name, limit=limit)
        else:
            raise ConfigError(f"{where}: a finetune-text task needs data, glue (+ dir), or train and test")
        from .examples import check_text_data

        check_text_data(task)
        return _finetune(name, domain, task, settings, text=True, lr_sweep=lr_sweep)

    from .examples import check_multimodal_data
    from .readers.multimodal import easy_vqa_data, read_hateful_memes, read_snli_ve, read_vqa

    if data == "easy-vqa":
        task = easy_vqa_data(seed=seed, limit=limit)
    elif "vqa" in spec:
        v = spec["vqa"]
        if not isinstance(v, dict):
            raise ConfigError(f"{where}: vqa takes an object of train_questions, train_annotations, train_images, "
                              "test_questions, test_annotations, test_images")
        keys = ("train_questions", "train_annotations", "train_images", "test_questions", "test_annotations",
                "test_images")
        _check_keys(v, set(keys), f"{where}.vqa")
        missing = [k for k in keys if k not in v]
        if missing:
            raise ConfigError(f"{where}.vqa: missing {', '.join(missing)}")
        task = read_vqa(*(_path(base, v[k], f"{where}.vqa.{k}") for k in keys), limit=limit, seed=seed)
    elif "snli-ve" in spec:
        v = spec["snli-ve"]
        if not isinstance(v, dict) or set(v) - {"dir", "image_root"} or "dir" not in v or "image_root" not in v:
            raise ConfigError(f"{where}: snli-ve takes an object with dir and image_root")
        task = read_snli_ve(_path(base, v["dir"], where), _path(base, v["image_root"], where), limit=limit, seed=seed)
    elif "hateful-memes" in spec:
        task = read_hateful_memes(_path(base, spec["hateful-memes"], where), limit=limit, seed=seed)
    else:
        raise ConfigError(f"{where}: a finetune-multimodal task needs data, vqa, snli-ve or hateful-memes")
    check_multimodal_data(task)
    return _finetune(name, domain, task, settings, text=False, lr_sweep=lr_sweep)


@dataclass
class Suite:
    name: str
    tasks: list[Prepared]


def load_suite(source: str | Path | dict, base: Path | None = None) -> Suite:
    """Parse and prepare a suite: a JSON file path, the name 'demo', or an already parsed dict."""
    if isinstance(source, dict):
        spec, base = source, base or Path.cwd()
    elif str(source) == "demo":
        spec, base = DEMO_SUITE, Path.cwd()
    else:
        from ..io.files import read_json

        path = Path(source)
        spec, base = read_json(path, "suite file"), path.parent
    if not isinstance(spec, dict):
        raise ConfigError("a suite is a JSON object with a list of tasks")
    _check_keys(spec, {"name", "tasks", "settings"}, "suite")
    tasks = spec.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise ConfigError("the suite has no tasks (a non-empty list under 'tasks')")
    defaults = spec.get("settings", {})
    prepared = []
    for i, t in enumerate(tasks):
        try:
            prepared.append(prepare_task(t, base, i, defaults))
        except FlavaError as e:
            if str(e).startswith(f"task {i + 1}"):
                raise
            name = f" ({t['name']})" if isinstance(t, dict) and isinstance(t.get("name"), str) else ""
            raise type(e)(f"task {i + 1}{name}: {e}") from None
    names = [p.name for p in prepared]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"two tasks are named {dup!r}; give them distinct names")
    return Suite(str(spec.get("name", "suite")), prepared)


def run_suite(suite: Suite, model, tokenizer, model_name: str,
              on_task: Callable[[Prepared], Callable[[int, int], None]] | None = None) -> SuiteResult:
    """Run every prepared task in order; `on_task(task)` returns that task's progress callback."""
    results = []
    for task in suite.tasks:
        progress = on_task(task) if on_task else (lambda done, total: None)
        start = time.perf_counter()
        r = task.run(model, tokenizer, progress)
        r.seconds = time.perf_counter() - start
        results.append(r)
    return SuiteResult(suite.name, model_name, results)


# The suite `make demo` runs: packaged data only, sized for a few minutes per model on 2 cores.
DEMO_SUITE = {
    "name": "demo",
    "tasks": [
        {"kind": "retrieval", "name": "easy-vqa retrieval", "data": "easy-vqa", "galleries": 10},
        {"kind": "zero-shot", "name": "easy-vqa shapes zero-shot", "data": "easy-vqa-shapes"},
        {"kind": "zero-shot", "name": "easy-vqa colours zero-shot", "data": "easy-vqa-colours",
         "templates": ["a {} shape.", "a photo of a {} shape.", "a drawing of a {} shape."]},
        {"kind": "linear-probe", "name": "digits linear probe", "modality": "image", "data": "digits"},
        {"kind": "linear-probe", "name": "easy-vqa shapes linear probe", "modality": "image",
         "data": "easy-vqa-shapes"},
        {"kind": "linear-probe", "name": "easy-vqa colours linear probe", "modality": "image",
         "data": "easy-vqa-colours"},
        {"kind": "linear-probe", "name": "BBC News linear probe", "modality": "text", "data": "bbc-news"},
        # BBC News sweeps the learning rate (chosen on validation, per model): the pretrained and the
        # random text encoder want different rates, and one fixed rate favours one of them. VQA's
        # 3e-4 won the sweeps over 1e-4, 3e-4 and 1e-3 on every model tried (BENCHMARKS.md).
        {"kind": "finetune-text", "name": "BBC News fine-tune", "data": "bbc-news", "lr_sweep": [3e-4, 1e-3],
         "settings": {"epochs": 6, "batch_size": 32}},
        {"kind": "finetune-multimodal", "name": "easy-vqa VQA fine-tune", "data": "easy-vqa", "limit": 6000,
         "settings": {"lr": 3e-4, "epochs": 3, "batch_size": 64}},
    ],
}
