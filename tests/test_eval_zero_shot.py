"""Feature extraction, zero-shot retrieval and classification, annotation readers, linear probe."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import randomize_
from flava.config import preset
from flava.data.tokenizer import TextTokenizer
from flava.data.transforms import eval_transform
from flava.errors import DataError, InputError
from flava import scores as metrics
from flava.evaluate import features, probe, zero_shot
from flava.model.flava import FlavaModel

CAPTIONS = [["a red square", "a square that is red"], ["a green circle"], ["a blue triangle", "blue", "a triangle"],
            ["two cats on a sofa"], ["a bowl of soup with a spoon"]]


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer(max_length=32)


@pytest.fixture(scope="module")
def model():
    return randomize_(FlavaModel(preset("tiny")))


def random_images(n, seed=0):
    """PIL images and arrays of assorted sizes (the transform resizes and crops them)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        arr = rng.integers(0, 256, size=(48 + 7 * i, 80 - 3 * i, 3), dtype=np.uint8)
        out.append(arr if i % 2 else Image.fromarray(arr))
    return out


def pixels(images, size=64):
    return torch.stack([eval_transform(im, size) for im in images])


def planted(model, tokenizer, images, image_targets, texts, text_targets):
    """A copy of `model` whose projections send every image/text exactly to its target direction:
    the projections are solved by least squares on the (fixed) CLS features."""
    m = copy.deepcopy(model)
    for proj, feats in ((m.image_projection, features.image_cls_features(m, images)),
                        (m.text_projection, features.text_cls_features(m, texts, tokenizer))):
        targets = image_targets if proj is m.image_projection else text_targets
        a = np.concatenate([feats.astype(np.float64), np.ones((len(feats), 1))], axis=1)
        sol = np.linalg.lstsq(a, targets, rcond=None)[0]  # [d + 1, D]
        with torch.no_grad():
            proj.weight.copy_(torch.from_numpy(sol[:-1].T))
            proj.bias.copy_(torch.from_numpy(sol[-1]))
    return m.eval()


# --------------------------------------------------------------------------- features


def test_image_features_match_full_forward(model):
    images = random_images(5)
    ref = model(pixel_values=pixels(images))
    cls = features.image_cls_features(model, images, batch_size=2)
    emb = features.image_embeddings(model, images, batch_size=3)
    assert cls.dtype == np.float32 and cls.shape == (5, 128) and emb.shape == (5, 128)
    np.testing.assert_allclose(cls, ref.image.last_hidden_state[:, 0].detach().numpy(), atol=2e-5)
    np.testing.assert_allclose(emb, ref.image_embeddings.detach().numpy(), atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # The CLS feature is before the projection: projecting it gives the embedding.
    proj = model.image_projection(torch.from_numpy(cls)).detach()
    np.testing.assert_allclose(emb, torch.nn.functional.normalize(proj, dim=-1).numpy(), atol=2e-5)


def test_text_features_match_full_forward_with_padding(model, tokenizer):
    texts = [c for caps in CAPTIONS for c in caps]
    tok = tokenizer(texts)
    assert (tok.attention_mask == 0).any()  # padding is exercised
    ref = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
    cls = features.text_cls_features(model, texts, tokenizer, batch_size=3)
    emb = features.text_embeddings(model, texts, tokenizer, batch_size=4)
    np.testing.assert_allclose(cls, ref.text.last_hidden_state[:, 0].detach().numpy(), atol=2e-5)
    np.testing.assert_allclose(emb, ref.text_embeddings.detach().numpy(), atol=2e-5)
    assert features.text_embeddings(model, [], tokenizer).shape == (0, 128)


def test_features_progress_mode_and_paths(model, tmp_path):
    images = random_images(5)
    paths = []
    for i, im in enumerate(images[:2]):
        Image.fromarray(np.asarray(im)).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    calls = []
    model.train()
    try:
        got = features.image_embeddings(model, [str(paths[0]), paths[1]] + images[2:], batch_size=2,
                                        progress=lambda done, total: calls.append((done, total)))
        assert model.training  # the caller's mode is restored
    finally:
        model.eval()
    assert calls == [(2, 5), (4, 5), (5, 5)]
    np.testing.assert_allclose(got, features.image_embeddings(model, images), atol=2e-5)


def test_features_bad_inputs(model, tokenizer, tmp_path):
    calls = []
    random_images(1)[0].save(tmp_path / "ok.png")
    with pytest.raises(DataError, match=r"2 of 4 image files are missing; the first is .*nope1\.png"):
        features.image_embeddings(model, [tmp_path / "ok.png", tmp_path / "nope1.png", str(tmp_path / "ok.png"),
                                          tmp_path] + random_images(1), progress=lambda *a: calls.append(a))
    assert calls == []  # nothing ran (a directory is not an image file either)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png: unreadable image"):
        features.image_cls_features(model, [tmp_path / "bad.png"])
    with pytest.raises(InputError, match="got int"):
        features.image_embeddings(model, [3])
    with pytest.raises(InputError, match="item 1 is a int"):
        features.text_embeddings(model, ["fine", 7], tokenizer)
    with pytest.raises(InputError, match="batch_size"):
        features.text_embeddings(model, ["fine"], tokenizer, batch_size=0)


# --------------------------------------------------------------------------- retrieval


def test_retrieval_on_planted_model_recalls_everything(model, tokenizer):
    images = random_images(len(CAPTIONS))
    t2i = [i for i, caps in enumerate(CAPTIONS) for _ in caps]
    eye = np.eye(128)
    m = planted(model, tokenizer, images, eye[: len(images)], [c for caps in CAPTIONS for c in caps], eye[t2i])
    r = zero_shot.retrieval(m, images, CAPTIONS, tokenizer, ks=(1, 5))
    assert r.metrics == {"image_to_text_R@1": 1.0, "image_to_text_R@5": 1.0,
                         "text_to_image_R@1": 1.0, "text_to_image_R@5": 1.0, "mean_recall": 1.0}
    np.testing.assert_allclose(r.similarity, eye[: len(images)][:, t2i], atol=1e-3)
    assert list(r.text_to_image) == t2i and r.captions[3] == "a blue triangle"
    assert list(r.image_to_text_rank) == [0] * 5 and list(r.text_to_image_rank) == [0] * len(t2i)
    top = r.top_captions(2, k=4)
    assert {c for c, _, own in top[:3]} == set(CAPTIONS[2]) and [own for *_, own in top] == [True] * 3 + [False]


def test_retrieval_matches_model_embeddings_and_metrics(model, tokenizer):
    images = random_images(5, seed=1)
    captions = CAPTIONS[:4] + [[]]  # the last image is a distractor only
    calls = []
    r = zero_shot.retrieval(model, images, captions, tokenizer, image_batch_size=2,
                            progress=lambda d, t: calls.append((d, t)))
    flat = [c for caps in captions for c in caps]
    tok = tokenizer(flat)
    img = model(pixel_values=pixels(images)).image_embeddings
    txt = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).text_embeddings
    np.testing.assert_allclose(r.similarity, (img @ txt.T).detach().numpy(), atol=1e-5)
    assert r.metrics == metrics.retrieval_recall(r.similarity, r.text_to_image)
    assert r.image_to_text_rank[4] == -1
    assert calls[-1] == (5 + len(flat), 5 + len(flat)) and calls[0] == (2, 5 + len(flat))


def test_a_caption_text_two_images_share_is_right_for_both_whatever_the_batches(model, tokenizer):
    images = random_images(3, seed=2)
    captions = [["a dog", "a long caption about a dog running on the grass in the park"], ["a dog"], ["a cat"]]
    runs = [zero_shot.retrieval(model, images, captions, tokenizer, text_batch_size=b) for b in (1, 2, 256)]
    assert all(r.metrics == runs[0].metrics for r in runs)
    sim, t2i = runs[0].similarity, runs[0].text_to_image
    assert sim[0, 0] == sim[0, 2] and sim[1, 0] == sim[1, 2]  # one text, one embedding
    # Image 1's own text "a dog" is caption 0's too: that caption never counts against image 1.
    i2t, _ = metrics.retrieval_ranks(sim, t2i, [0, 1, 0, 2])
    assert list(i2t) == list(runs[0].image_to_text_rank)
    assert i2t[1] == int((sim[1, [1, 3]] >= sim[1, 2]).sum())  # only the captions of other texts count


def test_retrieval_bad_inputs(model, tokenizer):
    with pytest.raises(InputError, match="2 images but captions for 1"):
        zero_shot.retrieval(model, random_images(2), [["a"]], tokenizer)
    with pytest.raises(InputError, match="no captions"):
        zero_shot.retrieval(model, random_images(2), [[], []], tokenizer)


def write_pngs(root, names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (200, 10, 10)).save(path)


def karpathy(tmp_path, entries):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return path


def test_read_karpathy_json(tmp_path):
    entries = [
        {"filepath": "val2014", "filename": "a.jpg", "split": "test", "sentences": [{"raw": "A dog."}, {"raw": "Dog"}]},
        {"filepath": "train2014", "filename": "b.jpg", "split": "train", "sentences": [{"raw": "x"}]},
        {"filename": "c.jpg", "split": "test", "sentences": [{"raw": "A cat.", "tokens": ["a", "cat"]}]},
    ]
    write_pngs(tmp_path, ["val2014/a.jpg", "c.jpg"])  # the train image is absent: only the split is checked
    data = zero_shot.read_karpathy_json(karpathy(tmp_path, entries), "test", tmp_path)
    assert data.images == [tmp_path / "val2014" / "a.jpg", tmp_path / "c.jpg"]
    assert data.captions == [["A dog.", "Dog"], ["A cat."]]
    with pytest.raises(DataError, match=r"1 of 1 image files are missing; the first is .*train2014/b\.jpg"):
        zero_shot.read_karpathy_json(karpathy(tmp_path, entries), "train", tmp_path)
    with pytest.raises(DataError, match=r"no images in split 'val' \(its splits: test, train\)"):
        zero_shot.read_karpathy_json(karpathy(tmp_path, entries), "val", tmp_path)


def test_read_karpathy_json_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        zero_shot.read_karpathy_json(tmp_path / "none.json", "test", tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        zero_shot.read_karpathy_json(tmp_path / "bad.json", "test", tmp_path)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(DataError, match='no top-level "images" list'):
        zero_shot.read_karpathy_json(tmp_path / "list.json", "test", tmp_path)
    path = karpathy(tmp_path, [{"filename": "a.jpg", "split": "test", "sentences": [{"text": "no raw"}]}])
    with pytest.raises(DataError, match=r"image entry 0 lacks a field \('raw'\)"):
        zero_shot.read_karpathy_json(path, "test", tmp_path)
    write_pngs(tmp_path, ["a.jpg", "b.jpg"])
    path = karpathy(tmp_path, [{"filename": "a.jpg", "split": "test", "sentences": [{"raw": "x"}]},
                               {"filename": "b.jpg", "split": "test", "sentences": [{"raw": "y"}]},
                               {"filename": "gone1.jpg", "split": "test", "sentences": [{"raw": "z"}]},
                               {"filename": "gone2.jpg", "split": "test", "sentences": [{"raw": "z"}]}])
    with pytest.raises(DataError, match=r"2 of 4 image files are missing; the first is .*gone1\.jpg"):
        zero_shot.read_karpathy_json(path, "test", tmp_path)


def test_read_retrieval_csv(tmp_path):
    write_pngs(tmp_path, ["img/a.png", "img/b.png"])
    (tmp_path / "pairs.csv").write_text(
        "image,caption\nimg/b.png,first b\nimg/a.png,an a\n./img/b.png,\"second, b\"\nimg/a.png,another a\n")
    data = zero_shot.read_retrieval_csv(tmp_path / "pairs.csv")
    assert data.images == [tmp_path / "img" / "b.png", tmp_path / "img" / "a.png"]
    assert data.captions == [["first b", "second, b"], ["an a", "another a"]]
    assert len(data) == 2
    (tmp_path / "missing.csv").write_text("image,caption\nimg/a.png,x\nimg/z.png,y\n")
    with pytest.raises(DataError, match=r"1 of 2 image files are missing; the first is .*z\.png"):
        zero_shot.read_retrieval_csv(tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text("image,caption\n")
    with pytest.raises(DataError, match="has no images"):
        zero_shot.read_retrieval_csv(tmp_path / "empty.csv")
    (tmp_path / "cols.csv").write_text("path,text\na,b\n")
    with pytest.raises(DataError, match="no column 'image'"):
        zero_shot.read_retrieval_csv(tmp_path / "cols.csv")


# --------------------------------------------------------------------------- zero-shot classification


def test_class_embeddings_average_normalised_prompts(model, tokenizer):
    names, templates = ["cat", "dog", "sea turtle"], ("a photo of a {}.", "a drawing of a {}.", "{}")
    got = zero_shot.class_embeddings(model, names, tokenizer, templates)
    prompts = [t.format(n) for n in names for t in templates]
    emb = features.text_embeddings(model, prompts, tokenizer).reshape(3, 3, -1).astype(np.float64)
    want = emb.mean(axis=1)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert len(zero_shot.CLIP_TEMPLATES) >= 20 and all(t.count("{}") == 1 for t in zero_shot.CLIP_TEMPLATES)


def test_zero_shot_classification_consistency(model, tokenizer):
    images, labels, names = random_images(6, seed=2), [0, 1, 2, 0, 1, 2], ["cat", "dog", "car"]
    r = zero_shot.zero_shot_classification(model, images, labels, names, tokenizer, templates=zero_shot.SHORT_TEMPLATES)
    want = features.image_embeddings(model, images) @ zero_shot.class_embeddings(
        model, names, tokenizer, zero_shot.SHORT_TEMPLATES).T
    np.testing.assert_allclose(r.scores, want, atol=1e-6)
    assert r.predictions.shape == (6,) and list(r.predictions) == list(want.argmax(axis=1))
    assert r.confusion.shape == (3, 3) and r.confusion.sum() == 6
    assert list(r.confusion.sum(axis=1)) == [2, 2, 2]
    assert r.top1 == metrics.accuracy(r.predictions, labels)  # random scores: no ties
    assert r.top5 == 1.0  # 3 classes: top-3
    assert r.metrics == {"top1": r.top1, "top5": 1.0}


def test_zero_shot_classification_planted(model, tokenizer):
    names, templates = ["cat", "dog", "car", "tree", "boat", "lamp"], ("a photo of a {}.", "a {} drawn badly.")
    labels = [5, 0, 1, 2, 3, 4, 0, 3]
    images = random_images(len(labels), seed=3)
    prompts = [t.format(n) for n in names for t in templates]
    eye = np.eye(128)
    m = planted(model, tokenizer, images, eye[labels], prompts, eye[np.repeat(np.arange(6), 2)])
    r = zero_shot.zero_shot_classification(m, images, labels, names, tokenizer, templates)
    assert r.top1 == 1.0 and r.top5 == 1.0 and list(r.predictions) == labels
    np.testing.assert_array_equal(r.confusion, np.diag(np.bincount(labels, minlength=6)))


def test_zero_shot_classification_bad_inputs(model, tokenizer):
    with pytest.raises(InputError, match="exactly one"):
        zero_shot.zero_shot_classification(model, random_images(1), [0], ["cat"], tokenizer, templates=("a photo",))
    with pytest.raises(InputError, match=r"labels must lie in \[0, 2\)"):
        zero_shot.zero_shot_classification(model, random_images(1), [2], ["cat", "dog"], tokenizer)
    with pytest.raises(InputError, match="2 images but 1 labels"):
        zero_shot.zero_shot_classification(model, random_images(2), [0], ["cat"], tokenizer)


# --------------------------------------------------------------------------- linear probe


def blobs(n, classes=3, dim=16, spread=0.1, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.eye(dim)[:classes] * 3
    y = np.arange(n) % classes
    return centers[y] + spread * rng.normal(size=(n, dim)), y


def test_linear_probe_separable_data():
    tx, ty = blobs(150)
    sx, sy = blobs(60, seed=1)
    r = probe.linear_probe(tx, ty, sx, sy)
    assert r.accuracy == 1.0 and r.val_accuracy == 1.0
    np.testing.assert_array_equal(r.confusion, np.diag([20, 20, 20]))
    assert list(r.predictions) == list(sy)
    # Coarse sweep first (strongest regularisation first), then the fine pass around the winner.
    assert [lam for lam, _ in r.sweep[:13]] == [10.0 ** k for k in range(6, -7, -1)]
    assert len(r.sweep) > 13 and r.lam in [lam for lam, _ in r.sweep]
    best = max(acc for _, acc in r.sweep)
    assert r.lam == max(lam for lam, acc in r.sweep if acc == best)  # ties go to the largest λ
    assert r.n_train == 120 and r.n_val == 30  # 20 % of each class of 50 held out
    assert r.metrics["top1"] == 1.0 and r.converged


def test_linear_probe_picks_by_validation_and_refits_on_train_plus_val(monkeypatch):
    fits = []

    class Recording(probe.LogisticRegression):
        def fit(self, x, y):
            fits.append((len(x), self.C))
            return super().fit(x, y)

    monkeypatch.setattr(probe, "LogisticRegression", Recording)
    tx, ty = blobs(90, spread=2.0, seed=2)  # overlapping: λ matters
    vx, vy = blobs(45, spread=2.0, seed=3)
    sx, sy = blobs(60, spread=2.0, seed=4)
    r = probe.linear_probe(tx, ty, sx, sy, val=(vx, vy))
    assert all(n == 90 for n, _ in fits[:-1]) and fits[-1] == (135, 1.0 / r.lam)
    assert r.n_train == 90 and r.n_val == 45
    # The reported validation accuracy is that of the chosen λ, re-measured independently.
    clf = probe.LogisticRegression(C=1.0 / r.lam, max_iter=1000).fit(tx, ty)
    assert r.val_accuracy == pytest.approx(np.mean(clf.predict(vx) == vy), abs=1 / 45 + 1e-9)
    assert r.val_accuracy == max(acc for _, acc in r.sweep)
    assert 0.4 < r.accuracy < 1.0
    assert r.accuracy == metrics.accuracy(r.predictions, sy)


def test_stratified_holdout():
    y = np.array([0] * 10 + [1] * 5 + [2] * 1 + [3] * 2)
    held = probe.stratified_holdout(y, 0.2, seed=0)
    assert [int(held[y == c].sum()) for c in range(4)] == [2, 1, 0, 0]  # round(0.4) = 0; ≥ 1 stays
    assert (held == probe.stratified_holdout(y, 0.2, seed=0)).all()
    assert any((held != probe.stratified_holdout(y, 0.2, seed=s)).any() for s in range(1, 5))
    assert [int(probe.stratified_holdout(y, 0.5, 0)[y == c].sum()) for c in range(4)] == [5, 3, 0, 1]


def test_linear_probe_labels_and_errors():
    tx, ty = blobs(60)
    names = np.array(["ant", "bee", "cow"])
    r = probe.linear_probe(tx, names[ty], tx[:9], names[ty[:9]], seed=1)
    assert list(r.classes) == ["ant", "bee", "cow"] and list(r.predictions) == list(names[ty[:9]])
    with pytest.raises(DataError, match=r"test has 2 examples with labels the training split lacks \(7\)"):
        probe.linear_probe(tx, ty, tx[:4], [0, 7, 7, 1])
    with pytest.raises(DataError, match="val has 1 examples"):
        probe.linear_probe(tx, ty, tx[:2], ty[:2], val=(tx[:1], [9]))
    with pytest.raises(DataError, match="at least two classes"):
        probe.linear_probe(tx, np.zeros(60, int), tx[:2], [0, 0])
    with pytest.raises(InputError, match="test_x has 3 features but train_x has 16"):
        probe.linear_probe(tx, ty, tx[:2, :3], ty[:2])
    with pytest.raises(InputError, match="one label per row"):
        probe.linear_probe(tx, ty[:5], tx, ty)
    with pytest.raises(DataError, match="too few training examples"):
        probe.linear_probe(tx[:2], [0, 1], tx[:2], [0, 1])


def test_linear_probe_on_model_cls_features(model):
    """End to end on real images (scikit-learn digits) through the tiny model's image CLS."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    imgs = (digits.images[:400] * (255 / 16)).astype(np.uint8)
    feats = features.image_cls_features(model, [np.repeat(im[..., None], 3, axis=2) for im in imgs])
    y = digits.target[:400]
    r = probe.linear_probe(feats[:300], y[:300], feats[300:], y[300:])
    assert r.accuracy > 0.5  # chance is 0.1; random ViT features still separate digits


def test_a_retrieval_file_with_unusable_rows_is_refused_not_shrunk(tmp_path):
    write_pngs(tmp_path, ["img/a.png"])
    (tmp_path / "pairs.tab").write_bytes(b"image\tcaption\nimg/a.png\tan a\nimg/a.png\tbad \xff\n")
    with pytest.raises(DataError, match=r"unusable rows \(1 undecodable csv row\)"):
        zero_shot.read_retrieval_csv(tmp_path / "pairs.tab")
    (tmp_path / "good.tab").write_text("image\tcaption\nimg/a.png\tan a\n")
    assert zero_shot.read_retrieval_csv(tmp_path / "good.tab").captions == [["an a"]]
