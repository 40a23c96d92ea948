"""Calibration (METHODS.md "Calibration"): reliability bins, ECE, NLL, Brier, the streaming
:class:`CalibrationAccumulator` and temperature scaling.
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import Any

import numpy as np

from ..errors import CfdebugError
from ._checks import check_labels, check_logits, check_positive_int, check_probs, is_real_numeric, to_numpy


def _bin_edges(n_bins: int) -> np.ndarray:
    # b / n_bins is correctly rounded, so an edge equals the literal a user writes (0.6 for
    # 6/10); np.linspace(0, 1, 11)[6] is 0.6000000000000001 and would misplace such values.
    return np.arange(n_bins + 1, dtype=np.float64) / n_bins


def bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each confidence for bins ``(lo, hi]``; confidence 0 goes in the first bin."""
    inner = _bin_edges(n_bins)[1:-1]
    # side="left" counts inner edges strictly below conf, i.e. lo < conf <= hi.
    return np.searchsorted(inner, conf, side="left")


def _reliability(p: np.ndarray, y: np.ndarray, n_bins: int):
    conf = p.max(axis=1)  # [N]
    correct = (p.argmax(axis=1) == y).astype(np.float64)  # [N]
    idx = bin_index(conf, n_bins)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    return count, conf_sum, acc_sum


def reliability_bins(probs: Any, labels: Any, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per-bin accuracy and confidence for a reliability diagram.

    Args:
        probs: ``[N, K]`` float probabilities (rows sum to 1).
        labels: ``[N]`` integer true classes in ``0..K-1``.
        n_bins: number of equal-width bins over top-label confidence ``[0, 1]``.

    Bins are half-open on the left, ``(lo, hi]`` with ``lo = b/n_bins``, ``hi = (b+1)/n_bins``;
    a confidence of exactly 0 (impossible for a real softmax, whose maximum is >= 1/K) goes in
    the first bin, and a confidence exactly on an edge goes in the bin *below* that edge.

    Returns:
        dict of numpy arrays, each ``[n_bins]``: ``bin_lower`` and ``bin_upper`` (float64),
        ``accuracy`` and ``confidence`` (float64 in ``[0, 1]``, NaN for an empty bin) and
        ``count`` (int64, sums to N).
    """
    n_bins = check_positive_int(n_bins, "n_bins")
    p = check_probs(probs)
    y = check_labels(labels, "labels", n=p.shape[0], k=p.shape[1])
    return _bins_dict(*_reliability(p, y, n_bins), n_bins)


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """Expected calibration error (ECE) over top-label confidence.

    ``ECE = sum_b |B_b|/N * |acc_b - conf_b|`` with ``n_bins`` equal-width bins over ``[0, 1]``,
    bins ``(lo, hi]`` and confidence 0 in the first bin (see :func:`reliability_bins`).

    Args:
        probs: ``[N, K]`` float probabilities (rows sum to 1).
        labels: ``[N]`` integer true classes in ``0..K-1``.
        n_bins: positive integer, default 15 (METHODS.md).

    Returns:
        float in ``[0, 1]``.
    """
    n_bins = check_positive_int(n_bins, "n_bins")
    p = check_probs(probs)
    y = check_labels(labels, "labels", n=p.shape[0], k=p.shape[1])
    count, conf_sum, acc_sum = _reliability(p, y, n_bins)
    # |B_b|/N * |acc_b - conf_b| = |sum_acc_b - sum_conf_b| / N, and 0 for empty bins.
    return float(np.abs(acc_sum - conf_sum).sum() / p.shape[0])


def negative_log_likelihood(probs: Any, labels: Any, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood ``mean_i -log max(p_i[y_i], eps)``.

    Args:
        probs: ``[N, K]`` float probabilities (rows sum to 1).
        labels: ``[N]`` integer true classes in ``0..K-1``.
        eps: floor on the true-class probability so a zero gives ``-log(eps)`` instead of inf;
            a non-negative float (0 allows ``inf``).

    Returns:
        float in ``[0, -log(eps)]``.
    """
    eps = _check_eps(eps)
    p = check_probs(probs)
    y = check_labels(labels, "labels", n=p.shape[0], k=p.shape[1])
    return float(_nll_terms(p, y, eps).mean())


def brier_score(probs: Any, labels: Any) -> float:
    """Multi-class Brier score ``mean_i sum_k (p_ik - 1[y_i = k])^2``.

    Args:
        probs: ``[N, K]`` float probabilities (rows sum to 1).
        labels: ``[N]`` integer true classes in ``0..K-1``.

    Returns:
        float in ``[0, 2]``: 0 for a confident correct prediction on every sample, 2 when every
        sample puts probability 1 on a wrong class.
    """
    p = check_probs(probs)
    y = check_labels(labels, "labels", n=p.shape[0], k=p.shape[1])
    return float(_brier_terms(p, y).mean())


def _check_eps(eps: Any) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0 or eps >= 1:
        raise CfdebugError(f"Expected `eps` to be a float in [0, 1), but got {eps!r}")
    return eps


def _nll_terms(p: np.ndarray, y: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """``-log max(p_i[y_i], eps)`` per sample, ``[N]`` float64 (validated ``p``, ``y``)."""
    p_true = np.clip(p[np.arange(p.shape[0]), y], eps, 1.0)
    with np.errstate(divide="ignore"):
        return -np.log(p_true)


def _brier_terms(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``sum_k (p_ik - 1[y_i = k])^2`` per sample, ``[N]`` float64 (validated ``p``, ``y``)."""
    diff = p.copy()  # [N, K]
    diff[np.arange(p.shape[0]), y] -= 1.0
    return (diff**2).sum(axis=1)


def _bins_dict(count: np.ndarray, conf_sum: np.ndarray, acc_sum: np.ndarray, n_bins: int) -> dict[str, np.ndarray]:
    """Reliability bins (see :func:`reliability_bins`) from per-bin counts and sums."""
    edges = _bin_edges(n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy_ = np.where(count > 0, acc_sum / count, np.nan)
        confidence = np.where(count > 0, conf_sum / count, np.nan)
    return {
        "bin_lower": edges[:-1].copy(),
        "bin_upper": edges[1:].copy(),
        "accuracy": accuracy_,
        "confidence": confidence,
        "count": count.astype(np.int64),
    }


class CalibrationAccumulator:
    """Streaming accuracy, ECE, NLL, Brier and reliability bins (torchmetrics' stateful form).

    The state is the sufficient statistics of the functional metrics: the sample count, the
    number correct, the sums of the per-sample NLL and Brier terms, and per confidence bin the
    count, Σconfidence and Σcorrect. :meth:`compute` after any sequence of :meth:`update` /
    :meth:`merge` calls equals :func:`expected_calibration_error`, :func:`negative_log_likelihood`,
    :func:`brier_score` and :func:`reliability_bins` on the concatenated inputs, exactly for
    one update and up to float rounding of the sums otherwise. Inputs are validated as by
    those functions and never modified; memory does not grow with the number of samples.

    Example::

        acc = CalibrationAccumulator(n_bins=15)
        for probs, labels in chunks:        # probs [B, K] float, labels [B] int
            acc.update(probs, labels)
        acc.compute()["ece"]
    """

    def __init__(self, n_bins: int = 15, eps: float = 1e-12, *, keep_images: bool = False):
        self.n_bins = check_positive_int(n_bins, "n_bins")
        self.eps = _check_eps(eps)
        self.keep_images = bool(keep_images)
        self.reset()

    def reset(self) -> None:
        """Forget every sample."""
        self.n = 0
        self.correct = 0
        self.nll_sum = 0.0
        self.brier_sum = 0.0
        self.count = np.zeros(self.n_bins, dtype=np.int64)
        self.conf_sum = np.zeros(self.n_bins, dtype=np.float64)
        self.acc_sum = np.zeros(self.n_bins, dtype=np.float64)
        self._images: list[dict[str, np.ndarray]] = []

    def update(self, probs: Any, labels: Any) -> None:
        """Add ``probs`` ``[B, K]`` (rows sum to 1) with true classes ``labels`` ``[B]`` in ``0..K-1``."""
        p = check_probs(probs)
        y = check_labels(labels, "labels", n=p.shape[0], k=p.shape[1])
        count, conf_sum, acc_sum = _reliability(p, y, self.n_bins)
        self.n += p.shape[0]
        self.correct += int(np.count_nonzero(p.argmax(axis=1) == y))
        self.nll_sum += float(_nll_terms(p, y, self.eps).sum())
        self.brier_sum += float(_brier_terms(p, y).sum())
        self.count += count
        self.conf_sum += conf_sum
        self.acc_sum += acc_sum
        if self.keep_images:
            pred = p.argmax(axis=1)
            self._images.append({"prediction": pred, "correct": (pred == y).astype(np.float64), "confidence": p.max(axis=1).astype(np.float64),
                                 "nll": _nll_terms(p, y, self.eps).astype(np.float64), "brier": _brier_terms(p, y).astype(np.float64)})

    def images(self) -> dict[str, np.ndarray]:
        """Per-sample terms in update order (``keep_images=True``): ``prediction`` [N] int,
        ``correct`` [N] 0/1, ``confidence`` [N] (top-label), ``nll`` [N], ``brier`` [N] float64.
        Their means are :meth:`compute`'s accuracy, NLL and Brier (paired verdicts resample them)."""
        if not self.keep_images:
            raise CfdebugError("Expected a CalibrationAccumulator made with keep_images=True, but it keeps no per-sample terms")
        keys = ("prediction", "correct", "confidence", "nll", "brier")
        if not self._images:
            return {k: np.zeros(0) for k in keys}
        return {k: np.concatenate([chunk[k] for chunk in self._images]) for k in keys}

    def merge(self, other: "CalibrationAccumulator") -> "CalibrationAccumulator":
        """Add ``other``'s samples (same ``n_bins``) to this accumulator; return ``self``."""
        if not isinstance(other, CalibrationAccumulator) or other.n_bins != self.n_bins:
            raise CfdebugError(f"Expected a CalibrationAccumulator with n_bins={self.n_bins} to merge, but got {other!r}")
        self.n += other.n
        self.correct += other.correct
        self.nll_sum += other.nll_sum
        self.brier_sum += other.brier_sum
        self.count += other.count
        self.conf_sum += other.conf_sum
        self.acc_sum += other.acc_sum
        return self

    def compute(self) -> dict:
        """``{"accuracy", "ece", "nll", "brier"}`` (Python floats; Brier in ``[0, 2]``) and
        ``"bins"`` (:func:`reliability_bins`' dict) over every sample added so far."""
        if self.n == 0:
            raise CfdebugError("Expected at least one sample in the calibration accumulator, but got none (call update first)")
        return {
            "accuracy": self.correct / self.n,
            "ece": float(np.abs(self.acc_sum - self.conf_sum).sum() / self.n),
            "nll": self.nll_sum / self.n,
            "brier": self.brier_sum / self.n,
            "bins": _bins_dict(self.count, self.conf_sum, self.acc_sum, self.n_bins),
        }


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits ``[N, K]`` (any float dtype, kept), shifted by the row max."""
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _check_temperature(T: Any) -> float:
    if isinstance(T, bool) or not isinstance(T, numbers.Real) or not math.isfinite(T) or T <= 0:
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(T, torch.Tensor) and T.numel() == 1:
            return _check_temperature(float(T.item()))
        if isinstance(T, np.ndarray) and T.size == 1 and is_real_numeric(T):
            return _check_temperature(float(T.reshape(())))
        raise CfdebugError(f"Expected `T` to be a positive finite number, but got {T!r}")
    return float(T)


def apply_temperature(logits: Any, T: float) -> np.ndarray:
    """Temperature-scaled softmax ``softmax(logits / T)``.

    Args:
        logits: ``[N, K]`` finite float logits.
        T: positive finite temperature (Python/numpy scalar or a one-element tensor);
            ``T > 1`` softens, ``T < 1`` sharpens.

    Returns:
        ``[N, K]`` numpy probabilities, rows summing to 1; float32 when ``logits`` is float32,
        float64 otherwise.
    """
    T = _check_temperature(T)
    raw = to_numpy(logits, "logits")
    z = check_logits(raw)
    probs = softmax(z / T)
    return probs.astype(np.float32) if raw.dtype == np.float32 else probs


def fit_temperature(
    logits: Any,
    labels: Any,
    *,
    bounds: tuple[float, float] = (1e-2, 1e2),
    tol: float = 1e-6,
) -> float:
    """Fit one temperature ``T > 0`` minimising the NLL of ``softmax(logits / T)``.

    Fit on a *validation* split (never the test set). The mean NLL is convex in ``1/T``, hence
    unimodal in ``log T``, so a bounded Brent search over ``log T`` (scipy
    ``minimize_scalar(method="bounded")``) finds the minimum; it is deterministic (no RNG,
    identical result for identical input). When the minimum lies outside ``bounds`` (e.g.
    perfectly separated logits, whose NLL keeps falling as ``T -> 0``) the result is at the
    nearest bound.

    Args:
        logits: ``[N, K]`` finite float logits of the validation set.
        labels: ``[N]`` integer true classes in ``0..K-1``.
        bounds: ``(T_min, T_max)`` search interval, ``0 < T_min < T_max``.
        tol: absolute tolerance on ``log T`` (so roughly the relative tolerance on ``T``).

    Returns:
        The fitted temperature, a positive Python float.
    """
    try:
        t_lo, t_hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise CfdebugError(
            f"Expected `bounds` to be a pair (T_min, T_max) with 0 < T_min < T_max, but got "
            f"{bounds!r}"
        ) from None
    if not (0 < t_lo < t_hi and math.isfinite(t_hi)):
        raise CfdebugError(
            f"Expected `bounds` to be a pair (T_min, T_max) with 0 < T_min < T_max, but got "
            f"{bounds!r}"
        )
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol > 0:
        raise CfdebugError(f"Expected `tol` to be a positive float, but got {tol!r}")
    z = check_logits(logits)
    y = check_labels(labels, "labels", n=z.shape[0], k=z.shape[1])

    from scipy.optimize import minimize_scalar
    from scipy.special import logsumexp

    z_true = z[np.arange(z.shape[0]), y]  # [N]

    def nll(log_t: float) -> float:
        inv_t = math.exp(-log_t)
        return float(np.mean(logsumexp(z * inv_t, axis=1) - z_true * inv_t))

    res = minimize_scalar(
        nll,
        bounds=(math.log(t_lo), math.log(t_hi)),
        method="bounded",
        options={"xatol": float(tol), "maxiter": 500},
    )
    # Brent never evaluates the interval's ends; when the optimum is at a bound, return it.
    candidates = [math.log(t_lo), float(res.x), math.log(t_hi)]
    best = min(candidates, key=nll)  # first minimum on ties: deterministic
    return float(min(max(math.exp(best), t_lo), t_hi))
