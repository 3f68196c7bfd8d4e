"""`flava classify`: zero-shot image classification with prompt ensembles."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..io.runs import MODEL_HELP


def add(sub) -> None:
    p = sub.add_parser("classify", help="zero-shot classify images by class names (prompt ensembles)")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--images", required=True, nargs="+", help="image files, folders (recursive) or globs")
    p.add_argument("--classes", help="class names, comma-separated, or a file with one per line (default with "
                   "--labels: the sub-folder names); underscores are read as spaces in the prompts, as evaluate's "
                   "zero-shot task reads them")
    p.add_argument("--templates", help="prompt templates: clip (22 in CLIP's manner, default), short ('a photo of a "
                   "{}.'), none, a file with one template per line, or templates separated by '|'; each has one {}")
    p.add_argument("--labels", action="store_true", help="the images' sub-folder names are their true classes: "
                   "print accuracy and write a confusion matrix picture")
    p.add_argument("--top-k", dest="top_k", type=int, default=3, help="classes kept per image (default 3)")
    p.add_argument("--output", help="write every prediction to this .csv, .tsv or .jsonl file, in predict's columns "
                   "(with --labels, a confusion matrix picture beside it, NAME_confusion.png)")
    p.add_argument("--replace", action="store_true",
                   help="write over an --output file (and its confusion matrix picture) that exists")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=32)
    p.add_argument("--device")
    p.add_argument("--int8", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> None:
    import numpy as np

    from ..data.images import said_left_out
    from ..errors import DataError, InputError
    from ..io.files import check_new_file
    from ..retrieval.classify import ZeroShotClassifier, check_classes, read_list, templates_from
    from ..retrieval.embed import image_inputs
    from .embed import load_for_inference
    from .predict import OUTPUT_SUFFIXES, write_predictions

    if args.top_k < 1:
        raise InputError(f"--top-k must be at least 1; got {args.top_k}")
    if args.output and Path(args.output).suffix.lower() not in OUTPUT_SUFFIXES:
        raise InputError(f"--output {args.output}: choose a .csv, .tsv or .jsonl file")
    inputs = image_inputs(args.images)
    truth = [row.get("label") for row in inputs.metadata]
    if args.classes:
        classes = read_list(args.classes, "classes")
    elif args.labels:
        classes = sorted({t for t in truth if t is not None})
        if not classes:
            raise InputError("--labels needs images in class sub-folders (FOLDER/CLASS/image.jpg)")
    else:
        raise InputError("name the classes with --classes (or use --labels with class sub-folders)")
    if args.labels:
        unknown = sorted({t for t in truth if t is not None} - set(classes))
        if unknown:
            raise InputError(f"--labels: sub-folder {unknown[0]!r} is not among the classes; name every class with "
                             "--classes or drop --labels")
        if None in truth:
            raise InputError(f"--labels: {inputs.images[truth.index(None)]} is in no class sub-folder; put each "
                             "image in FOLDER/CLASS/, or drop --labels")
    if len(classes) < 2:
        raise InputError(f"zero-shot classification ranks two or more classes; got {classes}: name the others with "
                         "--classes")
    check_classes(classes)  # before the model loads, not after
    templates = templates_from(args.templates)
    if args.output:
        named = [*args.images, args.classes or "", args.templates or ""]
        check_new_file(args.output, named, args.replace)
        if args.labels:  # the picture written beside it: never an image being classified, nor a file's loss
            picture = confusion_picture(Path(args.output))
            check_new_file(picture, [*named, *(str(p) for p in inputs.images if Path(p).name == picture.name)],
                           args.replace, what="the confusion matrix picture")
    model = load_for_inference(args.model, args.device, args.int8)
    check_classes(classes, model.processor.tokenizer)  # names it reads alike, before any work
    console.print(escape(f"classifying {len(inputs)} image(s){said_left_out(inputs.left_out)} into {len(classes)} "
                         f"classes with {len(templates)} prompt template(s)"))
    # Names are prompted as evaluate's zero-shot task prompts them (`prompt_name`: dark_red as "dark
    # red"), named or read from the folders; the labels stay the names as given.
    clf = ZeroShotClassifier(model, classes, templates, args.batch_size)
    predictions = clf.predict(inputs.images, args.top_k)
    failed = [p for p in predictions if p.error]
    first = "" if not failed else failed[0].error if str(failed[0].image) in failed[0].error else \
        f"{failed[0].image}: {failed[0].error}"
    if predictions and len(failed) == len(predictions):  # nothing classified is no result (as embed says)
        raise DataError(f"none of the {len(predictions)} image(s) could be used, e.g. {first}")
    out = Path(args.output) if args.output else None
    if out is not None:  # the columns and format `flava predict --output` writes
        rows = []
        for pred, t in zip(predictions, truth):
            # The file read, absolute, as `predict --output` writes it.
            row = {"image": os.path.abspath(pred.image), **({"true_label": t} if args.labels else {})}
            if pred.error:
                row["error"] = pred.error
            else:
                row.update(prediction=pred.top[0][0], score=pred.top[0][1],
                           top=[{"label": c, "score": p} for c, p in pred.top])
            rows.append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_predictions(out, rows)
    shown = predictions[:10]
    table = Table(title="predictions" + (f" (all in {escape(str(out))})" if out else
                                         f" (the first {len(shown)} of {len(predictions)}; --output FILE.csv writes "
                                         "them all)" if len(predictions) > len(shown) else ""))
    # Paths below the images' common folder: a class folder tells 0.png from 0.png.
    root = os.path.commonpath([str(Path(p.image).parent) for p in predictions]) if predictions else ""
    for col in ("image", "label", "probability", *(["true label"] if args.labels else [])):
        table.add_column(col)
    for pred, t in zip(shown, truth):  # paths, class names and errors shown as written, never as markup
        table.add_row(escape(os.path.relpath(pred.image, root) if root else str(pred.image)),
                      escape(pred.top[0][0]) if pred.top else f"[red]{escape(pred.error)}[/]",
                      f"{pred.top[0][1]:.3f}" if pred.top else "", *([escape(str(t))] if args.labels else []))
    console.print(table)
    if failed:
        console.print(f"{len(failed)} image(s) could not be used (unreadable, or refused for their size or shape), "
                      f"e.g. {escape(first)}")
    if args.labels:
        from ..scores import confusion_matrix

        ok = [(p, t) for p, t in zip(predictions, truth) if not p.error]
        pred_idx = np.array([classes.index(p.top[0][0]) for p, _ in ok])
        true_idx = np.array([classes.index(t) for _, t in ok])
        acc = float((pred_idx == true_idx).mean()) if len(ok) else float("nan")
        console.print(f"accuracy {100 * acc:.1f} % on {len(ok)} labelled image(s) (chance {100 / len(classes):.1f} %)")
        if out is not None:
            cm = confusion_matrix(pred_idx, true_idx, len(classes))
            picture = confusion_picture(out)
            _confusion_png(cm, classes, picture, acc)
            console.print(f"confusion matrix: {escape(str(picture))}")


def confusion_picture(output: Path) -> Path:
    """The confusion matrix picture written beside `--output` with `--labels`."""
    return output.with_name(output.stem + "_confusion.png")


def _confusion_png(cm, classes: list[str], path: Path, accuracy: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..evaluate.pictures import count_colour

    size = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    top = cm.max() or 1
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=top)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"zero-shot, accuracy {100 * accuracy:.1f} %")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8, color=count_colour(cm[i, j], top))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
