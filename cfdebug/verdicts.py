"""Paired comparisons of a method against its baseline: a difference, its 95% interval, a verdict.

A debugging tool's product is a judgement ("these flags beat the confidence baseline", "this
fix removed the shortcut"), so no comparison here is a bare number. Everything is paired over the
**test images** (the same images scored by both arms), by a bootstrap:

* **accuracy-like comparisons** (:func:`image_comparison`): a retrained method and its baseline
  (treatment vs its CE control, a revise method vs the same control, XCR vs vanilla retraining)
  scored per test image and per seed (``[S, N]``: correct or not, a per-image NLL, a confidence
  for ECE). Each bootstrap replicate resamples the seeds and the images (the same image draw for
  every seed and both arms) and recomputes the seed-averaged difference. An interval of zero width
  can then only come from per-image values that agree everywhere, and the row says so in words
  (``note``: "identical predictions: the method changed nothing"); a difference of one image per
  seed stays "no detectable difference", as it should.
* **detection scores** (:func:`detection_comparisons`): two error-detection scores on the same
  test predictions; the images are resampled once for both scores, so the interval is that of the
  *difference*. Scores from several CFE seeds are averaged per resample; their spread over seeds is
  reported beside it.

A verdict (:func:`verdict`) is **better** / **worse** when the interval excludes 0 on the side
the metric calls good, and **no detectable difference** otherwise (an interval touching 0
included). Every comparison also carries ``detectable``: the smallest difference its bed could
have detected (the interval's half-width, and for a mean of right/wrong over ``N`` images never
below ``ceil(z²)/N``: a method that fixes ``k`` images and breaks none is detected only from
``k ≥ 4``), so a "no detectable difference" says what it ruled out. Everything here is a pure
function of arrays (NumPy / SciPy), validated like :mod:`cfdebug.metrics`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import CfdebugError

BETTER, SAME, WORSE = "better", "no detectable difference", "worse"
VERDICTS = (BETTER, SAME, WORSE)
CONFIDENCE = 0.95
N_BOOTSTRAP = 2000
FPR_AT_TPR = 0.95

# Detection metrics: (name, higher is better). Scores follow Hendrycks & Gimpel: a HIGHER score
# means the prediction is MORE likely correct; errors are what a reviewer wants to find.
DETECTION_METRICS = (("auroc", True), ("aupr_err", True), ("fpr_at_95tpr", False), ("precision_at_budget", True))

__all__ = [
    "BETTER",
    "SAME",
    "WORSE",
    "VERDICTS",
    "Comparison",
    "verdict",
    "image_comparison",
    "accuracy_comparisons",
    "consistent_floor",
    "detection_metrics",
    "detection_comparisons",
    "format_value",
    "format_detectable",
    "verdict_text",
    "format_verdicts",
]

#: Metrics whose values are fractions a reader thinks of in percentage points.
_POINT_METRICS = ("acc", "recall", "accuracy", "still_wrong", "cam_in_region")


@dataclass(frozen=True)
class Comparison:
    """One claim, method vs baseline on one metric, with the paired difference and its interval.

    ``difference = method_value − baseline_value`` (seed means over all images); ``ci_low``/
    ``ci_high`` bound it at 95% (``±inf`` when nothing can be resampled: one image); ``n_seeds``
    seeds and ``n_images`` images paired; ``spread`` the min/max of the difference over seeds where
    several were run; ``verdict`` one of :data:`VERDICTS`; ``detectable`` the smallest difference
    this comparison could have detected (see the module docstring); ``note`` words for what the
    numbers alone would hide (identical predictions); ``changed`` the mean number of images per
    seed whose prediction differs between the arms (``None`` where predictions were not given).
    """

    claim: str
    metric: str
    method: str
    baseline: str
    baseline_value: float
    method_value: float
    difference: float
    ci_low: float
    ci_high: float
    n_seeds: int
    higher_is_better: bool
    verdict: str
    n_images: int = 0
    pairing: str = "seeds × images (bootstrap)"
    spread: tuple[float, float] | None = None
    detectable: float | None = None
    note: str | None = None
    changed: float | None = None

    @property
    def indicative(self) -> bool:
        """True when the numbers are a hint only: the interval is undefined, or one seed was run
        (its interval covers the test images, not a second training or fit)."""
        return not (math.isfinite(self.ci_low) and math.isfinite(self.ci_high)) or self.n_seeds < 2

    def as_dict(self) -> dict:
        out = asdict(self)
        out["indicative"] = self.indicative
        return out


def verdict(ci_low: float, ci_high: float, higher_is_better: bool = True) -> str:
    """**better** / **worse** if ``[ci_low, ci_high]`` excludes 0, else **no detectable difference**.

    ``higher_is_better`` says which side of 0 is good (False for ECE, NLL, Brier, FPR). An interval
    with a bound exactly at 0, a NaN bound or an infinite one gives no detectable difference.
    """
    lo, hi = float(ci_low), float(ci_high)
    if math.isnan(lo) or math.isnan(hi):
        return SAME
    if lo > hi:
        raise CfdebugError(f"Expected `ci_low` <= `ci_high`, but got [{lo}, {hi}].")
    if lo > 0:
        return BETTER if higher_is_better else WORSE
    if hi < 0:
        return WORSE if higher_is_better else BETTER
    return SAME


def _check_confidence(confidence: float) -> float:
    if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
        raise CfdebugError(f"Expected `confidence` to be in (0, 1), but got {confidence!r}.")
    return float(confidence)


def _check_n_boot(n_boot: int) -> int:
    if not (isinstance(n_boot, int) and not isinstance(n_boot, bool) and n_boot >= 100):
        raise CfdebugError(f"Expected `n_boot` to be an integer >= 100, but got {n_boot!r}.")
    return n_boot


def consistent_floor(n_images: int, confidence: float = CONFIDENCE) -> float:
    """The smallest accuracy difference ``N`` paired images can show: ``ceil(z²)/N``.

    A method that turns ``k`` wrong predictions right and breaks none has per-image differences
    of ``k`` ones among ``N``; the normal interval of their mean excludes 0 only when
    ``k/N > z·√k/N``, i.e. ``k > z²`` (3.84 at 95%). Noisier comparisons need more.
    """
    from scipy import stats

    z = float(stats.norm.ppf(0.5 + _check_confidence(confidence) / 2))
    return math.ceil(z * z) / max(int(n_images), 1)


def _as_rows(values: Any, name: str, groups: bool = False) -> np.ndarray:
    """``[S, N]`` (or ``[S, G, N]`` with ``groups``: per seed, several image sets of the same N images)."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[None] if arr.ndim == (2 if groups else 1) else arr
    if arr.ndim != (3 if groups else 2) or arr.shape[-1] == 0:
        shape = "[G, N] or [S, G, N]" if groups else "[N] or [S, N]"
        raise CfdebugError(f"Expected `{name}` of shape {shape} (seeds × images), but got {tuple(np.shape(values))}.")
    if not np.isfinite(arr).all():
        raise CfdebugError(f"Expected finite values in `{name}`, but some are NaN or infinite.")
    return arr


def _ece_rows(confidence: np.ndarray, correct: np.ndarray, weights: np.ndarray, n_bins: int) -> np.ndarray:
    """ECE (``n_bins`` equal-width bins) of one model's ``confidence``/``correct`` [N] under each
    resample's image counts ``weights`` [B, N]: ``[B]`` (the weights are a multiset of images)."""
    from .metrics.calibration import bin_index

    bins = bin_index(confidence, n_bins)  # [N] the (lo, hi] bins of metrics.expected_calibration_error
    onehot = np.zeros((confidence.size, n_bins))
    onehot[np.arange(confidence.size), bins] = 1.0  # [N, M]
    counts = weights @ onehot  # [B, M]
    gap = weights @ (onehot * (correct - confidence)[:, None])  # [B, M]: Σ w·(acc − conf) per bin
    return np.abs(gap).sum(1) / np.maximum(counts.sum(1), 1e-12)


def _statistic(values: np.ndarray, weights: np.ndarray, statistic: str, confidences: np.ndarray | None, n_bins: int) -> np.ndarray:
    """The statistic of every seed's row under every resample: ``[S, B]`` (ECE: the mean over a
    seed's image sets ``[S, G, N]`` of each set's ECE)."""
    if statistic == "mean":
        return values @ weights.T / weights.sum(1)  # [S, B]
    return np.stack([
        np.mean([_ece_rows(confidences[i, g], values[i, g], weights, n_bins) for g in range(values.shape[1])], axis=0)
        for i in range(len(values))
    ])


def image_comparison(
    claim: str,
    metric: str,
    method_values: Any,
    baseline_values: Any,
    *,
    method: str,
    baseline: str,
    higher_is_better: bool = True,
    statistic: str = "mean",
    method_confidences: Any = None,
    baseline_confidences: Any = None,
    method_predictions: Any = None,
    baseline_predictions: Any = None,
    n_bins: int = 15,
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> Comparison:
    """Method vs baseline, paired over seeds and test images by a bootstrap (module docstring).

    Args:
        method_values / baseline_values: ``[S, N]`` (or ``[N]`` for one seed) per-image values of
            the same ``N`` test images, row ``s`` of both from seed ``s``: 1/0 for right/wrong
            (accuracy, a class's recall on that class's images), a per-image NLL or Brier score.
            An arm with one row (a base model, an edit with no training) is paired with every
            row of the other.
            ``[S, G, N]``: ``G`` sets of the same images per seed (corrupted copies), the statistic
            being the mean over the sets.
        statistic: ``"mean"`` (accuracy, recall, NLL, Brier) or ``"ece"`` (the values are then 1/0
            right/wrong and ``*_confidences`` the top-label confidences, the same shape).
        method_predictions / baseline_predictions: ``[S, N]`` predicted classes; with them the row
            counts the changed predictions and says "identical predictions" when nothing changed.
        n_boot, seed: bootstrap replicates; the draws are seeded, so the interval is reproducible.

    Returns:
        A :class:`Comparison`; the point values are the seed means on all images, the interval the
        percentile interval of the replicated differences.
    """
    conf = _check_confidence(confidence)
    n_boot = _check_n_boot(n_boot)
    if statistic not in ("mean", "ece"):
        raise CfdebugError(f"Expected `statistic` to be 'mean' or 'ece', but got {statistic!r}.")
    groups = np.ndim(method_values) == 3
    m, b = _as_rows(method_values, "method_values", groups), _as_rows(baseline_values, "baseline_values", groups)
    if statistic == "mean" and groups:  # a mean over sets of the same images is the mean of each image's mean
        m, b = m.mean(1), b.mean(1)
        groups = False
    elif statistic == "ece" and not groups:
        m, b = m[:, None], b[:, None]
    if b.shape[1:] != m.shape[1:] or (len(b) != len(m) and 1 not in (len(b), len(m))):
        raise CfdebugError(
            f"Expected the baseline's values of shape [{len(m)} or 1, {m.shape[1]}] like the method's (paired by seed "
            f"and image), but got {list(b.shape)} and {list(m.shape)}."
        )
    shape = (max(len(m), len(b)), *m.shape[1:])  # one arm without seeds (a base model, an edit) pairs with every seed
    m, b = np.broadcast_to(m, shape), np.broadcast_to(b, shape)
    mc = bc = None
    if statistic == "ece":
        if method_confidences is None or baseline_confidences is None:
            raise CfdebugError("Expected `method_confidences` and `baseline_confidences` for the ECE statistic, but got none.")
        mc = np.broadcast_to(_as_rows(method_confidences, "method_confidences", groups).reshape((-1, *m.shape[1:])), shape)
        bc = np.broadcast_to(_as_rows(baseline_confidences, "baseline_confidences", groups).reshape((-1, *m.shape[1:])), shape)
    s_count, n = m.shape[0], m.shape[-1]
    full = np.ones((1, n))
    m_full = _statistic(m, full, statistic, mc, n_bins)[:, 0]  # [S]
    b_full = _statistic(b, full, statistic, bc, n_bins)[:, 0]
    per_seed = m_full - b_full
    rng = np.random.default_rng(seed)
    images = rng.integers(0, n, size=(n_boot, n))  # [B, N] the same draw for every seed and both arms
    weights = np.zeros((n_boot, n))
    np.add.at(weights, (np.arange(n_boot)[:, None], images), 1.0)
    diffs = _statistic(m, weights, statistic, mc, n_bins) - _statistic(b, weights, statistic, bc, n_bins)  # [S, B]
    seeds = rng.integers(0, s_count, size=(n_boot, s_count))  # [B, S] seeds drawn with replacement
    replicated = diffs[seeds, np.arange(n_boot)[:, None]].mean(1)  # [B]
    if n > 1:
        lo, hi = (float(v) for v in np.quantile(replicated, [(1 - conf) / 2, (1 + conf) / 2]))
    else:
        lo, hi = -math.inf, math.inf
    lo, hi = min(lo, float(per_seed.mean())), max(hi, float(per_seed.mean()))  # the point estimate lies inside
    same_values = _alike(m, b) and (statistic == "mean" or _alike(mc, bc))
    if same_values:
        lo = hi = 0.0
    half = (hi - lo) / 2 if math.isfinite(lo) and math.isfinite(hi) else math.inf
    binary = statistic == "mean" and bool(np.isin(m, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all())  # right/wrong
    detectable = max(half, consistent_floor(n, conf)) if binary else half
    changed, note = _changes(method_predictions, baseline_predictions, (s_count, n), same_values)
    return Comparison(
        claim=claim, metric=metric, method=method, baseline=baseline, baseline_value=float(b_full.mean()),
        method_value=float(m_full.mean()), difference=float(per_seed.mean()), ci_low=lo, ci_high=hi, n_seeds=s_count,
        higher_is_better=higher_is_better, verdict=verdict(lo, hi, higher_is_better), n_images=n,
        spread=(float(per_seed.min()), float(per_seed.max())) if s_count > 1 else None,
        detectable=float(detectable), note=note, changed=changed,
    )


def accuracy_comparisons(
    claim: str,
    method_predictions: Any,
    baseline_predictions: Any,
    labels: Any,
    classes: Sequence[str],
    *,
    method: str,
    baseline: str,
    metric: str = "test_acc",
    n_boot: int = N_BOOTSTRAP,
) -> list[Comparison]:
    """Accuracy and every class's recall of a method vs its baseline from their predictions.

    ``method_predictions`` ``[S, N]`` (seed × test image), ``baseline_predictions`` ``[S, N]`` or
    ``[N]`` (one baseline model), ``labels`` ``[N]``. One :func:`image_comparison` for ``metric``
    over all images, then ``recall[<class>]`` over each class's images (classes with no test image
    are skipped).
    """
    y = np.asarray(labels).reshape(-1)
    mp = np.asarray(method_predictions)
    mp = mp[None] if mp.ndim == 1 else mp
    bp = np.asarray(baseline_predictions)
    bp = bp[None] if bp.ndim == 1 else bp
    if mp.shape[-1] != y.size or bp.shape[-1] != y.size:
        raise CfdebugError(f"Expected predictions of {y.size} test images like the labels, but got {list(mp.shape)} and {list(bp.shape)}.")
    rows = [(metric, np.ones(y.size, bool))] + [(f"recall[{c}]", y == k) for k, c in enumerate(classes)]
    out = []
    for name, keep in rows:
        if not keep.any():
            continue
        out.append(image_comparison(
            claim, name, (mp[:, keep] == y[keep]).astype(float), (bp[:, keep] == y[keep]).astype(float), method=method,
            baseline=baseline, method_predictions=mp[:, keep], baseline_predictions=bp[:, keep], n_boot=n_boot,
        ))
    return out


def _alike(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to float rounding (1e-9 of their scale): two arms whose per-image values differ only
    in the last bits (a flat Grad-CAM map's share, computed twice) changed nothing."""
    return bool(np.allclose(a, b, rtol=0.0, atol=1e-9 * max(1.0, float(np.abs(b).max(initial=0.0)))))


def _changes(method_predictions, baseline_predictions, shape, same_values: bool) -> tuple[float | None, str | None]:
    """``(mean changed predictions per seed, note)`` for :func:`image_comparison`."""
    if method_predictions is None or baseline_predictions is None:
        return None, ("identical per-image values: the method changed nothing measurable here" if same_values else None)
    mp = np.broadcast_to(np.asarray(method_predictions).reshape((-1, shape[1])), shape)
    bp = np.broadcast_to(np.asarray(baseline_predictions).reshape((-1, shape[1])), shape)
    changed = float((mp != bp).sum(1).mean())
    if changed == 0:
        return 0.0, "identical predictions: the method changed nothing"
    if same_values:
        return changed, f"the same images right and wrong: {changed:g} predictions per seed moved between wrong classes"
    return changed, None


# --------------------------------------------------------------------------------------------
# Detection metrics, vectorised over bootstrap resamples (rows)
# --------------------------------------------------------------------------------------------


def _auroc_rows(s: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """P(a correct prediction scores above an error), ties 1/2, per row of ``[B, N]``."""
    from scipy.stats import rankdata

    ranks = rankdata(s, axis=1)  # [B, N] average ranks, so ties count 1/2
    n_c = correct.sum(1).astype(np.float64)
    n_e = correct.shape[1] - n_c
    with np.errstate(invalid="ignore", divide="ignore"):
        u = (ranks * correct).sum(1) - n_c * (n_c + 1) / 2
        return u / (n_c * n_e)


def _average_precision_rows(s: np.ndarray, err: np.ndarray) -> np.ndarray:
    """sklearn's average precision of errors ranked by ``-s`` (ties as one threshold), per row."""
    order = np.argsort(s, axis=1, kind="stable")  # most suspect (lowest score) first
    s_sorted = np.take_along_axis(s, order, 1)
    pos = np.take_along_axis(err, order, 1).astype(np.float64)
    tp = np.cumsum(pos, axis=1)  # [B, N]
    n = s.shape[1]
    last_of_tie = np.ones_like(s_sorted, dtype=bool)
    last_of_tie[:, :-1] = s_sorted[:, 1:] != s_sorted[:, :-1]
    kept_tp = np.where(last_of_tie, tp, 0.0)
    prev_kept = np.zeros_like(tp)
    prev_kept[:, 1:] = np.maximum.accumulate(kept_tp, axis=1)[:, :-1]  # tp is non-decreasing
    precision = tp / np.arange(1, n + 1)
    total = pos.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(last_of_tie, precision * (tp - prev_kept), 0.0).sum(1) / total


def _fpr_at_tpr_rows(s: np.ndarray, correct: np.ndarray, tpr: float = FPR_AT_TPR) -> np.ndarray:
    """Fraction of errors still trusted when the threshold keeps ``tpr`` of correct predictions."""
    n_c = correct.sum(1)
    k = np.ceil(tpr * n_c).astype(np.int64)  # the k-th highest correct score is the threshold
    ranked = -np.sort(np.where(correct, -s, np.inf), axis=1)  # correct scores, highest first
    threshold = ranked[np.arange(len(s)), np.clip(k - 1, 0, s.shape[1] - 1)]
    err = ~correct
    with np.errstate(invalid="ignore", divide="ignore"):
        out = ((s >= threshold[:, None]) & err).sum(1) / err.sum(1)
    return np.where(n_c > 0, out, np.nan)


def _precision_rows(flags: np.ndarray, err: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return (flags & err).sum(1) / flags.sum(1)


def _rows(scores: np.ndarray, is_error: np.ndarray, flags: np.ndarray | None) -> dict[str, np.ndarray]:
    correct = ~is_error
    out = {
        "auroc": _auroc_rows(scores, correct),
        "aupr_err": _average_precision_rows(scores, is_error),
        "fpr_at_95tpr": _fpr_at_tpr_rows(scores, correct),
    }
    if flags is not None:
        out["precision_at_budget"] = _precision_rows(flags, is_error)
    return out


def _check_detection(scores: Any, is_error: Any, flags: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    s = np.asarray(scores, dtype=np.float64)
    s = s[None] if s.ndim == 1 else s
    err = np.asarray(is_error).astype(bool).reshape(-1)
    if s.ndim != 2 or s.shape[1] != err.size:
        raise CfdebugError(
            f"Expected scores of shape [N] or [S, N] with N = {err.size} (one per prediction), but got {tuple(np.shape(scores))}."
        )
    if not np.isfinite(s).all():
        raise CfdebugError("Expected finite detection scores, but some are NaN or infinite.")
    if err.all() or not err.any():
        raise CfdebugError("Expected at least one error and one correct prediction to compare detection scores.")
    f = None
    if flags is not None:
        f = np.asarray(flags).astype(bool)
        f = f[None] if f.ndim == 1 else f
        if f.shape != s.shape:
            raise CfdebugError(f"Expected `flags` of shape {s.shape} like the scores, but got {f.shape}.")
    return s, err, f


def detection_metrics(scores: Any, is_error: Any, flags: Any = None) -> dict[str, float]:
    """AUROC, AUPR-Err, FPR at 95% TPR and (with ``flags``) precision of the flagged set.

    ``scores`` ``[N]`` (higher = more likely correct), ``is_error`` ``[N]`` bool, ``flags``
    ``[N]`` bool (the predictions a review budget flags). AUROC and AUPR-Err equal
    :func:`cfdebug.metrics.error_detection_scores`; FPR at 95% TPR is the fraction of errors
    scoring at or above the threshold that keeps 95% of the correct predictions (lower is better).
    """
    s, err, f = _check_detection(scores, is_error, flags)
    return {k: float(v[0]) for k, v in _rows(s[:1], err[None], None if f is None else f[:1]).items()}


def detection_comparisons(
    method_scores: Mapping[str, Any],
    baseline_scores: Any,
    is_error: Any,
    *,
    baseline: str = "msp",
    method_flags: Mapping[str, Any] | None = None,
    baseline_flags: Any = None,
    claim: str = "detection",
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> list[Comparison]:
    """Each detection score vs the baseline score, paired bootstrap over the same test images.

    Args:
        method_scores: ``{name: [N] or [S, N]}``: a score per prediction (``S`` CFE seeds).
        baseline_scores: ``[N]`` the baseline score (MSP), one set (it has no CFE seed).
        is_error: ``[N]`` bool, True where the prediction is wrong.
        method_flags / baseline_flags: the same shapes, bool: what the review budget flags (adds
            ``precision_at_budget``).
        n_boot, seed: bootstrap resamples of the N images (the same resamples for every score).

    Returns:
        One :class:`Comparison` per method and metric of :data:`DETECTION_METRICS`; the point
        values are on all images (seed means), the interval is the percentile interval of the
        seed-averaged difference over resamples, ``spread`` its min/max over seeds.
    """
    conf = _check_confidence(confidence)
    n_boot = _check_n_boot(n_boot)
    b_s, err, b_f = _check_detection(baseline_scores, is_error, baseline_flags)
    n = err.size
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))  # [B, N] shared resamples
    base_full = _rows(b_s[:1], err[None], None if b_f is None else b_f[:1])
    base_boot = _rows(b_s[0][idx], err[idx], None if b_f is None else b_f[0][idx])
    out = []
    for name, scores in method_scores.items():
        flags = None if method_flags is None else method_flags.get(name)
        s, _, f = _check_detection(scores, err, flags)
        per_seed = [_rows(s[i : i + 1], err[None], None if f is None else f[i : i + 1]) for i in range(len(s))]
        boot = [_rows(s[i][idx], err[idx], None if f is None else f[i][idx]) for i in range(len(s))]
        for metric, higher in DETECTION_METRICS:
            if metric not in base_full or metric not in per_seed[0]:
                continue
            b_val = float(base_full[metric][0])
            m_seeds = np.array([float(r[metric][0]) for r in per_seed])
            diffs = np.mean([r[metric] for r in boot], axis=0) - base_boot[metric]  # [B]
            diffs = diffs[np.isfinite(diffs)]
            lo, hi = (np.quantile(diffs, [(1 - conf) / 2, (1 + conf) / 2]) if diffs.size else (math.nan, math.nan))
            spread = (float((m_seeds - b_val).min()), float((m_seeds - b_val).max())) if len(s) > 1 else None
            out.append(Comparison(
                claim=claim, metric=metric, method=name, baseline=baseline, baseline_value=b_val,
                method_value=float(m_seeds.mean()), difference=float(m_seeds.mean() - b_val),
                ci_low=float(lo), ci_high=float(hi), n_seeds=len(s), higher_is_better=higher,
                verdict=verdict(lo, hi, higher), n_images=n, pairing="images (bootstrap)", spread=spread,
                detectable=float((hi - lo) / 2) if diffs.size else None,
            ))
    return out


def format_value(x: float | None, digits: int = 3, signed: bool = False) -> str:
    """A value or interval bound as text; ``"n/a"`` for a missing, NaN or infinite one (no interval)."""
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _in_points(metric: str) -> bool:
    return any(part in metric for part in _POINT_METRICS)


def format_detectable(row: dict) -> str:
    """``"could detect ±0.8 pts"`` (accuracy-like metrics in percentage points), ``""`` when unknown."""
    d = row.get("detectable")
    if d is None or not math.isfinite(d):
        return ""
    return f"could detect ±{100 * d:.1f} pts" if _in_points(row["metric"]) else f"could detect ±{d:.3f}"


def verdict_text(row: dict) -> str:
    """The verdict with what a reader needs beside it: the note (identical predictions), the
    smallest detectable difference of a "no detectable difference", or "indicative"."""
    parts = [row["verdict"]]
    if row.get("note"):
        parts.append(row["note"])
    elif row["verdict"] == SAME and format_detectable(row):
        parts.append(format_detectable(row))
    if row.get("indicative"):
        finite = all(math.isfinite(float(row.get(k, math.nan))) for k in ("ci_low", "ci_high"))
        parts.append("indicative: one seed, the interval covers the test images only" if finite else "indicative: one run")
    return parts[0] + (f" ({'; '.join(parts[1:])})" if len(parts) > 1 else "")


def format_verdicts(comparisons: Sequence[Comparison | dict]) -> str:
    """A plain-text verdict table: claim, metric, method vs baseline, difference [95% CI], verdict."""
    rows = [c.as_dict() if isinstance(c, Comparison) else dict(c) for c in comparisons]
    header = ("claim", "metric", "method", "baseline (value)", "method value", "difference [95% CI]", "paired by", "verdict")
    lines = []
    for r in rows:
        ci = f"{r['difference']:+.3f} [{format_value(r['ci_low'], signed=True)}, {format_value(r['ci_high'], signed=True)}]"
        paired = f"{r['n_seeds']} seed{'s' if r['n_seeds'] != 1 else ''}"
        if r.get("n_images"):
            paired += f" × {r['n_images']} images"
        lines.append((r["claim"], r["metric"], r["method"], f"{r['baseline']} {r['baseline_value']:.3f}",
                      f"{r['method_value']:.3f}", ci, paired, verdict_text(r)))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*row) for row in lines])
