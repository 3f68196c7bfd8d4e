"""Task metrics, shared by the evaluation suite, fine-tuning and the CLI: array-likes (numpy, lists,
CPU tensors) in, Python floats out.

Every ranking metric here breaks ties *against* the prediction: a wrong candidate whose score
equals the right one's is ranked ahead of it. Exact float ties are rare for a trained model but
common for a collapsed or untrained one (constant outputs); the pessimistic rule makes such a
model score 0 instead of whatever an argsort's index order happens to favour.

Inputs are validated; bad shapes, empty inputs, non-finite scores or out-of-range labels raise
`InputError`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import InputError


# --------------------------------------------------------------------------- input checks


def _vector(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise InputError(f"{name} must be one-dimensional; got shape {a.shape}")
    if a.size == 0:
        raise InputError(f"{name} is empty: a metric needs at least one example")
    return a


def _scores(x, name: str, ndim: int) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != ndim:
        raise InputError(f"{name} must have {ndim} dimension(s); got shape {a.shape}")
    if a.size == 0:
        raise InputError(f"{name} is empty: a metric needs at least one example")
    if not np.isfinite(a).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return a


def _labels(x, name: str, num_classes: int | None = None) -> np.ndarray:
    a = _vector(x, name)
    integral = a.dtype == bool or np.issubdtype(a.dtype, np.integer) or (
        np.issubdtype(a.dtype, np.floating) and bool(np.all(a == np.round(a))))
    if not integral:
        raise InputError(f"{name} must be integer class indices; got {a.dtype} values")
    a = a.astype(np.int64)
    if a.min() < 0:
        raise InputError(f"{name} holds a negative class index ({a.min()})")
    if num_classes is not None and a.max() >= num_classes:
        raise InputError(f"{name} holds class index {a.max()} but there are only {num_classes} classes")
    return a


def _same_length(a: np.ndarray, b: np.ndarray, na: str, nb: str) -> None:
    if len(a) != len(b):
        raise InputError(f"{na} has {len(a)} entries but {nb} has {len(b)}")


def _binary(x, name: str) -> np.ndarray:
    a = _labels(x, name)
    if a.max() > 1:
        raise InputError(f"{name} must be binary (0 or 1); found {a.max()}")
    return a


# --------------------------------------------------------------------------- retrieval


def retrieval_ranks(sim, text_to_image, text_ids=None) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks of the right answer for every query, ties broken against the query.

    `sim` is [n_images, n_texts]; `text_to_image[j]` is the index of caption j's image;
    `text_ids[j]` (optional) names caption j's text, so that captions with the same text (COCO
    and Flickr30K repeat some) are one answer: a caption is right for every image that has that
    text among its captions. Without it every caption is a text of its own.

    - text→image, caption j: with s = the highest similarity of j to an image that has its text,
      the number of images without its text whose similarity to j is >= s.
    - image→text, image i: with s = the highest similarity of i to a caption with one of its
      texts, the number of captions with none of its texts whose similarity to i is >= s (i's
      own texts never count against it, tied or not). Images without a caption get rank -1 (not a
      query).

    Returns (image_to_text [n_images], text_to_image [n_texts]) int arrays.
    """
    s = _scores(sim, "sim", 2)
    n_images, n_texts = s.shape
    t2i = _labels(text_to_image, "text_to_image", n_images)
    if len(t2i) != n_texts:
        raise InputError(f"sim has {n_texts} text columns but text_to_image maps {len(t2i)} captions")
    ids = np.arange(n_texts) if text_ids is None else np.asarray(text_ids)
    if ids.shape != (n_texts,):
        raise InputError(f"text_ids has {ids.size} entries but sim has {n_texts} text columns")
    # The (image, caption) pairs that are right: every image having a text, with every caption of
    # that text. Without repeated texts these are just (t2i[j], j). Never an [n_images, n_texts]
    # mask: COCO's 5k x 25k matrix is large enough as it is.
    _, text = np.unique(ids, return_inverse=True)
    order = np.argsort(text, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(text[order])) + 1)  # caption indices of each text
    alone = np.concatenate([g for g in groups if len(g) == 1] + [np.zeros(0, np.int64)])
    shared = [(np.unique(t2i[g]), g) for g in groups if len(g) > 1]
    pi = np.concatenate([t2i[alone]] + [np.repeat(o, len(g)) for o, g in shared])
    pj = np.concatenate([alone] + [np.tile(g, len(o)) for o, g in shared])
    ps = s[pi, pj]

    right = np.full(n_texts, -np.inf)
    np.maximum.at(right, pj, ps)
    t2i_rank = (s >= right[None, :]).sum(axis=0) - np.bincount(pj, weights=ps >= right[pj], minlength=n_texts)

    best = np.full(n_images, -np.inf)
    np.maximum.at(best, pi, ps)
    own_at_best = np.bincount(pi, weights=ps >= best[pi], minlength=n_images)
    i2t_rank = (s >= best[:, None]).sum(axis=1) - own_at_best
    i2t_rank = i2t_rank.astype(np.int64)
    i2t_rank[np.isneginf(best)] = -1  # images without a caption
    return i2t_rank, t2i_rank.astype(np.int64)


def retrieval_recall(sim, text_to_image, ks: Sequence[int] = (1, 5, 10), text_ids=None) -> dict[str, float]:
    """Zero-shot retrieval recall at each k, as fractions in [0, 1].

    `sim` is [n_images, n_texts] (cosine similarities); `text_to_image[j]` is the image index of
    caption j (several captions per image, as in COCO and Flickr30K).

    - "image_to_text_R@k": share of images with at least one of their own captions among the
      top k texts. Averaged over images that have a caption; images without one are only
      candidates for text→image.
    - "text_to_image_R@k": share of captions whose image is among the top k images.
    - "mean_recall": the mean of all the above (ALBEF's "r_mean", as a fraction).

    Ties and repeated texts (`text_ids`): see `retrieval_ranks` — a tied wrong candidate ranks
    ahead of a right one, so a query hits at k iff its rank < k. k larger than the candidate count is allowed (always a hit).
    """
    ks = list(ks)
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise InputError(f"ks must be positive integers; got {ks}")
    i2t, t2i = retrieval_ranks(sim, text_to_image, text_ids)
    i2t = i2t[i2t >= 0]
    if i2t.size == 0:
        raise InputError("no image has a caption: text_to_image is empty")
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = float(np.mean(i2t < k))
    for k in ks:
        out[f"text_to_image_R@{k}"] = float(np.mean(t2i < k))
    out["mean_recall"] = float(np.mean(list(out.values())))
    return out


# --------------------------------------------------------------------------- classification


def topk_accuracy(scores, labels, k: int) -> float:
    """Share of rows whose true class is among the k highest scores.

    `scores` is [N, C], `labels` [N] in [0, C). Ties count against the row: it is a hit iff
    fewer than k *other* classes score >= the true class. k is clamped to C (so top-5 over 3
    classes is top-3, i.e. always 1.0).
    """
    s = _scores(scores, "scores", 2)
    y = _labels(labels, "labels", s.shape[1])
    _same_length(s, y, "scores", "labels")
    if int(k) != k or k < 1:
        raise InputError(f"k must be a positive integer; got {k}")
    k = min(int(k), s.shape[1])
    right = s[np.arange(len(y)), y]
    rank = (s >= right[:, None]).sum(axis=1) - 1
    return float(np.mean(rank < k))


def accuracy(predictions, labels) -> float:
    """Share of predictions equal to the label."""
    p, y = _vector(predictions, "predictions"), _vector(labels, "labels")
    _same_length(p, y, "predictions", "labels")
    return float(np.mean(p == y))


def confusion_matrix(predictions, labels, num_classes: int | None = None) -> np.ndarray:
    """[C, C] int64 counts; row = true class, column = predicted class (scikit-learn's layout).

    C is `num_classes`, or 1 + the largest index seen in either input.
    """
    p, y = _labels(predictions, "predictions", num_classes), _labels(labels, "labels", num_classes)
    _same_length(p, y, "predictions", "labels")
    c = num_classes if num_classes is not None else int(max(p.max(), y.max())) + 1
    return np.bincount(y * c + p, minlength=c * c).reshape(c, c).astype(np.int64)


def f1_binary(predictions, labels) -> float:
    """F1 of the positive class 1: 2·TP / (2·TP + FP + FN).

    When there is no positive anywhere (no positive label and no positive prediction) the ratio
    is 0/0; this returns 0.0, as scikit-learn's `f1_score` does by default.
    """
    p, y = _binary(predictions, "predictions"), _binary(labels, "labels")
    _same_length(p, y, "predictions", "labels")
    tp = int(np.sum((p == 1) & (y == 1)))
    wrong = int(np.sum(p != y))  # FP + FN
    denom = 2 * tp + wrong
    return 2 * tp / denom if denom else 0.0


def matthews_corrcoef(predictions, labels) -> float:
    """Matthews correlation (multiclass form, R_K; the binary φ coefficient for two classes).

    With confusion matrix M, t = row sums, p = column sums, c = trace, s = total:
    (c·s − t·p) / sqrt((s² − p·p)(s² − t·t)). When either factor under the root is 0 (all labels
    or all predictions one class) the value is 0.0, as in scikit-learn.
    """
    m = confusion_matrix(predictions, labels).astype(np.float64)
    t, p = m.sum(axis=1), m.sum(axis=0)
    c, s = np.trace(m), m.sum()
    cov_yp = c * s - t @ p
    cov_pp = s * s - p @ p
    cov_yy = s * s - t @ t
    if cov_pp == 0 or cov_yy == 0:
        return 0.0
    return float(cov_yp / np.sqrt(cov_pp * cov_yy))


def _pair(x, y, nx: str, ny: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = _scores(x, nx, 1), _scores(y, ny, 1)
    _same_length(a, b, nx, ny)
    if len(a) < 2:
        raise InputError("a correlation needs at least two examples")
    return a, b


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    # A constant input has no defined correlation; score it as uninformative. (Tested on the raw
    # values: a constant minus its float mean need not be exactly zero.)
    if a.min() == a.max() or b.min() == b.max():
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    return float(np.clip((a @ b) / np.sqrt((a @ a) * (b @ b)), -1.0, 1.0))


def pearson(predictions, targets) -> float:
    """Pearson's r. 0.0 when either input is constant (r is 0/0 there; scipy returns NaN)."""
    return _corr(*_pair(predictions, targets, "predictions", "targets"))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values all get the mean of the ranks they span (scipy's 'average')."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    # Start index of each run of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(x)]
    run_rank = (starts + ends + 1) / 2.0  # mean of starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def spearman(predictions, targets) -> float:
    """Spearman's ρ: Pearson's r of the average ranks (ties share their mean rank).
    0.0 when either input is constant."""
    a, b = _pair(predictions, targets, "predictions", "targets")
    return _corr(average_ranks(a), average_ranks(b))


def mean_absolute_error(predictions, targets) -> float:
    """The mean of |prediction - target|, in the targets' units (lower is better): what a correlation
    leaves out, as a model that is off by a constant or a scale still correlates perfectly."""
    a, b = _scores(predictions, "predictions", 1), _scores(targets, "targets", 1)
    _same_length(a, b, "predictions", "targets")
    return float(np.mean(np.abs(a - b)))


def auroc(scores, labels) -> float:
    """Area under the ROC curve for the positive class 1: the probability that a random positive
    scores above a random negative, a tied pair counting 1/2 (Mann–Whitney U / (n₊·n₋); equal to
    the trapezoidal ROC area scikit-learn computes).

    Undefined with one class only: raises `InputError`.
    """
    s = _scores(scores, "scores", 1)
    y = _binary(labels, "labels")
    _same_length(s, y, "scores", "labels")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        only = "1 (positive)" if n_neg == 0 else "0 (negative)"
        raise InputError(f"AUROC needs both classes but every label is {only}")
    ranks = average_ranks(s)
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def vqa_score(pred_answer_idx, soft_targets) -> float:
    """VQA accuracy: the mean over questions of the predicted answer's soft score.

    `soft_targets` [N, A] holds each answer's VQA accuracy for the question, precomputed from
    the 10 human answers (min(#humans who gave it / 3, 1), or its average over the 10
    leave-one-out subsets as the official evaluator does); answers outside the answer
    vocabulary are simply not columns, so a question whose humans agree on none scores 0.
    """
    t = _scores(soft_targets, "soft_targets", 2)
    p = _labels(pred_answer_idx, "pred_answer_idx", t.shape[1])
    _same_length(p, t, "pred_answer_idx", "soft_targets")
    return float(np.mean(t[np.arange(len(p)), p]))
