"""Global MC filters (eq. 1–3) on hand-made heads and features, and on the demo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cfdebug.cfe import MCHeads
from cfdebug.errors import CfdebugError
from cfdebug.mcfilters import GlobalFilters, MCFilterConfig, accumulate_global_filters, detection_sets, global_mc_filters, treatment_sets


def test_detection_sets_by_hand():
    h = np.array([[10, 2, 1, 0], [0, 0, 0, 0], [3, 3, 0, 1]])
    expected = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 0, 1]], bool)  # 0.15·10 = 1.5, 0.15·3 = 0.45
    np.testing.assert_array_equal(detection_sets(h, 0.15), expected)
    np.testing.assert_array_equal(detection_sets(h, 0.0), h > 0)
    np.testing.assert_array_equal(detection_sets(h, 0.5), np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]], bool))
    np.testing.assert_array_equal(GlobalFilters(h, np.zeros(h.shape), np.ones(3, np.int64)).sets(0.5), detection_sets(h, 0.5))


def test_treatment_sets_keep_every_filter_seen_once():
    """Treatment's G_y (eq. 4–8) is ``h_y > 0``: the filter with h = 1 of class 0 (1 < 0.15·10)
    is in treatment's set and not in detection's; an empty class has an empty set under both."""
    h = np.array([[10, 2, 1, 0], [0, 0, 0, 0], [3, 3, 0, 1]])
    sets = treatment_sets(h)
    assert sets.dtype == bool
    assert sets.tolist() == [[True, True, True, False], [False, False, False, False], [True, True, False, True]]
    assert (sets & ~detection_sets(h)).tolist() == [[False, False, True, False], [False] * 4, [False] * 4]
    assert treatment_sets(sets).tolist() == sets.tolist()  # bool sets pass through
    with pytest.raises(CfdebugError, match=r"Expected `histogram` to have shape \[K, C\], but got shape \(4,\)"):
        treatment_sets(np.ones(4))


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.1", True])
def test_detection_sets_refuse_bad_thresholds(bad):
    with pytest.raises(CfdebugError, match="Expected `freq_threshold`"):
        detection_sets(np.ones((2, 3)), bad)


def test_config_refuses_bad_tau():
    with pytest.raises(CfdebugError, match="Expected `tau`"):
        MCFilterConfig(tau=1.2)


def _hand_made():
    """K = 3, C = 3. Head 0 keeps filters {0, 1}, head 1 keeps {1, 2}, head 2 keeps {0};
    the classifier says 0 when filter 0 beats filter 2, 1 when filter 2 wins, never 2."""
    heads = MCHeads(3, 3)
    with torch.no_grad():
        heads.weight.zero_()
        heads.bias.copy_(torch.tensor([[5.0, 5.0, -5.0], [-5.0, 5.0, 5.0], [5.0, -5.0, -5.0]]))
    head = nn.Linear(3, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
        head.bias.copy_(torch.tensor([0.0, 0.0, -10.0]))
    features = np.array(
        [
            [2, 1, 0],  # class 0, p 0.95: votes, MC {0,1}
            [3, 0, 1],  # class 0, p = τ exactly: votes (p ≥ τ)
            [1, 1, 1],  # class 0, p 0.6: too unsure
            [0, 1, 2],  # class 0 predicted 1: wrong, skipped
            [0, 2, 3],  # class 1, p 0.98: votes, MC {1,2}
            [5, 1, 0],  # class 1, p 0.99, but g ⊙ MC = [0,1,0] ties → predicted 0: skipped
        ],
        dtype=np.float32,
    )
    labels = np.array([0, 0, 0, 0, 1, 1])
    probs = np.array([[0.95, 0.05, 0], [0.9, 0.1, 0], [0.6, 0.4, 0], [0.05, 0.95, 0], [0.02, 0.98, 0], [0.01, 0.99, 0]])
    return heads, head, features, labels, probs


def test_accumulate_by_hand():
    heads, head, features, labels, probs = _hand_made()
    before = features.copy()
    result = accumulate_global_filters(heads, head, features, labels, probs, tau=0.9)
    np.testing.assert_array_equal(result.histogram, [[2, 2, 0], [0, 1, 1], [0, 0, 0]])
    np.testing.assert_allclose(result.magnitude, [[5, 1, 0], [0, 2, 3], [0, 0, 0]])
    np.testing.assert_array_equal(result.counts, [2, 1, 0])
    np.testing.assert_array_equal(result.empty_classes, [2])
    np.testing.assert_array_equal(result.sets(0.15), [[1, 1, 0], [0, 1, 1], [0, 0, 0]])
    np.testing.assert_allclose(result.normalised_magnitude(), [[2.5, 0.5, 0], [0, 2, 3], [0, 0, 0]])
    np.testing.assert_array_equal(result.top_filters(0, 2), [0, 1])  # tie in h broken by magnitude
    np.testing.assert_array_equal(features, before)


def test_accumulate_with_no_confident_image():
    heads, head, features, labels, probs = _hand_made()
    result = accumulate_global_filters(heads, head, features, labels, probs, tau=1.0)
    assert result.counts.tolist() == [0, 0, 0]
    assert not result.sets(0.0).any()


def test_demo_global_filters(demo_workspace):
    filters = global_mc_filters(demo_workspace)
    k, c = demo_workspace.data.num_classes, demo_workspace.target.channels
    assert isinstance(filters, GlobalFilters)
    assert filters.histogram.shape == (k, c) and filters.magnitude.shape == (k, c)
    train = demo_workspace.extractions.get("train")
    confident_correct = np.bincount(train.labels[(train.preds == train.labels) & (train.probs.max(1) >= 0.9)], minlength=k)
    assert (filters.counts <= confident_correct).all() and filters.counts.sum() > 0
    assert (filters.histogram.max(1) <= filters.counts).all()
    assert filters.meta["empty_classes"] == [int(i) for i in np.nonzero(filters.counts == 0)[0]]
    assert global_mc_filters(demo_workspace).cache_hit


def test_specificity_separates_generic_from_class_filters():
    from cfdebug.mcfilters import filter_specificity, mc_frequency, rank_filters

    # filter 0: kept in every image of every class (generic); filter 1: only class 0; filter 2: never.
    hist = np.array([[10, 8, 0], [5, 0, 0], [0, 0, 0]])
    counts = np.array([10, 5, 0])  # class 2 has no voting image
    freq = mc_frequency(hist, counts)
    assert np.allclose(freq, [[1, 0.8, 0], [1, 0, 0], [0, 0, 0]])
    spec = filter_specificity(hist, counts)
    assert np.allclose(spec[0], [0.0, 0.8, 0.0]) and np.allclose(spec[1], [0.0, -0.8, 0.0])
    gf = GlobalFilters(histogram=hist, magnitude=np.array([[5.0, 1.0, 0], [2.0, 0, 0], [0, 0, 0]]), counts=counts)
    assert rank_filters(gf, 0, "specificity")[0] == 1  # the class's own filter first, though the generic one is more frequent
    assert rank_filters(gf, 0, "frequency")[0] == 0
    assert list(rank_filters(gf, 0, "frequency")) == list(gf.top_filters(0, 3))
    with pytest.raises(CfdebugError, match="Expected `by`"):
        rank_filters(gf, 0, "size")
    assert hist.tolist() == [[10, 8, 0], [5, 0, 0], [0, 0, 0]]  # inputs untouched
