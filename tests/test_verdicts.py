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
    consistent_floor,
    format_verdicts,
    image_comparison,
    verdict,
    verdict_text,
)
from cfdebug.metrics import expected_calibration_error


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


def _correct(rng, seeds: int, n: int, acc: float) -> np.ndarray:
    return (rng.random((seeds, n)) < acc).astype(float)  # [S, N] right/wrong per seed and image


def test_identical_predictions_give_zero_width_and_say_so():
    rng = np.random.default_rng(0)
    base = _correct(rng, 3, 539, 0.9)
    preds = rng.integers(0, 10, (3, 539))
    c = image_comparison("treatment", "test_acc", base, base, method="treated", baseline="control",
                         method_predictions=preds, baseline_predictions=preds)
    assert (c.difference, c.ci_low, c.ci_high) == (0.0, 0.0, 0.0)
    assert c.verdict == SAME and c.changed == 0 and c.note == "identical predictions: the method changed nothing"
    assert "identical predictions" in verdict_text(c.as_dict())


def test_zero_width_only_from_identical_values():
    rng = np.random.default_rng(1)
    base = _correct(rng, 3, 400, 0.9)
    method = base.copy()
    method[0, np.flatnonzero(base[0] == 0)[0]] = 1.0  # one image fixed on one seed
    c = image_comparison("treatment", "test_acc", method, base, method="treated", baseline="control")
    assert c.ci_high > c.ci_low and c.note is None


def test_one_image_per_seed_is_not_a_detectable_difference():
    # The seed t-interval called a constant +1 image per seed "better" with a zero-width interval.
    rng = np.random.default_rng(2)
    base = _correct(rng, 3, 539, 0.9)
    method = base.copy()
    for s in range(3):
        method[s, np.flatnonzero(base[s] == 0)[0]] = 1.0
    c = image_comparison("treatment", "test_acc", method, base, method="treated", baseline="control")
    assert c.difference == pytest.approx(1 / 539)
    assert c.verdict == SAME and c.ci_low <= 0 < c.ci_high
    assert c.detectable >= consistent_floor(539) == pytest.approx(4 / 539)
    assert "could detect ±0.7 pts" in verdict_text(c.as_dict())


def test_a_consistent_fix_is_better_and_a_consistent_break_is_worse():
    rng = np.random.default_rng(3)
    base = _correct(rng, 3, 539, 0.9)
    method = base.copy()
    for s in range(3):
        method[s, np.flatnonzero(base[s] == 0)[:25]] = 1.0  # 25 errors fixed on every seed, none broken
    better = image_comparison("revise", "test_acc", method, base, method="fix", baseline="control")
    assert better.verdict == BETTER and better.ci_low > 0 and better.difference == pytest.approx(25 / 539)
    worse = image_comparison("revise", "test_acc", base, method, method="fix", baseline="control")
    assert worse.verdict == WORSE and worse.ci_high < 0
    nll_down = image_comparison("xcr", "clean_nll", 1 - method, 1 - base, method="xcr", baseline="vanilla", higher_is_better=False)
    assert nll_down.difference < 0 and nll_down.verdict == BETTER  # lower is better for an NLL


def test_interval_covers_a_known_difference():
    # Method and baseline share per-image difficulty; the method is right more often by a known margin.
    rng = np.random.default_rng(4)
    hits, trials, n = 0, 150, 500
    true_diff = 0.04
    for t in range(trials):
        difficulty = rng.random(n)
        base = (rng.random((2, n)) > difficulty * 0.2 + 0.05).astype(float)
        method = np.maximum(base, (rng.random((2, n)) < true_diff / 0.15).astype(float) * (base == 0))
        expected = (method - base).mean()  # the realised effect of this sample's images
        c = image_comparison("x", "acc", method, base, method="m", baseline="b", n_boot=400, seed=t)
        hits += c.ci_low <= expected <= c.ci_high
        true_mean = c.difference
    assert hits / trials >= 0.9 and true_mean > 0


def test_baseline_with_one_row_pairs_with_every_seed():
    rng = np.random.default_rng(5)
    base = _correct(rng, 1, 200, 0.8)
    method = np.repeat(base, 3, axis=0)
    c = image_comparison("revise", "test_acc", method, base[0], method="m", baseline="base model")
    assert c.n_seeds == 3 and c.difference == 0 and c.ci_low == c.ci_high == 0


def test_ece_statistic_equals_metrics_ece_on_all_images():
    rng = np.random.default_rng(6)
    n, k = 300, 4
    probs = rng.dirichlet(np.ones(k) * 0.5, size=(2, n))  # [S, N, K]
    labels = rng.integers(0, k, n)
    conf, pred = probs.max(-1), probs.argmax(-1)
    correct = (pred == labels).astype(float)
    c = image_comparison("xcr", "clean_ece", correct, correct[::-1], method="a", baseline="b", statistic="ece",
                         method_confidences=conf, baseline_confidences=conf[::-1], higher_is_better=False, n_boot=200)
    expected = np.mean([expected_calibration_error(probs[s], labels) for s in range(2)])
    assert c.method_value == pytest.approx(expected, abs=1e-12)
    assert c.difference == pytest.approx(0.0, abs=1e-12)


def test_image_comparison_bad_input():
    with pytest.raises(CfdebugError, match="paired by seed"):
        image_comparison("x", "acc", np.ones((3, 5)), np.ones((2, 5)), method="a", baseline="b")
    with pytest.raises(CfdebugError, match="finite"):
        image_comparison("x", "acc", [1.0, float("nan")], [1.0, 0.0], method="a", baseline="b")
    with pytest.raises(CfdebugError, match="n_boot"):
        image_comparison("x", "acc", [1.0, 0.0], [1.0, 0.0], method="a", baseline="b", n_boot=5)
    with pytest.raises(CfdebugError, match="confidences"):
        image_comparison("x", "ece", [1.0, 0.0], [1.0, 0.0], method="a", baseline="b", statistic="ece")


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
    text = format_verdicts(rows + [image_comparison("t", "acc", [1.0], [0.0], method="a", baseline="b")])
    assert "difference [95% CI]" in text and "indicative" in text and "auroc" in text


def test_values_equal_up_to_rounding_are_identical_not_better():
    # a flat Grad-CAM map's share of a region, computed on two models: equal but for the last bits
    base = np.full((1, 300), 36 / 1024)
    method = base * (1 - 1e-15)
    c = image_comparison("revise", "cam_in_region", method, base, method="m", baseline="b", higher_is_better=False)
    assert c.verdict == SAME and c.ci_low == c.ci_high == 0.0 and c.note is not None


def test_one_seed_is_indicative_even_with_an_interval_over_images():
    """One trained seed gives an interval over the test images only: the verdict says it is a hint."""
    rng = np.random.default_rng(4)
    base = _correct(rng, 1, 539, 0.9)
    method = base.copy()
    method[0, np.flatnonzero(base[0] == 0)[:30]] = 1.0
    one = image_comparison("revise", "test_acc", method, base, method="fix", baseline="control")
    assert one.verdict == BETTER and one.indicative
    assert "indicative: one seed" in verdict_text(one.as_dict())
    three = image_comparison("revise", "test_acc", np.repeat(method, 3, 0), np.repeat(base, 3, 0), method="fix", baseline="control")
    assert not three.indicative and "indicative" not in verdict_text(three.as_dict())
