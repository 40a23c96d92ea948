"""Figure builders (viz.py) and the overlay helpers the pages use (gradcam.region_*)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from cfdebug import viz
from cfdebug.gradcam import region_overlay, region_share


def test_confusion_delta_is_coloured_by_better_or_worse():
    # one more correct 0 (diagonal +1) and one fewer 0 → 1 error (off-diagonal −1): both good
    delta = np.array([[1, -1], [0, 0]])
    fig = viz.confusion_delta_heatmap(delta, ["0", "1"])
    z = np.asarray(fig.data[0].z)
    assert z[0, 0] > 0 and z[0, 1] > 0  # green for both, although the signs differ
    worse = np.asarray(viz.confusion_delta_heatmap(-delta, ["0", "1"]).data[0].z)
    assert worse[0, 0] < 0 and worse[0, 1] < 0


def test_agreement_bar_shows_only_local_filters():
    local = np.array([True, True, False, False])
    global_ = np.array([True, False, True, False])
    freq = np.array([1.0, 0.0, 0.5, 0.0])  # f1 is only local: its global frequency is 0
    fig = viz.agreement_bar(local, global_, freq, activation=np.array([2.0, 1.0, 0.0, 0.0]))
    only_local = [t for t in fig.data if t.legendgroup == "only local (this image)"]
    heights = np.concatenate([np.abs(np.asarray(t.y, float)) for t in only_local])
    assert heights.max() == 0.5  # the downward bar: activation 1 of the image's max 2


def test_reliability_diagram_keeps_sparse_bins_off_the_line_and_counts_bins():
    bins = {"bin_lower": [0.0, 0.5], "bin_upper": [0.5, 1.0], "accuracy": [0.0, 0.9], "confidence": [0.3, 0.9], "count": [1, 999]}
    fig = viz.reliability_diagram({"vanilla": bins})
    line = [t for t in fig.data if isinstance(t, go.Scatter) and t.name == "vanilla" and t.mode == "lines+markers"][0]
    assert list(line.x) == [0.9]  # one stray image in the low bin draws no drop to 0
    bars = [t for t in fig.data if isinstance(t, go.Bar)]
    assert list(bars[0].y) == [1, 999]
    few = dict(bins, count=[3, 536])  # three of 539 images: still too few to draw the curve through
    line = [t for t in viz.reliability_diagram({"xcr": few}).data if isinstance(t, go.Scatter) and t.name == "xcr" and t.mode == "lines+markers"][0]
    assert list(line.x) == [0.9]
    assert fig.layout.legend.y < 0  # the legend sits below the plot, off the curves


def test_training_curves_one_line_per_part_and_term():
    rows = [{"part": p, "epoch": e, "loss": 1.0 / e, "ce": 1.0, "val_acc": 0.9} for p in ("control · seed 0", "treated · seed 0") for e in (1, 2)]
    fig = viz.training_curves(rows)
    assert len(fig.data) == 2 * 3 and {t.name for t in fig.data} == {"control · seed 0", "treated · seed 0"}


def test_region_share_and_overlay():
    maps = np.zeros((2, 4, 4))
    maps[0, :2, :2] = 1.0  # all mass in the top-left quarter
    maps[1] = 1.0  # uniform: the region's area share
    share = region_share(maps, slice(0, 2), slice(0, 2))
    assert np.allclose(share, [1.0, 0.25])
    image = np.full((4, 4, 3), 100, np.uint8)
    out = region_overlay(image, maps[0], scale=4)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert (out[12:, 12:] == 100).all()  # outside the region the image is untouched
    assert not (out[:8, :8] == 100).all()  # inside: tinted and outlined


def test_agreement_bar_of_a_wide_layer_shows_its_top_filters():
    """resnet18's layer4 has 512 filters: the chart draws the top ones (the class's most frequent, the
    image's strongest) and says so; the legend still counts every filter of each group."""
    rng = np.random.default_rng(0)
    local, global_ = rng.random(512) < 0.4, rng.random(512) < 0.4
    freq, act = rng.random(512), rng.random(512)
    fig = viz.agreement_bar(local, global_, freq, "Filters", activation=act)
    drawn = {x for t in fig.data for x in t.x}
    n = int((local | global_).sum())
    assert len(drawn) == 64 and fig.layout.title.text == f"Filters (top 64 of {n} filters)"
    strongest_class = {f"f{i}" for i in np.flatnonzero(local | global_)[np.argsort(-freq[local | global_])[:32]]}
    assert strongest_class <= drawn
    counts = sorted(int(t.name.rsplit(": ", 1)[1]) for t in fig.data if t.showlegend is not False and t.name)
    assert counts == sorted([int((local & global_).sum()), int((local & ~global_).sum()), int((~local & global_).sum())])
    small = viz.agreement_bar(local[:20], global_[:20], freq[:20], "Filters")
    assert small.layout.title.text == "Filters"  # all shown: no note


def test_training_curves_keep_accuracy_on_a_0_to_1_axis():
    rows = [{"part": "training", "epoch": 1, "loss": 2.0, "val_acc": 0.5}]  # one point: plotly alone would pick 0 … 1.5
    fig = viz.training_curves(rows)
    axes = {fig.layout[k].tickformat: tuple(fig.layout[k].range or ()) for k in fig.layout if k.startswith("yaxis")}
    assert axes[".0%"] == (0, 1.02)
