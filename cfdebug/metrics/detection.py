"""Misclassification detection scores (AUROC, AUPR-Err, FPR at 95% TPR) and the set agreement of
paper A's Table 1 (METHODS.md "Agreement and detection").
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import CfdebugError
from ._checks import check_binary, is_real_numeric, to_numpy


def _detection_inputs(scores: Any, is_error: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``scores`` [N] float64 and ``is_error`` [N] bool with both classes present."""
    s_raw = to_numpy(scores, "scores")
    if s_raw.ndim != 1 or s_raw.shape[0] == 0 or not is_real_numeric(s_raw):
        raise CfdebugError(
            f"Expected `scores` to be a float array of shape [N] with N >= 1, but got shape "
            f"{tuple(s_raw.shape)} and dtype {s_raw.dtype}"
        )
    s = s_raw.astype(np.float64)
    if not np.all(np.isfinite(s)):
        raise CfdebugError("Expected `scores` to be finite, but got NaN or infinite values")
    n = s.shape[0]
    err = check_binary(is_error, "is_error", f"[N] with N={n}")
    if err.shape != (n,):
        raise CfdebugError(
            f"Expected `is_error` to be a boolean array of shape [N] with N={n}, but got shape "
            f"{tuple(err.shape)}"
        )
    n_err = int(err.sum())
    if n_err == 0 or n_err == n:
        raise CfdebugError(
            "Expected `is_error` to contain both classes (error detection needs at least one "
            f"error and one correct prediction), but got {n_err} errors and {n - n_err} correct"
        )
    return s, err


def error_detection_curve(scores: Any, is_error: Any) -> dict[str, np.ndarray]:
    """The ROC curve of error detection, same convention as :func:`error_detection_scores`.

    Returns ``{"fpr", "tpr", "thresholds"}`` float arrays: a correct prediction counts as
    positive, so ``tpr`` is the fraction of correct predictions kept and ``fpr`` the fraction
    of errors kept when predictions with ``score >= threshold`` are trusted.
    """
    s, err = _detection_inputs(scores, is_error)
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(~err, s)
    return {"fpr": fpr, "tpr": tpr, "thresholds": thresholds}


def error_detection_scores(scores: Any, is_error: Any) -> dict[str, float]:
    """AUROC and AUPR-Err of separating errors from correct predictions.

    Hendrycks & Gimpel's convention: a HIGHER ``score`` means the prediction is MORE likely
    correct (maximum softmax probability, agreement F1, ...).

    Args:
        scores: ``[N]`` finite float scores.
        is_error: ``[N]`` bool (or 0/1) array, True where the prediction is wrong; must contain
            at least one error and one correct prediction.

    Returns:
        ``{"auroc", "aupr_err"}`` as Python floats in ``[0, 1]``. ``auroc`` is the probability
        that a random correct prediction scores above a random error (ties count 1/2; 0.5 is
        chance). ``aupr_err`` is sklearn's average precision with errors as the positive class
        ranked by ``-score`` (chance level = the error rate).
    """
    s, err = _detection_inputs(scores, is_error)
    from sklearn.metrics import average_precision_score, roc_auc_score

    return {
        "auroc": float(roc_auc_score(~err, s)),
        "aupr_err": float(average_precision_score(err, -s)),
    }


# --------------------------------------------------------------------------------------------
# Set agreement (paper A, Table 1)
# --------------------------------------------------------------------------------------------


def set_agreement(local: Any, global_: Any) -> dict[str, np.ndarray]:
    """Recall, precision and F1 of local filter sets against global ones, row by row.

    ``recall = |L∩G| / |G|``, ``precision = |L∩G| / |L|``, ``F1 = 2·P·R / (P + R)``
    (equivalently ``2|L∩G| / (|L| + |G|)``), with the empty cases defined as:

    * ``|G| = 0``: recall, precision and F1 are all NaN ("unscorable": the class has no global
      filters to agree with), whatever ``L`` is.
    * ``|L| = 0`` and ``|G| > 0``: recall 0, precision 0, F1 0 (nothing of G was recovered).
    * ``|L| > 0``, ``|G| > 0``, ``|L∩G| = 0``: all three are 0.

    Args:
        local: ``[N, C]`` bool (or 0/1) local sets ``L`` (e.g. ``MC_x`` of the inferred class).
        global_: ``[N, C]`` bool (or 0/1) global sets ``G`` per row, or ``[C]`` shared by all
            rows (broadcast).

    Returns:
        ``{"recall", "precision", "f1"}``, each a float64 ``[N]`` array, values in ``[0, 1]``
        or NaN.
    """
    loc = check_binary(local, "local", "[N, C]")
    if loc.ndim != 2:
        raise CfdebugError(
            f"Expected `local` to be a boolean array of shape [N, C], but got shape "
            f"{tuple(loc.shape)}"
        )
    n, c = loc.shape
    desc = f"[N, C]={(n, c)} or [C]=({c},)"
    glo = check_binary(global_, "global_", desc)
    if glo.shape not in ((n, c), (c,)):
        raise CfdebugError(
            f"Expected `global_` to be a boolean array of shape {desc}, but got shape "
            f"{tuple(glo.shape)}"
        )
    glo = np.broadcast_to(glo, (n, c))
    inter = np.logical_and(loc, glo).sum(axis=1).astype(np.float64)  # [N]
    size_l = loc.sum(axis=1).astype(np.float64)  # [N]
    size_g = glo.sum(axis=1).astype(np.float64)  # [N]
    scorable = size_g > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(scorable, inter / size_g, np.nan)
        precision = np.where(scorable, np.where(size_l > 0, inter / size_l, 0.0), np.nan)
        f1 = np.where(scorable, 2.0 * inter / (size_l + size_g), np.nan)
    return {"recall": recall, "precision": precision, "f1": f1}
