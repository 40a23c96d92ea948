"""Paired comparisons: intervals on constructed cases with a known answer, verdicts at their edges."""

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score

from cfdebug.errors import CfdebugError
from cfdebug.verdicts import (
    BETTER,
    SAME,
    WORSE,
    detection_comparisons,
    detection_metrics,
    format_verdicts,
    seed_comparison,
    t_interval,
    verdict,
)


@pytest.mark.parametrize(
    "lo, hi, higher, expected",
    [
        (0.01, 0.2, True, BETTER),
        (0.0, 0.2, True, SAME),  # a bound exactly at 0 does not exclude it
        (-0.2, 0.0, True, SAME),
        (-0.2, -1e-9, True, WORSE),
        (-0.1, 0.1, True, SAME),
        (0.01, 0.2, False, WORSE),  # e.g. ECE went up
        (-0.2, -0.01, False, BETTER),
        (-math.inf, math.inf, True, SAME),
        (float("nan"), 0.3, True, SAME),
        (0.0, 0.0, True, SAME),
        (0.5, 0.5, True, BETTER),
    ],
)
def test_verdict_edges(lo, hi, higher, expected):
    assert verdict(lo, hi, higher) == expected


def test_verdict_refuses_reversed_interval():
    with pytest.raises(CfdebugError, match="ci_low"):
        verdict(0.2, 0.1)


def test_t_interval_matches_scipy_reference():
    d = np.array([0.3, 1.1, 0.4, 0.9, 0.2])
    mean, lo, hi = t_interval(d)
    ref = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    assert mean == pytest.approx(d.mean())
    assert (lo, hi) == pytest.approx((ref.low, ref.high), rel=1e-12)


def test_t_interval_one_run_and_identical_runs():
    assert t_interval([0.4]) == (0.4, -math.inf, math.inf)
    mean, lo, hi = t_interval([0.0, 0.0, 0.0])
    assert (mean, lo, hi) == (0.0, 0.0, 0.0)
    with pytest.raises(CfdebugError, match="at least one"):
        t_interval([])
    with pytest.raises(CfdebugError, match="finite"):
        t_interval([1.0, float("nan")])


def test_t_interval_covers_a_known_difference_about_95_percent():
    rng = np.random.default_rng(0)
    true_diff, hits, trials = 0.5, 0, 2000
    for _ in range(trials):
        base = rng.normal(0, 1, 5)
        method = base + true_diff + rng.normal(0, 0.3, 5)
        _, lo, hi = t_interval(method - base)
        hits += lo <= true_diff <= hi
    assert 0.93 <= hits / trials <= 0.97


def test_seed_comparison_pairs_by_seed():
    # Large seed-to-seed variation shared by both arms: only pairing reveals the +1 point.
    base = np.array([0.80, 0.90, 0.70])
    c = seed_comparison("treatment", "test_acc", base + 0.01, base, method="treated", baseline="control")
    assert c.difference == pytest.approx(0.01)
    assert c.ci_low == pytest.approx(0.01) and c.ci_high == pytest.approx(0.01)
    assert c.verdict == BETTER and c.n_seeds == 3 and not c.indicative
    same = seed_comparison("treatment", "test_acc", base, base, method="treated", baseline="control")
    assert same.verdict == SAME
    worse_ece = seed_comparison("xcr", "ece", [0.3, 0.31, 0.29], [0.2, 0.2, 0.21], method="xcr", baseline="vanilla", higher_is_better=False)
    assert worse_ece.verdict == WORSE
    one = seed_comparison("xcr", "acc", [0.9], [0.5], method="xcr", baseline="vanilla")
    assert one.indicative and one.verdict == SAME
    with pytest.raises(CfdebugError, match="paired by seed"):
        seed_comparison("x", "m", [1, 2], [1], method="a", baseline="b")


def test_detection_metrics_equal_sklearn_with_ties():
    rng = np.random.default_rng(1)
    err = rng.random(300) < 0.2
    scores = np.round(rng.random(300) + 0.4 * ~err, 1)  # coarse: many ties
    out = detection_metrics(scores, err)
    assert out["auroc"] == pytest.approx(roc_auc_score(~err, scores), abs=1e-12)
    assert out["aupr_err"] == pytest.approx(average_precision_score(err, -scores), abs=1e-12)


def test_fpr_at_95_tpr_by_hand():
    # 20 correct scores 1..20, 5 errors at 0.5, 1.5, 2.5, 10.5, 30. Keeping 95% of the correct
    # (19 of 20) puts the threshold at 2: errors at 2.5, 10.5 and 30 are still trusted → 3/5.
    correct = np.arange(1, 21, dtype=float)
    errors = np.array([0.5, 1.5, 2.5, 10.5, 30.0])
    scores = np.concatenate([correct, errors])
    err = np.r_[np.zeros(20, bool), np.ones(5, bool)]
    assert detection_metrics(scores, err)["fpr_at_95tpr"] == pytest.approx(3 / 5)


def test_detection_comparison_known_better_and_identical():
    rng = np.random.default_rng(2)
    err = rng.random(400) < 0.15
    good = np.where(err, rng.random(400) * 0.5, 0.5 + rng.random(400) * 0.5)  # separates perfectly
    noise = rng.random(400)  # chance
    rows = {(c.method, c.metric): c for c in detection_comparisons({"good": good, "same": noise}, noise, err, n_boot=500)}
    auroc = rows[("good", "auroc")]
    assert auroc.method_value == pytest.approx(1.0) and auroc.verdict == BETTER and auroc.ci_low > 0.2
    assert rows[("good", "fpr_at_95tpr")].verdict == BETTER  # lower FPR is better
    same = rows[("same", "auroc")]
    assert same.difference == 0 and same.ci_low == 0 and same.ci_high == 0 and same.verdict == SAME


def test_detection_comparison_averages_seeds_and_reports_spread():
    rng = np.random.default_rng(3)
    err = rng.random(300) < 0.2
    base = rng.random(300) + 0.3 * ~err
    seeds = np.stack([base + 0.2 * ~err + 0.05 * rng.random(300) for _ in range(3)])  # [3, N]
    flags = seeds < np.quantile(seeds, 0.1, axis=1, keepdims=True)
    base_flags = base < np.quantile(base, 0.1)
    out = detection_comparisons({"mc": seeds}, base, err, method_flags={"mc": flags}, baseline_flags=base_flags, n_boot=300)
    by_metric = {c.metric: c for c in out}
    assert set(by_metric) == {"auroc", "aupr_err", "fpr_at_95tpr", "precision_at_budget"}
    a = by_metric["auroc"]
    assert a.n_seeds == 3 and a.spread[0] <= a.difference <= a.spread[1]
    singles = [roc_auc_score(~err, s) for s in seeds]
    assert a.method_value == pytest.approx(np.mean(singles), abs=1e-12)
    assert by_metric["precision_at_budget"].method_value == pytest.approx(np.mean([(f & err).sum() / f.sum() for f in flags]))


def test_detection_comparison_bad_input():
    err = np.array([True, False, False])
    with pytest.raises(CfdebugError, match="one per prediction"):
        detection_comparisons({"a": np.zeros(4)}, np.zeros(3), err, n_boot=100)
    with pytest.raises(CfdebugError, match="at least one error"):
        detection_comparisons({"a": np.zeros(3)}, np.zeros(3), np.zeros(3, bool), n_boot=100)
    with pytest.raises(CfdebugError, match="n_boot"):
        detection_comparisons({"a": np.zeros(3)}, np.zeros(3), err, n_boot=5)


def test_inputs_not_mutated_and_table_text():
    err = np.array([True, False, False, True, False])
    s = np.array([0.1, 0.9, 0.8, 0.3, 0.7])
    before = s.copy()
    rows = detection_comparisons({"mc": s}, s[::-1].copy(), err, n_boot=100)
    assert np.array_equal(s, before)
    text = format_verdicts(rows + [seed_comparison("t", "acc", [0.9], [0.8], method="a", baseline="b")])
    assert "difference [95% CI]" in text and "indicative" in text and "auroc" in text
