"""Evaluation metrics against scikit-learn, scipy and brute-force loops, ties included."""

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics as skm

from flava.errors import InputError
from flava import scores as M


def tied_scores(rng, shape, levels=3):
    """Scores drawn from a few values, so ties are everywhere."""
    return rng.integers(0, levels, size=shape) / levels


def first_hit_adversarial(scores, right):
    """Position of the first right candidate when sorting by score, wrong before right on ties."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], bool(right[j])))
    return next(pos for pos, j in enumerate(order) if right[j])


def brute_recall(sim, t2i, ks):
    n_images, n_texts = sim.shape
    out = {}
    queries = [i for i in range(n_images) if i in set(t2i)]
    for k in ks:
        hits = [first_hit_adversarial(sim[i], [t2i[j] == i for j in range(n_texts)]) < k for i in queries]
        out[f"image_to_text_R@{k}"] = sum(hits) / len(hits)
    for k in ks:
        hits = [first_hit_adversarial(sim[:, j], [i == t2i[j] for i in range(n_images)]) < k
                for j in range(n_texts)]
        out[f"text_to_image_R@{k}"] = sum(hits) / len(hits)
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


def albef_recall(sim, t2i, ks):
    """The argsort-based evaluation of ALBEF/BLIP (valid when there are no ties)."""
    n_images, n_texts = sim.shape
    img2txt = [[j for j in range(n_texts) if t2i[j] == i] for i in range(n_images)]
    i2t = []
    for i in range(n_images):
        inds = np.argsort(sim[i])[::-1]
        i2t.append(min(np.where(inds == j)[0][0] for j in img2txt[i]))
    t2i_rank = [np.where(np.argsort(sim[:, j])[::-1] == t2i[j])[0][0] for j in range(n_texts)]
    i2t, t2i_rank = np.array(i2t), np.array(t2i_rank)
    return {**{f"image_to_text_R@{k}": float(np.mean(i2t < k)) for k in ks},
            **{f"text_to_image_R@{k}": float(np.mean(t2i_rank < k)) for k in ks}}


@pytest.mark.parametrize("seed", range(5))
def test_retrieval_recall_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n_images = 12
    # 1-4 captions per image, image 5 has none (a distractor for text->image only), shuffled order.
    t2i = np.array([i for i in range(n_images) if i != 5 for _ in range(rng.integers(1, 5))])
    t2i = rng.permutation(t2i)
    sim = tied_scores(rng, (n_images, len(t2i)))
    ks = (1, 2, 5, 10, 100)
    got = M.retrieval_recall(sim, t2i, ks)
    want = brute_recall(sim, list(t2i), ks)
    assert list(got) == list(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_retrieval_recall_matches_albef_argsort_without_ties():
    rng = np.random.default_rng(0)
    t2i = np.repeat(np.arange(20), 5)
    sim = rng.normal(size=(20, 100))
    sim[t2i, np.arange(100)] += 1.5  # make recall neither 0 nor 1
    got = M.retrieval_recall(sim, t2i)
    want = albef_recall(sim, t2i, (1, 5, 10))
    for key, value in want.items():
        assert got[key] == pytest.approx(value)
    assert 0 < got["image_to_text_R@1"] < 1 and 0 < got["text_to_image_R@1"] < 1
    assert got["mean_recall"] == pytest.approx(np.mean(list(want.values())))


def test_retrieval_ties_count_against_the_query():
    # A collapsed model (every similarity equal) must not get credit from index order.
    t2i = np.repeat(np.arange(4), 2)
    r = M.retrieval_recall(np.zeros((4, 8)), t2i, ks=(1, 3, 6, 7))
    # image->text: 6 wrong captions tie with the right ones -> rank 6; text->image: 3 wrong images -> rank 3.
    assert [r[f"image_to_text_R@{k}"] for k in (1, 3, 6, 7)] == [0, 0, 0, 1]
    assert [r[f"text_to_image_R@{k}"] for k in (1, 3, 6, 7)] == [0, 0, 1, 1]
    # Two own captions tied with each other do not push each other down.
    sim = np.array([[0.9, 0.9, 0.1], [0.0, 0.0, 0.5]])
    i2t, _ = M.retrieval_ranks(sim, [0, 0, 1])
    assert list(i2t) == [0, 0]


def test_retrieval_ranks_exact_values():
    sim = np.array([[0.5, 0.2, 0.9],
                    [0.1, 0.8, 0.9],
                    [0.3, 0.1, 0.2]])
    i2t, t2i = M.retrieval_ranks(sim, [0, 0, 1])
    # image 0 owns texts 0,1: best 0.5; wrong text 2 (0.9) is above -> rank 1.
    # image 1 owns text 2 (0.9): no wrong text >= 0.9 -> 0. image 2 owns nothing -> -1.
    assert list(i2t) == [1, 0, -1]
    # text 0 -> image 0 (0.5): none above -> 0; text 1 -> image 0 (0.2): image 1 (0.8) -> 1;
    # text 2 -> image 1 (0.9): image 0 ties at 0.9 -> 1.
    assert list(t2i) == [0, 1, 1]


def test_retrieval_errors():
    with pytest.raises(InputError, match="text_to_image maps 2 captions"):
        M.retrieval_recall(np.zeros((2, 3)), [0, 1])
    with pytest.raises(InputError, match="only 2 classes"):
        M.retrieval_recall(np.zeros((2, 2)), [0, 2])
    with pytest.raises(InputError, match="NaN"):
        M.retrieval_recall(np.full((2, 2), np.nan), [0, 1])
    with pytest.raises(InputError, match="ks"):
        M.retrieval_recall(np.zeros((2, 2)), [0, 1], ks=(0,))


# --------------------------------------------------------------------------- classification


def test_topk_accuracy_matches_sklearn_without_ties():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(300, 7))
    labels = rng.integers(0, 7, 300)
    for k in (1, 2, 5):
        want = skm.top_k_accuracy_score(labels, scores, k=k, labels=np.arange(7))
        assert M.topk_accuracy(scores, labels, k) == pytest.approx(want)


@pytest.mark.parametrize("seed", range(3))
def test_topk_accuracy_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = tied_scores(rng, (200, 6))
    labels = rng.integers(0, 6, 200)
    for k in (1, 3, 6, 9):
        hits = [first_hit_adversarial(row, [c == y for c in range(6)]) < k for row, y in zip(scores, labels)]
        assert M.topk_accuracy(scores, labels, k) == pytest.approx(np.mean(hits))


def test_topk_accuracy_clamps_k_and_counts_ties_pessimistically():
    assert M.topk_accuracy(np.zeros((4, 3)), [0, 1, 2, 0], 5) == 1.0  # top-5 of 3 classes = top-3
    assert M.topk_accuracy(np.zeros((4, 3)), [0, 1, 2, 0], 2) == 0.0
    assert M.topk_accuracy([[0.1, 0.9], [0.8, 0.2]], [1, 1], 1) == 0.5
    with pytest.raises(InputError, match="k must"):
        M.topk_accuracy(np.zeros((2, 3)), [0, 1], 0)


def test_accuracy_and_confusion_matrix_match_sklearn():
    rng = np.random.default_rng(2)
    y, p = rng.integers(0, 5, 500), rng.integers(0, 5, 500)
    assert M.accuracy(p, y) == pytest.approx(skm.accuracy_score(y, p))
    np.testing.assert_array_equal(M.confusion_matrix(p, y), skm.confusion_matrix(y, p, labels=range(5)))
    cm = M.confusion_matrix([1, 1], [1, 1], num_classes=4)
    assert cm.shape == (4, 4) and cm[1, 1] == 2 and cm.sum() == 2
    with pytest.raises(InputError, match="only 4 classes"):
        M.confusion_matrix([4], [0], num_classes=4)
    with pytest.raises(InputError, match="3 entries but labels has 2"):
        M.accuracy([0, 1, 1], [0, 1])
    with pytest.raises(InputError, match="empty"):
        M.accuracy([], [])


def test_f1_and_mcc_match_sklearn():
    rng = np.random.default_rng(3)
    for _ in range(20):
        y, p = rng.integers(0, 2, 40), rng.integers(0, 2, 40)
        assert M.f1_binary(p, y) == pytest.approx(skm.f1_score(y, p))
        assert M.matthews_corrcoef(p, y) == pytest.approx(skm.matthews_corrcoef(y, p))
    y, p = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
    assert M.matthews_corrcoef(p, y) == pytest.approx(skm.matthews_corrcoef(y, p))


@pytest.mark.filterwarnings("ignore:A single label was found")
def test_f1_and_mcc_degenerate_cases():
    zeros = np.zeros(6, dtype=int)
    assert M.f1_binary(zeros, zeros) == 0.0 == skm.f1_score(zeros, zeros, zero_division=0)
    assert M.f1_binary(np.ones(4, int), np.ones(4, int)) == 1.0
    assert M.matthews_corrcoef(zeros, zeros) == 0.0 == skm.matthews_corrcoef(zeros, zeros)
    assert M.matthews_corrcoef(np.ones(6, int), [0, 1, 0, 1, 1, 1]) == 0.0  # constant predictions
    assert M.matthews_corrcoef([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert M.matthews_corrcoef([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    with pytest.raises(InputError, match="binary"):
        M.f1_binary([0, 2], [0, 1])
    with pytest.raises(InputError, match="integer class indices"):
        M.f1_binary([0.5, 1], [0, 1])


# --------------------------------------------------------------------------- correlations, AUROC, VQA


@pytest.mark.parametrize("seed", range(4))
def test_correlations_match_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 5, 100).astype(float)  # heavy ties
    b = a + rng.integers(0, 4, 100)
    assert M.pearson(a, b) == pytest.approx(scipy.stats.pearsonr(a, b).statistic)
    assert M.spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b).statistic)
    x, y = rng.normal(size=50), rng.normal(size=50)
    assert M.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y).statistic)
    assert M.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic)


def test_average_ranks_match_scipy():
    rng = np.random.default_rng(5)
    x = rng.integers(0, 6, 40).astype(float)
    np.testing.assert_allclose(M.average_ranks(x), scipy.stats.rankdata(x, method="average"))


def test_correlations_degenerate():
    assert M.pearson([0.1] * 7, [1, 2, 3, 4, 5, 6, 7]) == 0.0  # 0.1's float mean is not exactly 0.1
    assert M.spearman([1, 2, 3], [5, 5, 5]) == 0.0
    assert M.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert M.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    with pytest.raises(InputError, match="at least two"):
        M.pearson([1.0], [2.0])


@pytest.mark.parametrize("seed", range(4))
def test_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 120)
    s = tied_scores(rng, 120, levels=4) + 0.3 * y
    assert M.auroc(s, y) == pytest.approx(skm.roc_auc_score(y, s))
    pos, neg = s[y == 1], s[y == 0]
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert M.auroc(s, y) == pytest.approx(brute)


def test_auroc_degenerate():
    assert M.auroc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5
    assert M.auroc([0.1, 0.9], [0, 1]) == 1.0
    with pytest.raises(InputError, match="every label is 0"):
        M.auroc([0.1, 0.2], [0, 0])
    with pytest.raises(InputError, match="every label is 1"):
        M.auroc([0.1, 0.2], [1, 1])


def test_vqa_score():
    rng = np.random.default_rng(6)
    soft = rng.choice([0, 0.3, 0.6, 0.9, 1.0], size=(50, 8))
    pred = rng.integers(0, 8, 50)
    assert M.vqa_score(pred, soft) == pytest.approx(np.mean([soft[i, pred[i]] for i in range(50)]))
    assert M.vqa_score([0, 1], [[1.0, 0.0], [0.3, 0.0]]) == 0.5
    with pytest.raises(InputError, match="only 2 classes"):
        M.vqa_score([2], [[1.0, 0.0]])
    with pytest.raises(InputError, match="1 entries but soft_targets has 2"):
        M.vqa_score([0], [[1.0, 0.0], [0.0, 1.0]])


def test_metrics_return_python_floats():
    assert type(M.accuracy([1], [1])) is float
    assert type(M.f1_binary([1, 0], [1, 1])) is float
    assert all(type(v) is float for v in M.retrieval_recall(np.eye(3), [0, 1, 2]).values())


@pytest.mark.parametrize("seed", range(4))
def test_repeated_caption_texts_are_one_answer_for_every_image_that_has_them(seed):
    # COCO and Flickr30K repeat some caption strings across images: a caption of that text is
    # right for each of those images, whichever of the equal embeddings ties ahead.
    rng = np.random.default_rng(seed)
    n_images = 10
    t2i = rng.permutation(np.array([i for i in range(n_images) for _ in range(rng.integers(1, 4))]))
    ids = rng.integers(0, len(t2i) // 2 + 1, len(t2i))  # many texts repeated, some within one image
    sim = tied_scores(rng, (n_images, len(t2i)))
    own = {i: {ids[j] for j in range(len(t2i)) if t2i[j] == i} for i in range(n_images)}
    ks = (1, 2, 5)
    want = {}
    for k in ks:
        hits = [first_hit_adversarial(sim[i], [ids[j] in own[i] for j in range(len(t2i))]) < k
                for i in range(n_images) if own[i]]
        want[f"image_to_text_R@{k}"] = sum(hits) / len(hits)
    for k in ks:
        hits = [first_hit_adversarial(sim[:, j], [ids[j] in own[i] for i in range(n_images)]) < k
                for j in range(len(t2i))]
        want[f"text_to_image_R@{k}"] = sum(hits) / len(hits)
    got = M.retrieval_recall(sim, t2i, ks, text_ids=ids)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    # Distinct texts: the same as giving none.
    assert M.retrieval_recall(sim, t2i, ks, text_ids=np.arange(len(t2i))) == M.retrieval_recall(sim, t2i, ks)
