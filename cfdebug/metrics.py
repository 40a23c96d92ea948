"""Calibration, explanation, detection, set-agreement and per-class metrics.

Pure functions: no I/O, no global state, inputs are never modified. The one stateful piece,
:class:`CalibrationAccumulator`, pools the calibration metrics over chunks (torchmetrics'
functional + stateful pattern); its result equals the functions' on the concatenation. Every function accepts
``torch.Tensor`` (any device; detached and copied to the CPU) or ``numpy`` arrays (or nested
lists), computes in float64 numpy and returns Python floats, numpy arrays or dicts of them.
Arguments are validated and a user mistake raises :class:`cfdebug.errors.CfdebugError` with a
message in torchmetrics' form ("Expected `n_bins` to be a positive integer, but got 0").

Conventions shared by the functions below:

* ``probs`` is ``[N, K]`` float with entries in ``[0, 1]`` and rows summing to 1 (within
  ``1e-3``, so float16/float32 softmax outputs pass); ``N >= 1``.
* ``labels`` / ``pred`` are ``[N]`` integer class indices in ``0..K-1``.
* The predicted class of a row of ``probs`` is its ``argmax`` (first index on ties) and its
  confidence is the row maximum ("top-label confidence").

Definitions follow ``METHODS.md`` (sections "Calibration", "Explanation metrics" and
"Agreement and detection").
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import Any

import numpy as np

from cfdebug.errors import CfdebugError

__all__ = [
    "accuracy",
    "apply_temperature",
    "average_drop",
    "average_increase",
    "brier_score",
    "CalibrationAccumulator",
    "confusion_matrix",
    "error_detection_curve",
    "error_detection_scores",
    "expected_calibration_error",
    "explanation_metrics",
    "fidelity",
    "fit_temperature",
    "negative_log_likelihood",
    "per_class_recall",
    "reliability_bins",
    "set_agreement",
    "softmax",
    "sufficiency",
]

# Rows of a float16/float32 softmax sum to 1 only up to rounding; this is generous enough for
# those and still catches logits or unnormalised scores passed by mistake.
_ROW_SUM_ATOL = 1e-3


# --------------------------------------------------------------------------------------------
# Conversion and validation
# --------------------------------------------------------------------------------------------


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Return ``x`` as a numpy array without modifying it (may share memory: never write)."""
    torch = sys.modules.get("torch")  # a tensor can only exist if torch is already imported
    if torch is not None and isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):  # numpy has no bfloat16
            t = t.float()
        return t.numpy()
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (str, bytes, dict, set)) or x is None:
        raise CfdebugError(
            f"Expected `{name}` to be a torch.Tensor or numpy array, but got {type(x).__name__}"
        )
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise CfdebugError(
            f"Expected `{name}` to be a torch.Tensor or numpy array, but got {type(x).__name__} "
            f"that numpy cannot convert ({exc})"
        ) from None
    if arr.dtype == object:
        raise CfdebugError(
            f"Expected `{name}` to be a torch.Tensor or numpy array, but got {type(x).__name__} "
            "of ragged or non-numeric values"
        )
    return arr


def _is_real_numeric(arr: np.ndarray) -> bool:
    return arr.dtype != np.bool_ and (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    )


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise CfdebugError(f"Expected `{name}` to be a positive integer, but got {value!r}")
    return int(value)


def _check_probs(x: Any, name: str = "probs") -> np.ndarray:
    """Validate ``[N, K]`` probabilities and return them as a float64 copy."""
    arr = _to_numpy(x, name)
    expected = f"Expected `{name}` to have shape [N, K] with rows summing to 1"
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise CfdebugError(f"{expected}, but got shape {tuple(arr.shape)}")
    if not _is_real_numeric(arr):
        raise CfdebugError(f"{expected}, but got dtype {arr.dtype}")
    p = arr.astype(np.float64)  # copy: callers' arrays are never touched
    if not np.all(np.isfinite(p)):
        raise CfdebugError(f"{expected}, but got NaN or infinite values")
    lo, hi = float(p.min()), float(p.max())
    if lo < 0.0 or hi > 1.0 + _ROW_SUM_ATOL:
        raise CfdebugError(
            f"Expected `{name}` to hold probabilities in [0, 1], but got values in "
            f"[{_fmt(lo)}, {_fmt(hi)}] (pass softmax outputs, not logits)"
        )
    sums = p.sum(axis=1)
    if np.any(np.abs(sums - 1.0) > _ROW_SUM_ATOL):
        raise CfdebugError(
            f"{expected}, but got row sums in [{_fmt(float(sums.min()))}, "
            f"{_fmt(float(sums.max()))}] (pass softmax outputs, not logits)"
        )
    return p


def _check_logits(x: Any, name: str = "logits") -> np.ndarray:
    """Validate ``[N, K]`` finite logits and return them as a float64 copy."""
    arr = _to_numpy(x, name)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise CfdebugError(
            f"Expected `{name}` to have shape [N, K] with N, K >= 1, but got shape "
            f"{tuple(arr.shape)}"
        )
    if not _is_real_numeric(arr):
        raise CfdebugError(f"Expected `{name}` to be a float array, but got dtype {arr.dtype}")
    z = arr.astype(np.float64)
    if not np.all(np.isfinite(z)):
        raise CfdebugError(f"Expected `{name}` to be finite, but got NaN or infinite values")
    return z


def _check_labels(
    x: Any,
    name: str,
    n: int | None = None,
    k: int | None = None,
    allow_empty: bool = False,
) -> np.ndarray:
    """Validate ``[N]`` integer class indices (in ``0..k-1`` when ``k`` is given)."""
    arr = _to_numpy(x, name)
    n_part = "N" if n is None else f"N={n}"
    if k is not None:
        expected = f"Expected `{name}` to have {n_part} entries in 0..K-1"
    else:
        expected = f"Expected `{name}` to have {n_part} integer entries"
    if arr.ndim != 1:
        raise CfdebugError(f"{expected}, but got shape {tuple(arr.shape)}")
    if n is not None and arr.shape[0] != n:
        raise CfdebugError(f"{expected}, but got {arr.shape[0]} entries")
    if arr.shape[0] == 0:
        if not allow_empty:
            raise CfdebugError(f"{expected}, but got 0 entries")
        return np.zeros(0, dtype=np.int64)  # `[]` converts to float64; emptiness has no dtype
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise CfdebugError(
            f"{expected}, but got dtype {arr.dtype} (class indices must be integers)"
        )
    out = arr.astype(np.int64)
    if k is not None and out.size and (out.min() < 0 or out.max() >= k):
        raise CfdebugError(
            f"{expected}, but got values in [{int(out.min())}, {int(out.max())}] (K={k})"
        )
    if k is None and out.size and out.min() < 0:
        raise CfdebugError(f"{expected}, but got a negative value {int(out.min())}")
    return out


def _check_binary(x: Any, name: str, shape_desc: str) -> np.ndarray:
    """Validate a boolean (or 0/1) array and return it as bool; shape is checked by callers."""
    arr = _to_numpy(x, name)
    if arr.dtype == np.bool_:
        return arr.astype(bool)  # copy
    if not _is_real_numeric(arr):
        raise CfdebugError(
            f"Expected `{name}` to be a boolean array of shape {shape_desc}, but got dtype "
            f"{arr.dtype}"
        )
    if arr.size and not np.all((arr == 0) | (arr == 1)):
        raise CfdebugError(
            f"Expected `{name}` to be a boolean array of shape {shape_desc}, but got values "
            "other than 0 and 1"
        )
    return arr.astype(bool)


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


def _bin_edges(n_bins: int) -> np.ndarray:
    # b / n_bins is correctly rounded, so an edge equals the literal a user writes (0.6 for
    # 6/10); np.linspace(0, 1, 11)[6] is 0.6000000000000001 and would misplace such values.
    return np.arange(n_bins + 1, dtype=np.float64) / n_bins


def _bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each confidence for bins ``(lo, hi]``; confidence 0 goes in the first bin."""
    inner = _bin_edges(n_bins)[1:-1]
    # side="left" counts inner edges strictly below conf, i.e. lo < conf <= hi.
    return np.searchsorted(inner, conf, side="left")


def _reliability(p: np.ndarray, y: np.ndarray, n_bins: int):
    conf = p.max(axis=1)  # [N]
    correct = (p.argmax(axis=1) == y).astype(np.float64)  # [N]
    idx = _bin_index(conf, n_bins)
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
    n_bins = _check_positive_int(n_bins, "n_bins")
    p = _check_probs(probs)
    y = _check_labels(labels, "labels", n=p.shape[0], k=p.shape[1])
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
    n_bins = _check_positive_int(n_bins, "n_bins")
    p = _check_probs(probs)
    y = _check_labels(labels, "labels", n=p.shape[0], k=p.shape[1])
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
    p = _check_probs(probs)
    y = _check_labels(labels, "labels", n=p.shape[0], k=p.shape[1])
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
    p = _check_probs(probs)
    y = _check_labels(labels, "labels", n=p.shape[0], k=p.shape[1])
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
        self.n_bins = _check_positive_int(n_bins, "n_bins")
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
        p = _check_probs(probs)
        y = _check_labels(labels, "labels", n=p.shape[0], k=p.shape[1])
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
        if isinstance(T, np.ndarray) and T.size == 1 and _is_real_numeric(T):
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
    raw = _to_numpy(logits, "logits")
    z = _check_logits(raw)
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
    z = _check_logits(logits)
    y = _check_labels(labels, "labels", n=z.shape[0], k=z.shape[1])

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


# --------------------------------------------------------------------------------------------
# Explanation metrics (paper B)
# --------------------------------------------------------------------------------------------


def _explanation_inputs(probs_full: Any, probs_masked: Any):
    """Return ``(Y_c, O_c, argmax_full, argmax_masked)``, each ``[N]``."""
    y_full = _check_probs(probs_full, "probs_full")
    o_masked = _check_probs(probs_masked, "probs_masked")
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


# --------------------------------------------------------------------------------------------
# Misclassification detection
# --------------------------------------------------------------------------------------------


def _detection_inputs(scores: Any, is_error: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``scores`` [N] float64 and ``is_error`` [N] bool with both classes present."""
    s_raw = _to_numpy(scores, "scores")
    if s_raw.ndim != 1 or s_raw.shape[0] == 0 or not _is_real_numeric(s_raw):
        raise CfdebugError(
            f"Expected `scores` to be a float array of shape [N] with N >= 1, but got shape "
            f"{tuple(s_raw.shape)} and dtype {s_raw.dtype}"
        )
    s = s_raw.astype(np.float64)
    if not np.all(np.isfinite(s)):
        raise CfdebugError("Expected `scores` to be finite, but got NaN or infinite values")
    n = s.shape[0]
    err = _check_binary(is_error, "is_error", f"[N] with N={n}")
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
    loc = _check_binary(local, "local", "[N, C]")
    if loc.ndim != 2:
        raise CfdebugError(
            f"Expected `local` to be a boolean array of shape [N, C], but got shape "
            f"{tuple(loc.shape)}"
        )
    n, c = loc.shape
    desc = f"[N, C]={(n, c)} or [C]=({c},)"
    glo = _check_binary(global_, "global_", desc)
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


# --------------------------------------------------------------------------------------------
# Per-class metrics
# --------------------------------------------------------------------------------------------


def _check_pred_labels(pred: Any, labels: Any, n_classes: int | None, allow_empty: bool):
    y = _check_labels(labels, "labels", k=n_classes, allow_empty=allow_empty)
    p = _check_labels(pred, "pred", n=y.shape[0], k=n_classes, allow_empty=allow_empty)
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
    k = _check_positive_int(n_classes, "n_classes")
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
