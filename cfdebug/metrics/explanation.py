"""Explanation metrics of paper B (METHODS.md "Explanation metrics"): fidelity, Average Drop /
Increase, sufficiency, from the probabilities on ``x`` and on ``T(x)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import CfdebugError
from ._checks import check_probs


def _explanation_inputs(probs_full: Any, probs_masked: Any):
    """Return ``(Y_c, O_c, argmax_full, argmax_masked)``, each ``[N]``."""
    y_full = check_probs(probs_full, "probs_full")
    o_masked = check_probs(probs_masked, "probs_masked")
    if o_masked.shape != y_full.shape:
        raise CfdebugError(
            f"Expected `probs_masked` to have the same shape as `probs_full` "
            f"{tuple(y_full.shape)}, but got {tuple(o_masked.shape)}"
        )
    rows = np.arange(y_full.shape[0])
    c = y_full.argmax(axis=1)  # predicted class on x
    return y_full[rows, c], o_masked[rows, c], c, o_masked.argmax(axis=1)


def fidelity(probs_full: Any, probs_masked: Any) -> float:
    """Fraction of samples whose predicted class is unchanged by the explanation mask.

    ``mean_i 1[argmax O_i = argmax Y_i]`` with ``Y = probs_full`` (softmax on x) and
    ``O = probs_masked`` (softmax on T(x)), both ``[N, K]`` float probabilities.

    Returns:
        float in ``[0, 1]`` (higher is better).
    """
    _, _, c, c_masked = _explanation_inputs(probs_full, probs_masked)
    return float(np.mean(c_masked == c))


def average_drop(probs_full: Any, probs_masked: Any) -> float:
    """Average Drop ``mean_i max(0, Y_c - O_c) / Y_c`` as a *fraction* (not percent).

    ``c = argmax Y_i`` is the class predicted on x; ``Y = probs_full`` (softmax on x) and
    ``O = probs_masked`` (softmax on T(x)), both ``[N, K]``. ``Y_c >= 1/K > 0`` so the ratio is
    always defined.

    Returns:
        float in ``[0, 1]`` (lower is better; multiply by 100 for the papers' percent).
    """
    y_c, o_c, _, _ = _explanation_inputs(probs_full, probs_masked)
    return float(np.mean(np.maximum(0.0, y_c - o_c) / y_c))


def average_increase(probs_full: Any, probs_masked: Any) -> float:
    """Average Increase ``mean_i 1[Y_c < O_c]`` as a *fraction* (not percent).

    Strict inequality: an unchanged confidence does not count as an increase. Arguments as in
    :func:`average_drop`.

    Returns:
        float in ``[0, 1]`` (higher is better).
    """
    y_c, o_c, _, _ = _explanation_inputs(probs_full, probs_masked)
    return float(np.mean(y_c < o_c))


def sufficiency(probs_full: Any, probs_masked: Any) -> float:
    """Sufficiency ``mean_i (Y_c - O_c)``, the mean confidence lost on the predicted class.

    Arguments as in :func:`average_drop`.

    Returns:
        float in ``[-1, 1]`` (lower is better; negative when masking raises confidence).
    """
    y_c, o_c, _, _ = _explanation_inputs(probs_full, probs_masked)
    return float(np.mean(y_c - o_c))


def explanation_metrics(probs_full: Any, probs_masked: Any) -> dict[str, float]:
    """All explanation metrics at once.

    Args:
        probs_full: ``[N, K]`` softmax of the black box on x.
        probs_masked: ``[N, K]`` softmax of the black box on T(x).

    Returns:
        ``{"fidelity", "avg_drop", "avg_inc", "sufficiency"}`` as Python floats; ``avg_drop`` and
        ``avg_inc`` are fractions in ``[0, 1]`` (see the single-metric functions).
    """
    y_c, o_c, c, c_masked = _explanation_inputs(probs_full, probs_masked)
    return {
        "fidelity": float(np.mean(c_masked == c)),
        "avg_drop": float(np.mean(np.maximum(0.0, y_c - o_c) / y_c)),
        "avg_inc": float(np.mean(y_c < o_c)),
        "sufficiency": float(np.mean(y_c - o_c)),
    }
