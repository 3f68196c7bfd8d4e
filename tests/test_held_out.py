"""The demo's pretraining data holds no example that the demo suite validates or tests on."""

from pathlib import Path

import numpy as np
import pytest

from flava.data.registry import demo_source
from flava.evaluate.packaged import bbc_news_splits, digits, easy_vqa_classes, easy_vqa_galleries
from flava.evaluate.suite import DEMO_SUITE
from flava.evaluate.readers.multimodal import easy_vqa_data


def _paragraphs(text):
    return {p.strip() for p in text.split("\n\n") if p.strip()}


@pytest.mark.slow
def test_demo_pretraining_data_excludes_every_evaluation_example():
    # Every task of the demo suite is covered below; a new task must be added here too.
    covered = {("retrieval", "easy-vqa"), ("zero-shot", "easy-vqa-shapes"), ("zero-shot", "easy-vqa-colours"),
               ("linear-probe", "digits"),
               ("linear-probe", "easy-vqa-shapes"), ("linear-probe", "easy-vqa-colours"),
               ("linear-probe", "bbc-news"), ("finetune-text", "bbc-news"), ("finetune-multimodal", "easy-vqa")}
    assert {(t["kind"], t["data"]) for t in DEMO_SUITE["tasks"]} <= covered

    pretrain_images = {Path(r.image).resolve() for kind in ("pairs", "images") for r in demo_source(kind).records
                       if isinstance(r.image, (str, Path))}
    pretrain_captions = {r.caption for r in demo_source("pairs").records}
    pretrain_text = set(demo_source("text").records)
    assert len(pretrain_images) > 3000 and len(pretrain_text) > 6000

    evaluated = set()  # images some task validates or tests on
    gallery = next(t for t in DEMO_SUITE["tasks"] if t["kind"] == "retrieval")["galleries"]
    for images, _ in easy_vqa_galleries(gallery):
        evaluated |= {Path(p).resolve() for p in images}
    for what in ("easy-vqa-shapes", "easy-vqa-colours"):
        for split in ("val", "test"):
            evaluated |= {Path(p).resolve() for p in easy_vqa_classes(what, split)[0]}
    vqa = easy_vqa_data(seed=0)
    evaluated |= {Path(ex.image).resolve() for ex in vqa.val + vqa.test}
    assert len(evaluated) > 1000
    assert not pretrain_images & evaluated, sorted(pretrain_images & evaluated)[:3]
    # Training images are pretrained on, apart from the held-out validation images.
    train_probe = {Path(p).resolve() for p in easy_vqa_classes("easy-vqa-shapes", "train")[0]}
    assert train_probe <= pretrain_images

    # Digits: the pretraining images that are not files are the digits' training images and the
    # scikit-image photographs; no test digit is among them, pixel for pixel.
    in_memory = {np.asarray(r.image.convert("L")).tobytes() for r in demo_source("images").records
                 if not isinstance(r.image, (str, Path))}
    digits_train, _, digits_test, _ = digits()
    tested = {np.asarray(im.convert("L")).tobytes() for im in digits_test}
    assert len(tested) == 450
    assert not in_memory & tested
    digits_train = {np.asarray(im.convert("L")).tobytes() for im in digits_train}
    assert digits_train <= in_memory

    splits, _ = bbc_news_splits()
    held_out = {p for split in ("val", "test") for text in splits[split][0] for p in _paragraphs(text)}
    assert len(held_out) > 3800
    assert not pretrain_text & held_out, sorted(pretrain_text & held_out)[:2]
    assert not pretrain_captions & held_out
    # The splits are disjoint article sets (the corpus repeats 100 articles: val and test leave out
    # those train holds, and their own repeats), train is the seeded split every release drew (1,501
    # articles: a model pretrained on an earlier release's never read val or test), and pretraining
    # keeps most of the training articles.
    norm = {k: [" ".join(t.split()) for t in splits[k][0]] for k in splits}
    held = norm["val"] + norm["test"]
    assert len(held) == len(set(held)) and not set(held) & set(norm["train"])
    assert len(norm["train"]) == 1501 and len(set(norm["train"]) | set(held)) == 2125
    train_paragraphs = {p for text in splits["train"][0] for p in _paragraphs(text)}
    assert len(pretrain_text & train_paragraphs) > 0.9 * len(pretrain_text)
