"""The linear-probe protocol of the FLAVA paper (after CLIP): L-BFGS logistic regression on frozen
features, the regularisation strength chosen on a validation split, then refit on train +
validation and scored on test.

Exact definitions:

- Model: scikit-learn `LogisticRegression` (multinomial, L-BFGS, `max_iter=1000`, unregularised
  intercept) with C = 1/λ, i.e. it minimises  Σᵢ cross-entropyᵢ + (λ/2)·‖W‖²  (a sum, not a mean,
  over training examples, as CLIP's sweep does).
- Features are used as given, not standardised: the paper and CLIP do not, and the CLS features
  are already LayerNorm outputs of a common scale.
- Sweep: a coarse pass over λ = 10^-6, 10^-5, …, 10^6 (13 values, strongest regularisation first,
  each fit starting from the previous solution), then a fine pass at λ*·10^±0.25, ±0.5, ±0.75
  around the best coarse λ* (inside [10^-6, 10^6]), each started from λ*'s solution: 19 fits at
  most instead of CLIP's 96, with a final step of 10^0.25. The λ with the highest validation
  accuracy wins; ties go to the largest λ (the simplest model).
- Without a validation split, 20 % of every training class (rounded to nearest, at least one
  example left in train) is held out, chosen by `seed`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from ..errors import DataError, InputError
from .. import scores as metrics

MAX_ITER = 1000
COARSE_LAMBDAS = tuple(10.0 ** k for k in range(-6, 7))
FINE_STEPS = (-0.75, -0.5, -0.25, 0.25, 0.5, 0.75)
LAMBDA_RANGE = (1e-6, 1e6)
VAL_FRACTION = 0.2


@dataclass
class ProbeResult:
    accuracy: float
    """Top-1 accuracy on the test split of the refit model."""
    confusion: np.ndarray
    """[C, C] on test; row = true class, column = predicted, classes in `classes` order."""
    lam: float
    """The chosen λ (C = 1/λ)."""
    val_accuracy: float
    """Validation accuracy at the chosen λ (before the refit)."""
    sweep: list[tuple[float, float]]
    """(λ, validation accuracy) of every fit, in the order run."""
    classes: np.ndarray
    """The training labels, sorted: class index i of `confusion` is classes[i]."""
    predictions: np.ndarray
    """[N_test] predicted labels (values from `classes`)."""
    n_train: int
    n_val: int
    converged: bool
    """Whether the refit reached L-BFGS's tolerance within max_iter."""
    model: LogisticRegression = field(repr=False)
    """The refit classifier (trained on class indices into `classes`)."""

    @property
    def metrics(self) -> dict[str, float]:
        return {"top1": self.accuracy, "lambda": self.lam, "val_top1": self.val_accuracy}


def _features(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0:
        raise InputError(f"{name} must be a non-empty [examples, features] array; got shape {a.shape}")
    if not np.isfinite(a).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return a


def _split_pair(x, y, name: str, dim: int | None) -> tuple[np.ndarray, np.ndarray]:
    x, y = _features(x, f"{name}_x"), np.asarray(y)
    if y.ndim != 1 or len(y) != len(x):
        raise InputError(f"{name}_y must hold one label per row of {name}_x ({len(x)}); got shape {y.shape}")
    if dim is not None and x.shape[1] != dim:
        raise InputError(f"{name}_x has {x.shape[1]} features but train_x has {dim}")
    return x, y


def _indices(y: np.ndarray, classes: np.ndarray, name: str) -> np.ndarray:
    """Class indices of `y`; DataError for labels training never saw."""
    idx = np.searchsorted(classes, y).clip(0, len(classes) - 1)
    unseen = classes[idx] != y
    if unseen.any():
        labels = sorted({str(v) for v in y[unseen]})
        raise DataError(
            f"{name} has {int(unseen.sum())} examples with labels the training split lacks "
            f"({', '.join(labels[:5])}{', ...' if len(labels) > 5 else ''}); a linear probe can "
            f"only predict classes it was trained on"
        )
    return idx


def stratified_holdout(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out examples: round(fraction·n_c) of each class c (at most n_c − 1),
    chosen at random by `seed`."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        n = min(int(np.floor(fraction * len(members) + 0.5)), len(members) - 1)
        held[rng.permutation(members)[:n]] = True
    return held


def _fit(x: np.ndarray, y: np.ndarray, lam: float, init: LogisticRegression | None) -> LogisticRegression:
    clf = LogisticRegression(C=1.0 / lam, max_iter=MAX_ITER, warm_start=init is not None)
    if init is not None:
        clf.coef_, clf.intercept_ = init.coef_.copy(), init.intercept_.copy()
    with warnings.catch_warnings():
        # The weakly regularised end of the sweep often stops at max_iter on (near-)separable
        # data; that is expected there and the validation accuracy judges the result.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return clf.fit(x, y)


def linear_probe(
    train_x,
    train_y,
    test_x,
    test_y,
    val: tuple | None = None,
    seed: int = 0,
) -> ProbeResult:
    """Linear-probe accuracy of features: sweep λ on validation, refit on train + validation,
    score test. `val` is (val_x, val_y) or None to hold out 20 % of train (stratified, seeded).
    Labels may be any sortable values; test or validation labels absent from train raise
    DataError."""
    tx, ty = _split_pair(train_x, train_y, "train", None)
    dim = tx.shape[1]
    sx, sy = _split_pair(test_x, test_y, "test", dim)
    classes = np.unique(ty)
    if len(classes) < 2:
        raise DataError(f"a linear probe needs at least two classes in train; found only {classes[0].item()!r}")
    ti = np.searchsorted(classes, ty)
    si = _indices(sy, classes, "test")
    if val is None:
        held = stratified_holdout(ti, VAL_FRACTION, seed)
        if not held.any():
            raise DataError(f"too few training examples ({len(ti)}) to hold out a validation split; "
                            f"give one with val=(val_x, val_y)")
        fx, fi, vx, vi = tx[~held], ti[~held], tx[held], ti[held]
    else:
        if len(val) != 2:
            raise InputError("val must be a (val_x, val_y) pair")
        vx, vy = _split_pair(val[0], val[1], "val", dim)
        fx, fi, vi = tx, ti, _indices(vy, classes, "val")
    if len(np.unique(fi)) < 2:
        raise DataError("after holding out validation, train has fewer than two classes; give val explicitly")

    fits: dict[float, LogisticRegression] = {}
    sweep: list[tuple[float, float]] = []

    def run(lam: float, init: LogisticRegression | None) -> LogisticRegression:
        clf = _fit(fx, fi, lam, init)
        fits[lam] = clf
        sweep.append((lam, metrics.accuracy(clf.predict(vx), vi)))
        return clf

    # One BLAS thread: these products are small, and a multi-threaded BLAS measured 5-15x
    # slower on them here (2000x128: 0.5 s against 8.7 s; 10000x768: 4.7 s against 27 s).
    with threadpool_limits(limits=1, user_api="blas"):
        prev = None
        for lam in sorted(COARSE_LAMBDAS, reverse=True):
            prev = run(lam, prev)
        # Highest accuracy, then largest λ.
        best = max(sweep, key=lambda s: (s[1], s[0]))[0]
        for step in FINE_STEPS:
            lam = best * 10.0 ** step
            if LAMBDA_RANGE[0] <= lam <= LAMBDA_RANGE[1]:
                run(lam, fits[best])
        lam, val_accuracy = max(sweep, key=lambda s: (s[1], s[0]))

        final = _fit(np.concatenate([fx, vx]), np.concatenate([fi, vi]), lam, fits[lam])
        pred = final.predict(sx)
    return ProbeResult(
        accuracy=metrics.accuracy(pred, si),
        confusion=metrics.confusion_matrix(pred, si, len(classes)),
        lam=lam,
        val_accuracy=val_accuracy,
        sweep=sweep,
        classes=classes,
        predictions=classes[pred],
        n_train=len(fx),
        n_val=len(vx),
        converged=bool(np.max(final.n_iter_) < MAX_ITER),
        model=final,
    )
