"""Agreement, the flag rule and Table 1 on hand-made sets; the whole stage on the demo."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from cfdebug.cfe import mc_heads
from cfdebug.detect import (
    DetectConfig,
    ablation,
    ablation_arrays,
    agreement,
    agreement_margin,
    class_thresholds,
    combined_score,
    detect_arrays,
    flag_predictions,
    run_detection,
    table1_row,
)
from cfdebug.errors import CfdebugError
from cfdebug.mcfilters import GlobalFilters, global_mc_filters

# Five test images over four filters; class 2 has an empty global set.
G = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], bool)
LOCAL = np.array([[1, 1, 0, 0], [1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], bool)
PRED = np.array([0, 1, 1, 2, 0])
CONF = np.array([0.9, 0.95, 0.8, 0.3, 0.2])
IS_ERROR = np.array([True, False, False, True, False])


def test_agreement_by_hand():
    a = agreement(LOCAL, PRED, G)
    np.testing.assert_allclose(a["recall"], [0.5, 0.5, 0.0, np.nan, 1.0])
    np.testing.assert_allclose(a["precision"], [1.0, 1 / 3, 0.0, np.nan, 1.0])
    np.testing.assert_allclose(a["f1"], [2 / 3, 0.4, 0.0, np.nan, 1.0])


def test_flag_rule_by_hand():
    recall = agreement(LOCAL, PRED, G)["recall"]
    thresholds = np.array([0.6, 0.6, 0.3])
    skip = flag_predictions(recall, PRED, CONF, thresholds, 0.9)
    np.testing.assert_array_equal(skip["checked"], [True, False, True, True, True])  # conf = 0.9 is checked
    np.testing.assert_array_equal(skip["unscorable"], [False, False, False, True, False])
    np.testing.assert_array_equal(skip["flagged"], [True, False, True, False, False])
    for everything in (0.0, 1.0):  # 0 disables skipping; 1 checks every confidence too
        np.testing.assert_array_equal(flag_predictions(recall, PRED, CONF, thresholds, everything)["flagged"], [True, True, True, False, False])
    fixed = flag_predictions(recall, PRED, CONF, 0.3, 0.0)["flagged"]  # the "Recall < 0.3" row
    np.testing.assert_array_equal(fixed, [False, False, True, False, False])
    row = table1_row("avg_recall", skip, IS_ERROR, 0.9, 0.15, "class mean")
    assert (row["errors_detected"], row["errors_detected_pct"], row["new_errors"]) == (1, 50.0, 1)
    assert (row["flagged"], row["checked"], row["unscorable"]) == (2, 4, 1)
    with pytest.raises(CfdebugError, match="Expected `skip_threshold`"):
        flag_predictions(recall, PRED, CONF, thresholds, 1.5)


def test_class_thresholds_by_hand():
    metric = np.array([0.5, np.nan, 1.0, 0.2, 0.4])
    pred = np.array([0, 0, 0, 1, 2])
    np.testing.assert_allclose(class_thresholds(metric, pred, 4, fallback=0.3), [0.75, 0.2, 0.4, 0.3])


def test_scores_by_hand():
    np.testing.assert_allclose(agreement_margin([0.5, np.nan, 1.0], [0, 1, 1], [0.25, 0.5]), [0.25, -1.0, 0.5])
    np.testing.assert_allclose(combined_score(np.array([0.9, 0.5, 0.7]), np.array([0.1, 0.3, 0.2])), [2 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(combined_score(np.array([0.9, 0.5, 0.7]), np.array([0.3, 0.1, 0.2])), [1.0, 1 / 3, 2 / 3])


def test_ablation_by_hand():
    """Class 0 rests on filter 0 alone: zeroing it flips every class-0 image to class 1."""
    head = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.5]]))
    features = np.array([[1, 0, 1]] * 4 + [[0, 0, 1]] * 4, np.float32)
    labels = np.array([0] * 4 + [1] * 4)
    filters = GlobalFilters(histogram=np.array([[5, 0, 1], [0, 0, 3]]), magnitude=np.zeros((2, 3)), counts=np.array([5, 3]))
    result = ablation_arrays(head, filters, features, labels, cls=0, top_n=1, n_random_draws=30, seed=7)
    rng = np.random.default_rng(7)
    expected_random = np.mean([float(rng.choice(3, size=1, replace=False)[0] == 0) for _ in range(30)])
    assert result["mc_recall_drop"] == 1.0 and result["per_class"][0]["filters"] == [0]
    assert result["random_recall_drop"] == pytest.approx(expected_random)
    both = ablation_arrays(head, filters, features, labels, cls=None, top_n=1, n_random_draws=5)
    assert both["classes"] == [0, 1]
    # One set of random draws for all classes: a class checked alone gets the same baseline.
    for cl in (0, 1):
        alone = ablation_arrays(head, filters, features, labels, cls=cl, top_n=1, n_random_draws=5)
        assert alone["per_class"][0] == both["per_class"][cl]
    with pytest.raises(CfdebugError, match="top_n"):
        ablation_arrays(head, filters, features, labels, cls=0, top_n=4)
    with pytest.raises(CfdebugError, match="cls"):
        ablation_arrays(head, filters, features, labels, cls=2, top_n=1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"skip_threshold": 1.5},
        {"skip_threshold": -0.1},
        {"freq_threshold": 1.0},
        {"recall_cut": 2.0},
        {"recall_cut_freq_threshold": -1.0},
        {"fallback_threshold": float("nan")},
        {"flag_row": "precision"},
        {"score_metric": "auc"},
        {"rerank_top_k": 0},
        {"ablation_top_n": 0},
        {"ablation_class": -1},
    ],
)
def test_bad_detect_config_raises(kwargs):
    with pytest.raises(CfdebugError, match="Expected"):
        DetectConfig(**kwargs)


@pytest.fixture(scope="module")
def demo_result(demo_workspace):
    seen = []
    result = run_detection(demo_workspace, progress=lambda frac, text: seen.append(frac))
    assert seen and seen[-1] == 1.0 and all(0.0 <= f <= 1.0 for f in seen)
    return result


def test_demo_detection_report(demo_workspace, demo_result):
    r = demo_result
    test = demo_workspace.extractions.get("test")
    assert r["total_errors"] == int((test.preds != test.labels).sum()) > 0
    rows = {row["metric"]: row for row in r["table1"]}
    assert [row["metric"] for row in r["table1"]] == ["avg_recall", "avg_f1", "recall_cut"]
    assert (rows["avg_recall"]["skip_threshold"], rows["avg_recall"]["freq_threshold"]) == (0.9, 0.15)
    assert (rows["avg_f1"]["skip_threshold"], rows["avg_f1"]["freq_threshold"]) == (0.9, 0.15)
    assert (rows["recall_cut"]["skip_threshold"], rows["recall_cut"]["freq_threshold"]) == (0.0, 0.0)
    assert rows["recall_cut"]["checked"] == len(test.labels)
    for row in r["table1"]:
        assert 0 <= row["errors_detected"] <= r["total_errors"]
        assert row["errors_detected_pct"] == pytest.approx(100 * row["errors_detected"] / r["total_errors"])
        assert row["errors_detected"] + row["new_errors"] == row["flagged"] <= row["checked"]
    for name in ("mc_agreement", "msp", "combined"):
        assert 0.0 <= r["auroc"][name] <= 1.0 and 0.0 <= r["aupr_err"][name] <= 1.0
    # Measured on the demo: mc_agreement AUROC 0.867 (MSP 0.855, combined 0.899).
    assert r["auroc"]["mc_agreement"] > 0.70
    # Measured: zeroing a class's top-5 MC filters drops its recall by 0.18; random 5: 0.00.
    assert r["ablation"]["mc_recall_drop"] > r["ablation"]["random_recall_drop"] + 0.05
    assert r["cfe_keep_rate"]["overall"] >= 0.95
    json.dumps(r, allow_nan=False)  # JSON-ready: NaN written as null


def test_detection_report_is_cached(demo_workspace, demo_result, monkeypatch):
    from cfdebug import detect

    def boom(*args, **kwargs):
        raise AssertionError("recomputed a cached detection report")

    monkeypatch.setattr(detect, "ablation_arrays", boom)
    monkeypatch.setattr(detect, "detect_arrays", boom)
    seen = []
    again = run_detection(demo_workspace, progress=lambda frac, text: seen.append(text))
    assert again == demo_result
    assert "detection report loaded from the cache" in seen
    with pytest.raises(AssertionError, match="recomputed"):  # another config is another report
        run_detection(demo_workspace, DetectConfig(freq_threshold=0.2))


def test_demo_per_image_table(demo_workspace, demo_result):
    images = demo_result["images"]
    test = demo_workspace.extractions.get("test")
    assert len(images) == len(test.labels)
    required = {"id", "path", "true", "predicted", "confidence", "recall", "precision", "f1", "flagged", "proposed", "unscorable"}
    assert required <= set(images[0])
    flag_row = next(row for row in demo_result["table1"] if row["metric"] == "avg_f1")
    assert sum(im["flagged"] for im in images) == flag_row["flagged"]
    assert all(im["proposed"] == im["predicted"] for im in images if not im["flagged"])
    assert [im["predicted"] for im in images] == test.preds.tolist()
    fixed = sum(im["flagged"] and im["error"] and im["proposed"] == im["true"] for im in images)
    assert fixed == demo_result["rerank_fixed"]


def test_thresholds_never_see_test_data(demo_workspace):
    """Shuffled test labels, and even other test features, leave every threshold unchanged;
    shuffled labels also leave every flag unchanged (only the error counts move)."""
    fitted = mc_heads(demo_workspace)
    filters = global_mc_filters(demo_workspace)
    train, test = demo_workspace.extractions.get("train"), demo_workspace.extractions.get("test")
    rng = np.random.default_rng(0)
    shuffled = dataclasses.replace(test, labels=rng.permutation(test.labels))
    other = dataclasses.replace(test, features=test.features[rng.permutation(len(test.labels))] * 0.5)
    base = detect_arrays(fitted.heads, filters, train, test)
    moved = detect_arrays(fitted.heads, filters, train, shuffled)
    assert base["thresholds"] == moved["thresholds"] == detect_arrays(fitted.heads, filters, train, other)["thresholds"]
    assert [im["flagged"] for im in base["images"]] == [im["flagged"] for im in moved["images"]]
    assert [row["flagged"] for row in base["table1"]] == [row["flagged"] for row in moved["table1"]]
    assert base["total_errors"] != moved["total_errors"]


def test_demo_bad_requests_raise(demo_workspace):
    with pytest.raises(CfdebugError, match="ablation_class"):
        run_detection(demo_workspace, DetectConfig(ablation_class=demo_workspace.data.num_classes))
    with pytest.raises(CfdebugError, match="split"):
        run_detection(demo_workspace, DetectConfig(split="nope"))
    with pytest.raises(CfdebugError, match="cls"):
        ablation(demo_workspace, cls=99)
