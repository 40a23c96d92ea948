"""Paired comparisons of a method against its baseline: a difference, its 95% interval, a verdict.

A debugging tool's product is a judgement ("these flags beat the confidence baseline", "this
treatment helped"), so no comparison here is a bare number. Two kinds of pairing:

* **over seeds** (:func:`seed_comparison`): the method and its baseline were run with the same
  seeds (treatment vs its CE control, XCR vs vanilla retraining); the per-seed differences get
  a Student-t interval. With one seed there is no interval (``±inf``): the result is
  *indicative* and the verdict cannot be "better" or "worse".
* **over images** (:func:`detection_comparisons`): two error-detection scores on the same test
  predictions; a paired bootstrap resamples the images once for both scores, so the interval is
  that of the *difference*. Scores from several CFE seeds are averaged per resample (the
  interval of the seed-averaged difference); their spread over seeds is reported beside it.

A verdict (:func:`verdict`) is **better** / **worse** when the interval excludes 0 on the side
the metric calls good, and **no detectable difference** otherwise (an interval touching 0
included). Everything here is a pure function of arrays (NumPy / SciPy), validated like
:mod:`cfdebug.metrics`.
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
    "t_interval",
    "seed_comparison",
    "detection_metrics",
    "detection_comparisons",
    "format_value",
    "format_verdicts",
]


@dataclass(frozen=True)
class Comparison:
    """One claim, method vs baseline on one metric, with the paired difference and its interval.

    ``difference = method_value − baseline_value``; ``ci_low``/``ci_high`` bound it at 95%
    (``±inf`` when one seed cannot give an interval); ``n_seeds`` seeds paired (``n_images``
    images resampled for a bootstrap, else 0); ``spread`` the min/max of the difference over
    seeds where several were run; ``verdict`` one of :data:`VERDICTS`.
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
    pairing: str = "seeds"
    spread: tuple[float, float] | None = None

    @property
    def indicative(self) -> bool:
        """True when the interval is undefined (a single run): read the numbers as a hint only."""
        return not (math.isfinite(self.ci_low) and math.isfinite(self.ci_high))

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


def t_interval(differences: Any, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Mean of paired ``differences`` ``[n]`` and its two-sided Student-t interval.

    ``n = 1`` gives ``(d, -inf, inf)`` (no interval from one run); equal differences give a
    zero-width interval at their value (the runs agree exactly).
    """
    from scipy import stats

    conf = _check_confidence(confidence)
    d = np.asarray(differences, dtype=np.float64).reshape(-1)
    if d.size == 0:
        raise CfdebugError("Expected at least one paired difference, but got none.")
    if not np.isfinite(d).all():
        raise CfdebugError(f"Expected finite paired differences, but got {d.tolist()}.")
    mean = float(d.mean())
    if d.size == 1:
        return mean, -math.inf, math.inf
    sem = float(d.std(ddof=1)) / math.sqrt(d.size)
    half = float(stats.t.ppf(0.5 + conf / 2, d.size - 1)) * sem
    return mean, mean - half, mean + half


def seed_comparison(
    claim: str,
    metric: str,
    method_values: Sequence[float],
    baseline_values: Sequence[float],
    *,
    method: str,
    baseline: str,
    higher_is_better: bool = True,
    confidence: float = CONFIDENCE,
) -> Comparison:
    """Method vs baseline paired by seed: ``method_values[i]`` and ``baseline_values[i]`` share seed ``i``."""
    m = np.asarray(method_values, dtype=np.float64).reshape(-1)
    b = np.asarray(baseline_values, dtype=np.float64).reshape(-1)
    if m.shape != b.shape:
        raise CfdebugError(
            f"Expected one baseline value per method value (paired by seed), but got {m.size} and {b.size}."
        )
    diff, lo, hi = t_interval(m - b, confidence)
    spread = (float((m - b).min()), float((m - b).max())) if m.size > 1 else None
    return Comparison(
        claim=claim, metric=metric, method=method, baseline=baseline, baseline_value=float(b.mean()),
        method_value=float(m.mean()), difference=diff, ci_low=lo, ci_high=hi, n_seeds=int(m.size),
        higher_is_better=higher_is_better, verdict=verdict(lo, hi, higher_is_better), spread=spread,
    )


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
    if not (isinstance(n_boot, int) and n_boot >= 100):
        raise CfdebugError(f"Expected `n_boot` to be an integer >= 100, but got {n_boot!r}.")
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
            ))
    return out


def format_value(x: float | None, digits: int = 3, signed: bool = False) -> str:
    """A value or interval bound as text; ``"n/a"`` for a missing, NaN or infinite one (no interval)."""
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def format_verdicts(comparisons: Sequence[Comparison | dict]) -> str:
    """A plain-text verdict table: claim, metric, method vs baseline, difference [95% CI], verdict."""
    rows = [c.as_dict() if isinstance(c, Comparison) else dict(c) for c in comparisons]
    header = ("claim", "metric", "method", "baseline (value)", "method value", "difference [95% CI]", "paired by", "verdict")
    lines = []
    for r in rows:
        ci = f"{r['difference']:+.3f} [{format_value(r['ci_low'])}, {format_value(r['ci_high'])}]"
        paired = f"{r['n_seeds']} seed{'s' if r['n_seeds'] != 1 else ''}"
        if r.get("n_images"):
            paired += f", {r['n_images']} images"
        verdict_text = r["verdict"] + (" (indicative: one run)" if r.get("indicative") else "")
        lines.append((r["claim"], r["metric"], r["method"], f"{r['baseline']} {r['baseline_value']:.3f}",
                      f"{r['method_value']:.3f}", ci, paired, verdict_text))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*row) for row in lines])
