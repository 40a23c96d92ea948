"""Tests for cfdebug.metrics.

Calibration metrics are checked against an independent reference written below as plain Python
loops over samples (no numpy vectorisation), on random inputs and on hand-made edge cases.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from cfdebug import metrics as M
from cfdebug.errors import CfdebugError

# --------------------------------------------------------------------------------------------
# Independent reference implementations: Python loops over samples, plain floats and lists.
# --------------------------------------------------------------------------------------------


def _rows(probs):
    return [[float(v) for v in row] for row in np.asarray(probs).tolist()]


def ref_bin(conf, n_bins):
    """Bins (lo, hi] with lo = b/n, hi = (b+1)/n; confidence 0 in the first bin."""
    if conf == 0.0:
        return 0
    for b in range(n_bins):
        if b / n_bins < conf <= (b + 1) / n_bins:
            return b
    raise AssertionError(f"confidence {conf} outside [0, 1]")


def ref_reliability(probs, labels, n_bins):
    count = [0] * n_bins
    conf_sum = [0.0] * n_bins
    correct_sum = [0.0] * n_bins
    for row, y in zip(_rows(probs), [int(v) for v in labels]):
        conf = max(row)
        pred = row.index(conf)  # first maximum, like argmax
        b = ref_bin(conf, n_bins)
        count[b] += 1
        conf_sum[b] += conf
        correct_sum[b] += 1.0 if pred == y else 0.0
    return count, conf_sum, correct_sum


def ref_ece(probs, labels, n_bins=15):
    count, conf_sum, correct_sum = ref_reliability(probs, labels, n_bins)
    n = sum(count)
    ece = 0.0
    for b in range(n_bins):
        if count[b]:
            acc = correct_sum[b] / count[b]
            conf = conf_sum[b] / count[b]
            ece += count[b] / n * abs(acc - conf)
    return ece


def ref_nll(probs, labels, eps=1e-12):
    total = 0.0
    rows = _rows(probs)
    for row, y in zip(rows, [int(v) for v in labels]):
        total += -math.log(max(row[y], eps))
    return total / len(rows)


def ref_brier(probs, labels):
    total = 0.0
    rows = _rows(probs)
    for row, y in zip(rows, [int(v) for v in labels]):
        for k, p in enumerate(row):
            target = 1.0 if k == y else 0.0
            total += (p - target) ** 2
    return total / len(rows)


def ref_set_agreement(local, global_):
    recall, precision, f1 = [], [], []
    for lrow, grow in zip(np.asarray(local).tolist(), np.asarray(global_).tolist()):
        lset = {i for i, v in enumerate(lrow) if v}
        gset = {i for i, v in enumerate(grow) if v}
        if not gset:
            recall.append(math.nan)
            precision.append(math.nan)
            f1.append(math.nan)
            continue
        inter = len(lset & gset)
        r = inter / len(gset)
        p = inter / len(lset) if lset else 0.0
        recall.append(r)
        precision.append(p)
        f1.append(2 * p * r / (p + r) if p + r > 0 else 0.0)
    return recall, precision, f1


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def random_probs(seed, n, k, scale=3.0):
    rng = np.random.default_rng(seed)
    probs = softmax(rng.normal(size=(n, k)) * scale)
    labels = rng.integers(0, k, size=n)
    return probs, labels


def sample_labels(rng, probs):
    """Draw one label per row from the categorical distribution in that row."""
    u = rng.random(probs.shape[0])[:, None]
    return np.minimum((u > np.cumsum(probs, axis=1)).sum(axis=1), probs.shape[1] - 1)


def raises(message):
    return pytest.raises(CfdebugError, match="^" + re.escape(message) + "$")


# --------------------------------------------------------------------------------------------
# Calibration vs the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [2, 3, 10, 100])
@pytest.mark.parametrize("n_bins", [1, 5, 15])
def test_calibration_matches_reference_on_random_inputs(seed, k, n_bins):
    # Mix sharp and flat rows so many bins are populated.
    probs, labels = random_probs(seed * 100 + k, 150, k, scale=1.0 + seed * 2.0)
    # Make some predictions correct so accuracy is not near 1/K everywhere.
    labels[::3] = probs[::3].argmax(axis=1)
    assert M.expected_calibration_error(probs, labels, n_bins) == pytest.approx(
        ref_ece(probs, labels, n_bins), abs=1e-12
    )
    assert M.negative_log_likelihood(probs, labels) == pytest.approx(
        ref_nll(probs, labels), rel=1e-12
    )
    assert M.brier_score(probs, labels) == pytest.approx(ref_brier(probs, labels), rel=1e-12)

    rb = M.reliability_bins(probs, labels, n_bins)
    count, conf_sum, correct_sum = ref_reliability(probs, labels, n_bins)
    assert rb["count"].dtype == np.int64
    assert rb["count"].tolist() == count
    for b in range(n_bins):
        assert rb["bin_lower"][b] == b / n_bins
        assert rb["bin_upper"][b] == (b + 1) / n_bins
        if count[b]:
            assert rb["accuracy"][b] == pytest.approx(correct_sum[b] / count[b], abs=1e-12)
            assert rb["confidence"][b] == pytest.approx(conf_sum[b] / count[b], abs=1e-12)
        else:
            assert math.isnan(rb["accuracy"][b]) and math.isnan(rb["confidence"][b])


def test_default_bins_is_15_and_torch_input_matches_numpy():
    probs, labels = random_probs(7, 300, 10)
    probs32 = probs.astype(np.float32)
    t_probs, t_labels = torch.from_numpy(probs32), torch.from_numpy(labels)
    assert len(M.reliability_bins(probs, labels)["count"]) == 15
    assert M.expected_calibration_error(probs, labels) == pytest.approx(
        ref_ece(probs, labels, 15), abs=1e-12
    )
    for fn in (M.expected_calibration_error, M.negative_log_likelihood, M.brier_score):
        out_t = fn(t_probs, t_labels)
        assert isinstance(out_t, float)
        assert out_t == pytest.approx(fn(probs32, labels), abs=1e-12)


def test_all_correct_with_confidence_one():
    labels = np.array([0, 2, 1, 2])
    probs = np.eye(3)[labels]
    assert M.expected_calibration_error(probs, labels) == 0.0
    assert M.brier_score(probs, labels) == 0.0
    assert M.negative_log_likelihood(probs, labels) == 0.0
    rb = M.reliability_bins(probs, labels)
    assert rb["count"][-1] == 4 and rb["count"].sum() == 4
    assert rb["accuracy"][-1] == 1.0 and rb["confidence"][-1] == 1.0


def test_all_wrong_with_confidence_one():
    labels = np.array([0, 2, 1, 2])
    probs = np.eye(3)[(labels + 1) % 3]
    assert M.expected_calibration_error(probs, labels) == 1.0
    # Brier reaches its maximum 2 with confident wrong predictions.
    assert M.brier_score(probs, labels) == 2.0
    assert M.negative_log_likelihood(probs, labels, eps=1e-12) == pytest.approx(
        -math.log(1e-12)
    )
    assert math.isinf(M.negative_log_likelihood(probs, labels, eps=0.0))


def test_everything_in_one_bin():
    # Confidences 0.62..0.65 all lie in bin 9 = (9/15, 10/15] = (0.6, 0.667].
    conf = np.array([0.62, 0.64, 0.65, 0.63])
    probs = np.stack([conf, 1 - conf], axis=1)
    labels = np.array([0, 0, 1, 0])  # 3 of 4 correct
    expected = abs(0.75 - conf.mean())  # 0.115
    assert M.expected_calibration_error(probs, labels) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.115)
    rb = M.reliability_bins(probs, labels)
    assert np.flatnonzero(rb["count"]).tolist() == [9]
    assert rb["accuracy"][9] == 0.75
    assert np.isnan(np.delete(rb["accuracy"], 9)).all()
    # One bin over [0, 1]: ECE is |accuracy - mean confidence| for any input.
    probs2, labels2 = random_probs(3, 50, 4)
    acc = np.mean(probs2.argmax(1) == labels2)
    assert M.expected_calibration_error(probs2, labels2, n_bins=1) == pytest.approx(
        abs(acc - probs2.max(1).mean()), abs=1e-12
    )


def test_confidence_exactly_on_a_bin_edge_goes_in_the_lower_bin():
    # n_bins=10: 0.6 is the edge between bin 5 (0.5, 0.6] and bin 6 (0.6, 0.7].
    probs = np.array([[0.6, 0.4], [0.5, 0.5], [1.0, 0.0], [0.7, 0.3]])
    labels = np.array([0, 0, 0, 1])
    rb = M.reliability_bins(probs, labels, n_bins=10)
    assert rb["count"][5] == 1  # 0.6
    assert rb["count"][4] == 1  # 0.5 -> (0.4, 0.5]
    assert rb["count"][9] == 1  # 1.0 -> (0.9, 1.0]
    assert rb["count"][6] == 1  # 0.7 -> (0.6, 0.7]
    assert M.expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(
        ref_ece(probs, labels, 10), abs=1e-15
    )
    # n_bins=15 edge 7/15 with K=3.
    probs15 = np.array([[7 / 15, 4 / 15, 4 / 15]])
    assert M.reliability_bins(probs15, [0])["count"][6] == 1
    assert ref_bin(7 / 15, 15) == 6
    # Confidence 0 (not reachable from a softmax) is documented to go in the first bin.
    from cfdebug.metrics.calibration import bin_index

    assert bin_index(np.array([0.0, 1e-9, 1.0]), 15).tolist() == [0, 0, 14]


def test_single_sample():
    probs = np.array([[0.7, 0.2, 0.1]])
    assert M.expected_calibration_error(probs, [0]) == pytest.approx(0.3)
    assert M.expected_calibration_error(probs, [1]) == pytest.approx(0.7)
    assert M.brier_score(probs, [0]) == pytest.approx(0.09 + 0.04 + 0.01)
    assert M.brier_score(probs, [2]) == pytest.approx(0.49 + 0.04 + 0.81)
    assert M.negative_log_likelihood(probs, [0]) == pytest.approx(-math.log(0.7))


@pytest.mark.parametrize("seed", range(5))
def test_brier_in_range(seed):
    probs, labels = random_probs(seed, 200, 5, scale=5.0)
    assert 0.0 <= M.brier_score(probs, labels) <= 2.0
    for i in range(20):
        assert 0.0 <= M.brier_score(probs[i : i + 1], labels[i : i + 1]) <= 2.0


# --------------------------------------------------------------------------------------------
# The streaming calibration accumulator
# --------------------------------------------------------------------------------------------


def _functional(probs, labels, n_bins):
    return {
        "accuracy": float(np.mean(probs.argmax(1) == labels)),
        "ece": M.expected_calibration_error(probs, labels, n_bins),
        "nll": M.negative_log_likelihood(probs, labels),
        "brier": M.brier_score(probs, labels),
        "bins": M.reliability_bins(probs, labels, n_bins),
    }


def _assert_same(got, want, tol):
    for key in ("accuracy", "ece", "nll", "brier"):
        assert isinstance(got[key], float)
        assert got[key] == pytest.approx(want[key], rel=tol, abs=tol), key
    for key in ("bin_lower", "bin_upper", "count"):
        np.testing.assert_array_equal(got["bins"][key], want["bins"][key])
    assert got["bins"]["count"].dtype == np.int64
    for key in ("accuracy", "confidence"):
        np.testing.assert_allclose(got["bins"][key], want["bins"][key], rtol=tol, atol=tol, equal_nan=True)


def test_accumulator_one_update_equals_the_functions_exactly():
    probs, labels = random_probs(3, 200, 10, scale=2.0)
    acc = M.CalibrationAccumulator(15)
    acc.update(probs, labels)
    _assert_same(acc.compute(), _functional(probs, labels, 15), tol=0.0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_accumulator_over_random_chunks_equals_the_functions_on_the_concatenation(seed):
    rng = np.random.default_rng(seed)
    n, k, n_bins = 500, int(rng.integers(2, 20)), int(rng.integers(1, 20))
    probs, labels = random_probs(seed, n, k, scale=1.0 + seed)
    labels[::2] = probs[::2].argmax(1)  # many correct predictions, so the bins' accuracies vary
    cuts = np.sort(rng.choice(np.arange(1, n), size=7, replace=False))
    acc = M.CalibrationAccumulator(n_bins)
    for part_p, part_y in zip(np.split(probs, cuts), np.split(labels, cuts)):
        acc.update(torch.from_numpy(part_p).float() if seed % 2 else part_p, part_y)
    want = _functional(probs.astype(np.float32) if seed % 2 else probs, labels, n_bins)
    _assert_same(acc.compute(), want, tol=1e-12)


def test_accumulator_merge_pools_like_one_stream():
    probs, labels = random_probs(5, 300, 4)
    one, a, b = M.CalibrationAccumulator(10), M.CalibrationAccumulator(10), M.CalibrationAccumulator(10)
    one.update(probs, labels)
    a.update(probs[:120], labels[:120])
    b.update(probs[120:], labels[120:])
    fresh = M.CalibrationAccumulator(10)
    chained = fresh.merge(a).merge(b)  # merge returns the accumulator it adds to
    assert chained is fresh and chained.n == 300
    _assert_same(chained.compute(), one.compute(), tol=1e-12)
    assert a.n == 120 and b.n == 180  # the merged accumulators are not changed
    _assert_same(a.merge(b).compute(), one.compute(), tol=1e-12)
    with pytest.raises(CfdebugError, match="^Expected a CalibrationAccumulator with n_bins=10 to merge, but got "):
        a.merge(M.CalibrationAccumulator(15))


def test_accumulator_reset_validation_and_inputs_untouched():
    probs, labels = random_probs(6, 50, 3)
    before = probs.copy()
    acc = M.CalibrationAccumulator()
    assert acc.n_bins == 15
    with raises("Expected at least one sample in the calibration accumulator, but got none (call update first)"):
        acc.compute()
    acc.update(probs, labels)
    np.testing.assert_array_equal(probs, before)
    acc.reset()
    with pytest.raises(CfdebugError, match="at least one sample"):
        acc.compute()
    with raises("Expected `n_bins` to be a positive integer, but got 0"):
        M.CalibrationAccumulator(0)
    with pytest.raises(CfdebugError, match="rows summing to 1"):
        acc.update(probs * 0.5, labels)
    with pytest.raises(CfdebugError, match="n_bins=15"):
        acc.merge(M.CalibrationAccumulator(10))


# --------------------------------------------------------------------------------------------
# Temperature scaling
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_temperature_recovers_overconfidence_factor(seed):
    # Labels drawn from softmax(z) make z calibrated; 3z is over-confident by T = 3.
    # Tolerance: |T - 3| <= 0.1 (N = 20000 gives a spread of about +-0.03 over seeds).
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(20000, 10)) * 2.0
    labels = sample_labels(rng, softmax(z))
    logits = 3.0 * z
    T = M.fit_temperature(logits, labels)
    assert isinstance(T, float)
    assert abs(T - 3.0) <= 0.1
    before = M.negative_log_likelihood(softmax(logits), labels)
    after = M.negative_log_likelihood(M.apply_temperature(logits, T), labels)
    assert after <= before
    # And it beats any nearby temperature on this data.
    for other in (T * 0.9, T * 1.1):
        assert after <= M.negative_log_likelihood(M.apply_temperature(logits, other), labels)


def test_fit_temperature_is_deterministic_and_accepts_torch():
    rng = np.random.default_rng(11)
    z = rng.normal(size=(2000, 5))
    labels = sample_labels(rng, softmax(z))
    t1 = M.fit_temperature(0.5 * z, labels)
    t2 = M.fit_temperature(0.5 * z, labels)
    assert t1 == t2
    assert abs(t1 - 0.5) < 0.1  # under-confident logits give T < 1
    t3 = M.fit_temperature(torch.from_numpy(0.5 * z), torch.from_numpy(labels))
    assert t3 == pytest.approx(t1, rel=1e-9)


def test_fit_temperature_hits_lower_bound_on_separable_logits():
    logits = np.array([[5.0, 0.0], [0.0, 5.0], [4.0, 1.0]])
    T = M.fit_temperature(logits, [0, 1, 0], bounds=(0.1, 10.0))
    assert T == pytest.approx(0.1, rel=1e-3)


def test_apply_temperature():
    z = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    p1 = M.apply_temperature(z, 1.0)
    np.testing.assert_allclose(p1, softmax(z), rtol=1e-12)
    p2 = M.apply_temperature(z, 2.0)
    np.testing.assert_allclose(p2, softmax(z / 2.0), rtol=1e-12)
    np.testing.assert_allclose(p2.sum(axis=1), 1.0)
    np.testing.assert_allclose(p2[1], [1 / 3] * 3)
    assert p2[0].max() < p1[0].max()  # T > 1 softens
    # float32 in, float32 out; tensors and tensor temperatures accepted.
    p32 = M.apply_temperature(torch.tensor(z, dtype=torch.float32), torch.tensor(2.0))
    assert isinstance(p32, np.ndarray) and p32.dtype == np.float32
    np.testing.assert_allclose(p32, p2, rtol=1e-6)
    # Extreme logits stay finite.
    big = M.apply_temperature(np.array([[1000.0, -1000.0]]), 0.01)
    assert np.isfinite(big).all() and big[0, 0] == 1.0


# --------------------------------------------------------------------------------------------
# Explanation metrics
# --------------------------------------------------------------------------------------------

PROBS_FULL = np.array(
    [
        [0.7, 0.2, 0.1],  # c = 0, Y_c = 0.7
        [0.5, 0.4, 0.1],  # c = 0, Y_c = 0.5
        [0.2, 0.3, 0.5],  # c = 2, Y_c = 0.5
        [0.6, 0.3, 0.1],  # c = 0, Y_c = 0.6
    ]
)
PROBS_MASKED = np.array(
    [
        [0.35, 0.5, 0.15],  # O_c = 0.35, argmax 1 (changed), drop 0.35/0.7 = 0.5
        [0.6, 0.3, 0.1],  # O_c = 0.6 > 0.5: increase, drop 0
        [0.2, 0.3, 0.5],  # unchanged: no drop, no increase
        [0.3, 0.3, 0.4],  # O_c = 0.3, argmax 2 (changed), drop 0.3/0.6 = 0.5
    ]
)


def test_explanation_metrics_hand_computed():
    expected = {
        "fidelity": 0.5,  # rows 1 and 2 keep their class
        "avg_drop": (0.5 + 0.0 + 0.0 + 0.5) / 4,
        "avg_inc": 0.25,  # only row 1; the equal row 2 does not count
        "sufficiency": (0.35 - 0.1 + 0.0 + 0.3) / 4,  # 0.1375
    }
    out = M.explanation_metrics(PROBS_FULL, PROBS_MASKED)
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-12), key
        assert isinstance(out[key], float)
    assert M.fidelity(PROBS_FULL, PROBS_MASKED) == pytest.approx(expected["fidelity"])
    assert M.average_drop(PROBS_FULL, PROBS_MASKED) == pytest.approx(expected["avg_drop"])
    assert M.average_increase(PROBS_FULL, PROBS_MASKED) == pytest.approx(expected["avg_inc"])
    assert M.sufficiency(PROBS_FULL, PROBS_MASKED) == pytest.approx(expected["sufficiency"])


def test_explanation_metrics_identity_and_torch():
    out = M.explanation_metrics(torch.tensor(PROBS_FULL), torch.tensor(PROBS_FULL))
    assert out == {"fidelity": 1.0, "avg_drop": 0.0, "avg_inc": 0.0, "sufficiency": 0.0}
    # Masking that wipes out the predicted class: drop 1, sufficiency = mean Y_c.
    wiped = np.array([[0.0, 0.5, 0.5]])
    out = M.explanation_metrics(np.array([[0.8, 0.1, 0.1]]), wiped)
    assert out["avg_drop"] == 1.0 and out["fidelity"] == 0.0
    assert out["sufficiency"] == pytest.approx(0.8)


# --------------------------------------------------------------------------------------------
# Error detection
# --------------------------------------------------------------------------------------------


def test_error_detection_hand_computed():
    scores = np.array([0.9, 0.6, 0.7, 0.4, 0.6])
    is_error = np.array([False, False, True, True, False])
    # Correct {0.9, 0.6, 0.6} vs errors {0.7, 0.4}: pairs won 1,1,0,1,0,1 -> 4/6.
    # AUPR-Err (errors positive, ranked by -score, i.e. lowest score first):
    #   threshold 0.4: P=1, R=1/2; 0.6: P=1/3, R=1/2; 0.7: P=2/4, R=1; 0.9: P=2/5, R=1
    #   AP = 1/2*1 + 0 + 1/2*1/2 + 0 = 0.75
    out = M.error_detection_scores(scores, is_error)
    assert out["auroc"] == pytest.approx(4 / 6)
    assert out["aupr_err"] == pytest.approx(0.75)
    # A tie between a correct and a wrong prediction counts 1/2: errors {0.7, 0.6} -> 3/6.
    scores_tie = np.array([0.9, 0.6, 0.7, 0.6, 0.6])
    assert M.error_detection_scores(scores_tie, is_error)["auroc"] == pytest.approx(0.5)


def test_error_detection_perfect_and_reversed():
    is_error = torch.tensor([1, 0, 1, 0, 0])
    perfect = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.7])
    out = M.error_detection_scores(perfect, is_error)
    assert out == {"auroc": 1.0, "aupr_err": 1.0}
    assert M.error_detection_scores(-perfect, is_error)["auroc"] == 0.0


# --------------------------------------------------------------------------------------------
# Set agreement
# --------------------------------------------------------------------------------------------


def test_set_agreement_hand_made():
    local = np.array(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [0, 0, 0, 0, 0],  # |L| = 0, |G| > 0
            [1, 0, 0, 0, 0],  # |G| = 0
            [0, 0, 0, 0, 0],  # both empty
            [0, 0, 0, 1, 1],  # disjoint
        ],
        dtype=bool,
    )
    global_ = np.array(
        [
            [1, 0, 1, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
        ],
        dtype=bool,
    )
    out = M.set_agreement(local, global_)
    nan = math.nan
    np.testing.assert_allclose(out["recall"], [0.5, 1.0, 0.0, nan, nan, 0.0])
    np.testing.assert_allclose(out["precision"], [0.5, 2 / 3, 0.0, nan, nan, 0.0])
    np.testing.assert_allclose(out["f1"], [0.5, 0.8, 0.0, nan, nan, 0.0])
    for v in out.values():
        assert v.dtype == np.float64 and v.shape == (6,)


def test_set_agreement_broadcasts_a_shared_global_set():
    local = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 0, 0]])
    global_ = torch.tensor([True, False, True, False])
    out = M.set_agreement(local, global_)
    np.testing.assert_allclose(out["recall"], [0.5, 0.5, 0.5])
    np.testing.assert_allclose(out["precision"], [0.5, 0.5, 1.0])
    np.testing.assert_allclose(out["f1"], [0.5, 0.5, 2 / 3])
    assert np.isnan(M.set_agreement(local, torch.zeros(4, dtype=torch.bool))["f1"]).all()


@pytest.mark.parametrize("seed", range(4))
def test_set_agreement_matches_naive_loop(seed):
    rng = np.random.default_rng(seed)
    n, c = 300, 16
    density = rng.uniform(0.0, 0.4, size=(n, 1))  # low densities give empty sets
    local = rng.random((n, c)) < density
    global_ = rng.random((n, c)) < rng.uniform(0.0, 0.4, size=(n, 1))
    assert (~global_.any(axis=1)).any() and (~local.any(axis=1)).any()
    out = M.set_agreement(local, global_)
    recall, precision, f1 = ref_set_agreement(local, global_)
    np.testing.assert_allclose(out["recall"], recall, rtol=1e-12)
    np.testing.assert_allclose(out["precision"], precision, rtol=1e-12)
    np.testing.assert_allclose(out["f1"], f1, rtol=1e-12)
    shared = global_[0] | global_[1]
    out_b = M.set_agreement(local, shared)
    ref_b = ref_set_agreement(local, np.broadcast_to(shared, local.shape))
    np.testing.assert_allclose(out_b["f1"], ref_b[2], rtol=1e-12)


# --------------------------------------------------------------------------------------------
# Per-class metrics
# --------------------------------------------------------------------------------------------


def test_per_class_hand_made():
    pred = [0, 1, 1, 2, 0, 2]
    labels = [0, 1, 2, 2, 0, 1]
    cm = M.confusion_matrix(pred, labels, 4)
    assert cm.dtype == np.int64
    assert cm.tolist() == [[2, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    np.testing.assert_allclose(M.per_class_recall(pred, labels, 4), [1.0, 0.5, 0.5, math.nan])
    assert M.accuracy(pred, labels) == pytest.approx(4 / 6)
    assert M.accuracy(torch.tensor(labels), torch.tensor(labels)) == 1.0
    assert M.confusion_matrix([], [], 3).tolist() == [[0] * 3] * 3


@pytest.mark.parametrize("seed", range(3))
def test_per_class_matches_naive_loop(seed):
    rng = np.random.default_rng(seed)
    k = 7
    labels = rng.integers(0, k - 1, size=500)  # class k-1 never occurs
    pred = np.where(rng.random(500) < 0.6, labels, rng.integers(0, k, size=500))
    cm = M.confusion_matrix(torch.from_numpy(pred), torch.from_numpy(labels), k)
    ref = [[0] * k for _ in range(k)]
    for p, y in zip(pred.tolist(), labels.tolist()):
        ref[y][p] += 1
    assert cm.tolist() == ref
    recall = M.per_class_recall(pred, labels, k)
    for i in range(k):
        if sum(ref[i]):
            assert recall[i] == pytest.approx(ref[i][i] / sum(ref[i]))
        else:
            assert math.isnan(recall[i])
    assert M.accuracy(pred, labels) == pytest.approx(sum(ref[i][i] for i in range(k)) / 500)


def test_prediction_churn_hand_made():
    labels = [0, 0, 1, 1, 2, 2]
    before = [0, 1, 1, 0, 2, 1]  # right, wrong, right, wrong, right, wrong
    after = [0, 0, 2, 1, 2, 1]  # right, right (fixed), wrong (broken), right (fixed), right, wrong (still)
    out = M.prediction_churn(before, after, labels, 3)
    assert out["fixed"].tolist() == [1, 3] and out["broken"].tolist() == [2]
    assert out["fixed"].dtype == np.int64 and out["confusion_delta"].dtype == np.int64
    # rows true class: class 0 gains a right answer (1→0), class 1 moves one image 0→1 and one 1→2
    assert out["confusion_delta"].tolist() == [[1, -1, 0], [-1, 0, 1], [0, 0, 0]]
    same = M.prediction_churn(before, before, labels, 3)
    assert same["fixed"].size == same["broken"].size == 0 and not same["confusion_delta"].any()
    assert M.prediction_churn([], [], [], 2)["confusion_delta"].tolist() == [[0, 0], [0, 0]]


@pytest.mark.parametrize("seed", range(3))
def test_prediction_churn_matches_a_naive_loop(seed):
    rng = np.random.default_rng(seed)
    labels, before, after = (rng.integers(0, 5, size=200) for _ in range(3))
    out = M.prediction_churn(torch.from_numpy(before), after, labels, 5)
    assert out["fixed"].tolist() == [i for i in range(200) if before[i] != labels[i] and after[i] == labels[i]]
    assert out["broken"].tolist() == [i for i in range(200) if before[i] == labels[i] and after[i] != labels[i]]
    delta = np.zeros((5, 5), int)
    for y, b, a in zip(labels, before, after):
        delta[y, a] += 1
        delta[y, b] -= 1
    assert out["confusion_delta"].tolist() == delta.tolist()
    # the delta's rows sum to 0 (every image keeps its true class); its diagonal is fixed − broken per class
    assert not out["confusion_delta"].sum(1).any()
    per_class = np.bincount(labels[out["fixed"]], minlength=5) - np.bincount(labels[out["broken"]], minlength=5)
    assert np.diag(out["confusion_delta"]).tolist() == per_class.tolist()


def test_prediction_churn_refuses_mismatched_inputs():
    with raises("Expected `after` to have N=3 entries in 0..K-1, but got 2 entries"):
        M.prediction_churn([0, 1, 1], [0, 1], [0, 1, 1], 2)
    with raises("Expected `before` to have N=2 entries in 0..K-1, but got values in [0, 3] (K=2)"):
        M.prediction_churn([0, 3], [0, 1], [0, 1], 2)


# --------------------------------------------------------------------------------------------
# Validation messages
# --------------------------------------------------------------------------------------------

P3 = np.full((5, 3), 1 / 3)
Y5 = np.array([0, 1, 2, 0, 1])


@pytest.mark.parametrize("fn", [M.expected_calibration_error, M.reliability_bins])
@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "15"])
def test_n_bins_validation(fn, bad):
    with raises(f"Expected `n_bins` to be a positive integer, but got {bad!r}"):
        fn(P3, Y5, n_bins=bad)


@pytest.mark.parametrize(
    "fn",
    [M.expected_calibration_error, M.negative_log_likelihood, M.brier_score, M.reliability_bins],
)
def test_calibration_probs_and_labels_validation(fn):
    with raises("Expected `probs` to have shape [N, K] with rows summing to 1, but got shape (3,)"):
        fn(np.array([0.2, 0.3, 0.5]), [0, 1, 2])
    with raises(
        "Expected `probs` to have shape [N, K] with rows summing to 1, but got shape (0, 3)"
    ):
        fn(np.zeros((0, 3)), [])
    with raises(
        "Expected `probs` to have shape [N, K] with rows summing to 1, but got row sums in "
        "[0.6, 1.5] (pass softmax outputs, not logits)"
    ):
        fn(np.array([[0.5, 0.5, 0.5], [0.2, 0.2, 0.2]]), [0, 1])
    with raises(
        "Expected `probs` to hold probabilities in [0, 1], but got values in [-0.5, 1.5] "
        "(pass softmax outputs, not logits)"
    ):
        fn(np.array([[1.5, -0.5]]), [0])
    with raises(
        "Expected `probs` to have shape [N, K] with rows summing to 1, but got NaN or "
        "infinite values"
    ):
        fn(np.array([[np.nan, 0.5]]), [0])
    with raises("Expected `labels` to have N=5 entries in 0..K-1, but got 4 entries"):
        fn(P3, Y5[:4])
    with raises("Expected `labels` to have N=5 entries in 0..K-1, but got values in [0, 3] (K=3)"):
        fn(P3, np.array([0, 1, 2, 3, 0]))
    with raises("Expected `labels` to have N=5 entries in 0..K-1, but got values in [-1, 2] (K=3)"):
        fn(P3, torch.tensor([0, 1, 2, -1, 0]))
    with raises(
        "Expected `labels` to have N=5 entries in 0..K-1, but got dtype float64 "
        "(class indices must be integers)"
    ):
        fn(P3, Y5.astype(float))
    with raises("Expected `labels` to have N=5 entries in 0..K-1, but got shape (5, 1)"):
        fn(P3, Y5[:, None])
    with raises("Expected `probs` to be a torch.Tensor or numpy array, but got str"):
        fn("probs", Y5)


def test_nll_eps_validation():
    with raises("Expected `eps` to be a float in [0, 1), but got -1.0"):
        M.negative_log_likelihood(P3, Y5, eps=-1.0)
    with raises("Expected `eps` to be a float in [0, 1), but got nan"):
        M.negative_log_likelihood(P3, Y5, eps=float("nan"))


def test_temperature_validation():
    z = np.zeros((5, 3))
    for bad in (0, -1.0, float("inf"), "2"):
        with raises(f"Expected `T` to be a positive finite number, but got {bad!r}"):
            M.apply_temperature(z, bad)
    with raises("Expected `logits` to have shape [N, K] with N, K >= 1, but got shape (5,)"):
        M.apply_temperature(np.zeros(5), 1.0)
    with raises("Expected `logits` to be finite, but got NaN or infinite values"):
        M.fit_temperature(np.array([[0.0, np.inf]]), [0])
    with raises("Expected `labels` to have N=5 entries in 0..K-1, but got 4 entries"):
        M.fit_temperature(z, Y5[:4])
    with raises(
        "Expected `bounds` to be a pair (T_min, T_max) with 0 < T_min < T_max, but got (2.0, 1.0)"
    ):
        M.fit_temperature(z, Y5, bounds=(2.0, 1.0))
    with raises("Expected `tol` to be a positive float, but got 0"):
        M.fit_temperature(z, Y5, tol=0)


def test_explanation_validation():
    with raises(
        "Expected `probs_masked` to have the same shape as `probs_full` (4, 3), but got (4, 2)"
    ):
        M.explanation_metrics(PROBS_FULL, np.full((4, 2), 0.5))
    with raises(
        "Expected `probs_full` to have shape [N, K] with rows summing to 1, but got shape (3,)"
    ):
        M.fidelity(np.array([0.2, 0.3, 0.5]), PROBS_MASKED)
    for fn in (M.average_drop, M.average_increase, M.sufficiency):
        with raises(
            "Expected `probs_masked` to have shape [N, K] with rows summing to 1, but got row "
            "sums in [0.5, 0.5] (pass softmax outputs, not logits)"
        ):
            fn(PROBS_FULL, 0.5 * PROBS_MASKED)


def test_error_detection_validation():
    needs = "needs at least one error and one correct prediction"
    with pytest.raises(CfdebugError, match=needs) as info:
        M.error_detection_scores([0.1, 0.2, 0.3], [False, False, False])
    assert str(info.value).endswith("but got 0 errors and 3 correct")
    with pytest.raises(CfdebugError, match=needs):
        M.error_detection_scores([0.1, 0.2], [1, 1])
    with raises(
        "Expected `is_error` to be a boolean array of shape [N] with N=3, but got shape (2,)"
    ):
        M.error_detection_scores([0.1, 0.2, 0.3], [True, False])
    with raises(
        "Expected `is_error` to be a boolean array of shape [N] with N=3, but got values other "
        "than 0 and 1"
    ):
        M.error_detection_scores([0.1, 0.2, 0.3], [0, 1, 2])
    with raises("Expected `scores` to be finite, but got NaN or infinite values"):
        M.error_detection_scores([0.1, np.nan, 0.3], [0, 1, 0])
    with raises(
        "Expected `scores` to be a float array of shape [N] with N >= 1, but got shape (3, 1) "
        "and dtype float64"
    ):
        M.error_detection_scores(np.zeros((3, 1)), [0, 1, 0])


def test_set_agreement_validation():
    with raises("Expected `local` to be a boolean array of shape [N, C], but got shape (3,)"):
        M.set_agreement(np.ones(3, dtype=bool), np.ones(3, dtype=bool))
    with raises(
        "Expected `global_` to be a boolean array of shape [N, C]=(4, 8) or [C]=(8,), but got "
        "shape (4, 7)"
    ):
        M.set_agreement(np.ones((4, 8), dtype=bool), np.ones((4, 7), dtype=bool))
    with raises(
        "Expected `local` to be a boolean array of shape [N, C], but got values other than 0 and 1"
    ):
        M.set_agreement(np.full((2, 3), 0.7), np.ones(3, dtype=bool))


def test_per_class_validation():
    with raises("Expected `n_classes` to be a positive integer, but got 0"):
        M.confusion_matrix([0], [0], 0)
    with raises("Expected `pred` to have N=5 entries in 0..K-1, but got 4 entries"):
        M.per_class_recall(Y5[:4], Y5, 3)
    with raises("Expected `labels` to have N entries in 0..K-1, but got values in [0, 2] (K=2)"):
        M.confusion_matrix(Y5, Y5, 2)
    with raises("Expected `labels` to have N integer entries, but got 0 entries"):
        M.accuracy([], [])
    with raises("Expected `pred` to have N=5 integer entries, but got 6 entries"):
        M.accuracy(np.zeros(6, dtype=int), Y5)


# --------------------------------------------------------------------------------------------
# Inputs are not mutated
# --------------------------------------------------------------------------------------------


def test_inputs_are_not_mutated():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(40, 4))
    probs = softmax(logits)
    masked = softmax(rng.normal(size=(40, 4)))
    labels = rng.integers(0, 4, size=40)
    labels[:20] = probs[:20].argmax(1)
    scores = probs.max(1)
    is_error = probs.argmax(1) != labels
    local = rng.random((40, 6)) < 0.5
    global_ = rng.random((40, 6)) < 0.5
    arrays = [logits, probs, masked, labels, scores, is_error, local, global_]
    tensors = [torch.from_numpy(a.copy()) for a in arrays]
    for args in (arrays, tensors):
        lg, pr, ms, lb, sc, ie, lo, gl = args
        snapshot = [a.clone() if isinstance(a, torch.Tensor) else a.copy() for a in args]
        M.expected_calibration_error(pr, lb)
        M.negative_log_likelihood(pr, lb)
        M.brier_score(pr, lb)
        M.reliability_bins(pr, lb)
        M.fit_temperature(lg, lb)
        M.apply_temperature(lg, 2.0)
        M.explanation_metrics(pr, ms)
        M.fidelity(pr, ms)
        M.average_drop(pr, ms)
        M.average_increase(pr, ms)
        M.sufficiency(pr, ms)
        M.error_detection_scores(sc, ie)
        M.set_agreement(lo, gl)
        M.set_agreement(lo, gl[0])
        M.per_class_recall(lb, lb, 4)
        M.confusion_matrix(lb, lb, 4)
        M.accuracy(lb, lb)
        for before, after in zip(snapshot, args):
            if isinstance(after, torch.Tensor):
                assert torch.equal(before, after)
            else:
                np.testing.assert_array_equal(before, after)
    # Outputs do not alias inputs either.
    rb = M.reliability_bins(probs, labels)
    rb["count"][:] = 0
    assert M.reliability_bins(probs, labels)["count"].sum() == 40


def test_accumulator_keeps_each_image_terms_whose_means_are_the_metrics():
    from cfdebug.metrics import CalibrationAccumulator

    rng = np.random.default_rng(11)
    probs = rng.dirichlet(np.ones(4), size=50)
    labels = rng.integers(0, 4, 50)
    acc = CalibrationAccumulator(keep_images=True)
    acc.update(probs[:20], labels[:20])
    acc.update(probs[20:], labels[20:])
    terms, summary = acc.images(), acc.compute()
    assert terms["correct"].mean() == pytest.approx(summary["accuracy"])
    assert terms["nll"].mean() == pytest.approx(summary["nll"]) and terms["brier"].mean() == pytest.approx(summary["brier"])
    assert np.array_equal(terms["prediction"], probs.argmax(1)) and np.allclose(terms["confidence"], probs.max(1))
    with pytest.raises(CfdebugError, match="keep_images"):
        CalibrationAccumulator().images()
