"""Per-class metrics from predictions and labels: the confusion matrix, per-class recall,
accuracy, and how the predictions of two models differ (:func:`prediction_churn`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._checks import check_labels, check_positive_int


def _check_pred_labels(pred: Any, labels: Any, n_classes: int | None, allow_empty: bool):
    y = check_labels(labels, "labels", k=n_classes, allow_empty=allow_empty)
    p = check_labels(pred, "pred", n=y.shape[0], k=n_classes, allow_empty=allow_empty)
    return p, y


def confusion_matrix(pred: Any, labels: Any, n_classes: int) -> np.ndarray:
    """Confusion matrix, rows = true class, columns = predicted class.

    Args:
        pred: ``[N]`` integer predicted classes in ``0..K-1``.
        labels: ``[N]`` integer true classes in ``0..K-1`` (N may be 0).
        n_classes: K, a positive integer.

    Returns:
        ``[K, K]`` int64 counts; ``M[i, j]`` = number of samples of class i predicted as j.
    """
    k = check_positive_int(n_classes, "n_classes")
    p, y = _check_pred_labels(pred, labels, k, allow_empty=True)
    return np.bincount(y * k + p, minlength=k * k).reshape(k, k).astype(np.int64)


def per_class_recall(pred: Any, labels: Any, n_classes: int) -> np.ndarray:
    """Recall (per-class accuracy) ``M[i, i] / sum_j M[i, j]`` for every class.

    Args:
        pred: ``[N]`` integer predicted classes in ``0..K-1``.
        labels: ``[N]`` integer true classes in ``0..K-1`` (N may be 0).
        n_classes: K, a positive integer.

    Returns:
        ``[K]`` float64 in ``[0, 1]``, NaN for a class with no samples.
    """
    m = confusion_matrix(pred, labels, n_classes)
    support = m.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(m) / support, np.nan)


def accuracy(pred: Any, labels: Any) -> float:
    """Fraction of correct predictions ``mean_i 1[pred_i = labels_i]``.

    Args:
        pred: ``[N]`` non-negative integer predicted classes.
        labels: ``[N]`` non-negative integer true classes, N >= 1.

    Returns:
        float in ``[0, 1]``.
    """
    p, y = _check_pred_labels(pred, labels, None, allow_empty=False)
    return float(np.mean(p == y))


def prediction_churn(before: Any, after: Any, labels: Any, n_classes: int) -> dict[str, np.ndarray]:
    """How the predictions on one split changed between two models (paper A's Tables 2–3 churn).

    Args:
        before: ``[N]`` integer predictions of the first model (the base, or the control).
        after: ``[N]`` integer predictions of the second (the treated model) on the same images.
        labels: ``[N]`` integer true classes in ``0..K-1``.
        n_classes: K, a positive integer.

    Returns:
        ``{"confusion_delta": [K, K] int64`` (``confusion_matrix(after) − confusion_matrix(before)``;
        rows true class, columns predicted), ``"fixed": [F] int64`` (indices wrong before, right
        after) and ``"broken": [B] int64`` (right before, wrong after)``}``, ascending.
    """
    k = check_positive_int(n_classes, "n_classes")
    y = check_labels(labels, "labels", k=k, allow_empty=True)
    b = check_labels(before, "before", n=y.shape[0], k=k, allow_empty=True)
    a = check_labels(after, "after", n=y.shape[0], k=k, allow_empty=True)
    return {
        "confusion_delta": confusion_matrix(a, y, k) - confusion_matrix(b, y, k),
        "fixed": np.flatnonzero((b != y) & (a == y)),
        "broken": np.flatnonzero((b == y) & (a != y)),
    }
