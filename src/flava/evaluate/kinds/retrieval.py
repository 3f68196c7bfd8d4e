"""Zero-shot retrieval by the contrastive cosine (the paper's TR / IR R@1 and R@5): a Karpathy-style
JSON (`karpathy`, `split`, `image_root`), a table of image and caption (`csv`), or packaged easy-vqa
galleries (`galleries` of them, scores averaged)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import ConfigError
from ..packaged import easy_vqa_galleries
from ..pictures import beside, retrieval_picture
from ..results import Measured, TaskResult, percent
from ..task_spec import PATH, TEXT, TaskSpec, check_images, one_source, whole
from . import TaskKind, register

Gallery = tuple[list, list[list[str]]]
"""Images and, per image, its captions."""


def read(t: TaskSpec) -> list[Gallery]:
    from ..zero_shot import read_karpathy_json, read_retrieval_csv

    one_source(t, {"data": ("galleries",), "karpathy": ("split", "image_root"), "csv": ()})
    if t.data == "easy-vqa":
        return easy_vqa_galleries(t.spec.get("galleries", 1))
    if "karpathy" in t.spec:
        rs = read_karpathy_json(t.path(t.spec["karpathy"]), t.spec.get("split", "test"),
                                t.path(t.spec.get("image_root", ".")))
    elif "csv" in t.spec:
        rs = read_retrieval_csv(t.path(t.spec["csv"]))
    else:
        raise ConfigError(f"{t.where}: a retrieval task needs data, karpathy or csv")
    check_images(rs.images, t.where)
    return [(rs.images, rs.captions)]


def size(galleries: list[Gallery]) -> str:
    n_img = sum(len(g[0]) for g in galleries)
    n_cap = sum(len(c) for g in galleries for c in g[1])
    return f"{n_img} images, {n_cap} captions"


def run(galleries: list[Gallery], model, tokenizer, progress) -> Measured:
    from ..zero_shot import retrieval

    results = []
    for i, (images, captions) in enumerate(galleries):
        results.append(retrieval(model, images, captions, tokenizer,
                                 progress=lambda d, t, i=i: progress(i * t + d, len(galleries) * t)))
    keys = results[0].metrics.keys()
    mean = {k: float(np.mean([r.metrics[k] for r in results])) for k in keys}
    scores = {"TR R@1": mean["image_to_text_R@1"], "TR R@5": mean["image_to_text_R@5"],
              "IR R@1": mean["text_to_image_R@1"], "IR R@5": mean["text_to_image_R@5"]}
    notes = [f"mean over {len(galleries)} galleries"] if len(galleries) > 1 else []
    n_img, n_cap = sum(len(g[0]) for g in galleries), sum(len(c) for g in galleries for c in g[1])
    return Measured(percent(scores), mean, notes, detail={"result": results[0], "images": galleries[0][0]},
                    examples={"TR R@1": n_img, "TR R@5": n_img, "IR R@1": n_cap, "IR R@5": n_cap})


def pictures(result: TaskResult, base: Path) -> list[str | None]:
    return [retrieval_picture(result, beside(base, "-examples.png"))]


register(TaskKind("retrieval", frozenset({"data", "karpathy", "split", "image_root", "csv", "galleries"}),
                  lambda spec: "multimodal", read, size, run, pictures, datasets=("easy-vqa",),
                  fields={"karpathy": PATH, "split": TEXT, "image_root": PATH, "csv": PATH, "galleries": whole(1)}))
