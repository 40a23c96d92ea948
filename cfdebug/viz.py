"""Plotly figure builders. Each returns a ``go.Figure``; none calls streamlit.

Every figure can be saved as PNG from its toolbar in the dashboard.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go

PALETTE = {"base": "#4C78A8", "accent": "#F58518", "good": "#54A24B", "bad": "#E45756", "muted": "#9D9D9D"}


def _layout(fig: go.Figure, title: str, height: int = 380, **kwargs) -> go.Figure:
    fig.update_layout(title=title, height=height, margin=dict(l=40, r=20, t=50, b=40), template="plotly_white", **kwargs)
    return fig


def per_class_recall_bar(classes: Sequence[str], series: dict[str, np.ndarray], title: str = "Per-class recall") -> go.Figure:
    """Grouped bars: one trace per entry of ``series`` (name → recall [K] in [0, 1], NaN allowed)."""
    fig = go.Figure()
    colours = [PALETTE["base"], PALETTE["accent"], PALETTE["good"], PALETTE["muted"]]
    for i, (name, values) in enumerate(series.items()):
        values = np.asarray(values, dtype=float)
        fig.add_bar(
            x=list(classes), y=values, name=name, marker_color=colours[i % len(colours)],
            hovertemplate="class %{x}<br>" + name + " recall %{y:.3f}<extra></extra>",
        )
    fig.update_yaxes(range=[0, 1.05], title="recall")
    fig.update_xaxes(title="class", type="category")
    return _layout(fig, title, barmode="group", legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"))


def confusion_heatmap(matrix: np.ndarray, classes: Sequence[str], title: str = "Confusion matrix (test)", normalise: bool = True) -> go.Figure:
    """Heatmap of ``matrix`` [K, K] (rows true, columns predicted); row-normalised when ``normalise``."""
    counts = np.asarray(matrix, dtype=float)
    shown = counts / np.maximum(counts.sum(1, keepdims=True), 1) if normalise else counts
    labels = [str(c) for c in classes]
    fig = go.Figure(
        go.Heatmap(
            z=shown, x=labels, y=labels, colorscale="Blues", zmin=0, zmax=1 if normalise else None,
            customdata=counts, hovertemplate="true %{y} → predicted %{x}<br>%{customdata:.0f} images (%{z:.2f} of row)<extra></extra>",
            colorbar=dict(title="fraction" if normalise else "count"),
        )
    )
    if len(labels) <= 20:
        fig.update_traces(text=counts.astype(int), texttemplate="%{text}")
    fig.update_yaxes(title="true class", autorange="reversed", type="category")
    fig.update_xaxes(title="predicted class", type="category")
    return _layout(fig, title, height=max(380, 22 * len(labels) + 120))


def filter_heatmap(values: np.ndarray, classes: Sequence[str], filter_order: np.ndarray, title: str = "Global MC filters per class") -> go.Figure:
    """Class × filter heatmap of ``values`` [K, C] (e.g. the histogram divided by its row max),
    columns in ``filter_order``."""
    order = np.asarray(filter_order)
    z = np.asarray(values, dtype=float)[:, order]
    fig = go.Figure(
        go.Heatmap(
            z=z, x=[f"f{i}" for i in order], y=[str(c) for c in classes], colorscale="Viridis", zmin=0, zmax=1,
            hovertemplate="class %{y}, filter %{x}<br>MC frequency %{z:.2f} of the class maximum<extra></extra>",
            colorbar=dict(title="freq / max"),
        )
    )
    fig.update_xaxes(title="filter (sorted)", type="category", showticklabels=len(order) <= 64, tickfont=dict(size=8))
    fig.update_yaxes(title="class", type="category", autorange="reversed")
    return _layout(fig, title, height=max(320, 24 * len(classes) + 140))


def top_filters_bar(filters: np.ndarray, frequency: np.ndarray, title: str) -> go.Figure:
    """Bars of the MC frequency (fraction of voting images) of a class's top filters."""
    fig = go.Figure(go.Bar(x=[f"f{i}" for i in filters], y=frequency, marker_color=PALETTE["base"],
                           hovertemplate="filter %{x}<br>MC in %{y:.0%} of the class's voting images<extra></extra>"))
    fig.update_yaxes(title="fraction of voting images", range=[0, 1.05], tickformat=".0%")
    fig.update_xaxes(type="category")
    return _layout(fig, title, height=300)


def agreement_bar(local: np.ndarray, global_: np.ndarray, frequency: np.ndarray, title: str = "Local vs global MC filters") -> go.Figure:
    """Filters of one prediction: in both sets, only local (MC_x), only global (G_ĉ); bar height is
    the filter's global MC frequency for the predicted class."""
    local, global_ = np.asarray(local, bool), np.asarray(global_, bool)
    groups = (("in both", local & global_, PALETTE["good"]), ("only local (this image)", local & ~global_, PALETTE["accent"]),
              ("only global (the class)", ~local & global_, PALETTE["bad"]))
    fig = go.Figure()
    for name, mask, colour in groups:
        idx = np.flatnonzero(mask)
        fig.add_bar(x=[f"f{i}" for i in idx], y=np.asarray(frequency)[idx], name=f"{name}: {len(idx)}", marker_color=colour,
                    hovertemplate="filter %{x}<br>global frequency %{y:.2f}<extra>" + name + "</extra>")
    fig.update_xaxes(type="category", categoryorder="total descending", title="filter")
    fig.update_yaxes(title="global MC frequency (of class max)", range=[0, 1.05])
    return _layout(fig, title, height=320, legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"))


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], title: str = "Error detection ROC") -> go.Figure:
    """ROC curves ``name → (fpr, tpr, auroc)``; positives are correct predictions (Hendrycks & Gimpel)."""
    fig = go.Figure()
    colours = [PALETTE["base"], PALETTE["accent"], PALETTE["good"], PALETTE["muted"]]
    for i, (name, (fpr, tpr, auc)) in enumerate(curves.items()):
        fig.add_scatter(x=fpr, y=tpr, mode="lines", name=f"{name} (AUROC {auc:.3f})", line=dict(color=colours[i % len(colours)], width=2))
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance", line=dict(color="#bbbbbb", dash="dot"))
    fig.update_xaxes(title="errors trusted (FPR)", range=[0, 1])
    fig.update_yaxes(title="correct predictions trusted (TPR)", range=[0, 1.02])
    return _layout(fig, title, height=380, legend=dict(x=0.98, y=0.02, xanchor="right", yanchor="bottom"))


def confusion_delta_heatmap(delta: np.ndarray, classes: Sequence[str], title: str = "Confusion matrix change (treated − base, test)") -> go.Figure:
    """Diverging heatmap of a count difference [K, K]: more on the diagonal (blue) is better."""
    d = np.asarray(delta, dtype=float)
    bound = max(1.0, float(np.abs(d).max()))
    labels = [str(c) for c in classes]
    fig = go.Figure(go.Heatmap(z=d, x=labels, y=labels, colorscale="RdBu", zmin=-bound, zmax=bound, zmid=0,
                               hovertemplate="true %{y} → predicted %{x}<br>change %{z:+.0f}<extra></extra>", colorbar=dict(title="Δ count")))
    if len(labels) <= 20:
        fig.update_traces(text=d.astype(int), texttemplate="%{text}")
    fig.update_yaxes(title="true class", autorange="reversed", type="category")
    fig.update_xaxes(title="predicted class", type="category")
    return _layout(fig, title, height=max(360, 22 * len(labels) + 120))


# ---- XCR (paper B): calibration and robustness --------------------------------------------

_XCR_COLOURS = {"vanilla": PALETTE["base"], "xcr": PALETTE["accent"], "random": PALETTE["muted"]}


def _xcr_style(method: str) -> dict:
    """Colour by retraining method, dashed for the temperature-scaled variant (``+TS``)."""
    base = method.removesuffix("+TS")
    return dict(color=_XCR_COLOURS.get(base, PALETTE["good"]), dash="dash" if method.endswith("+TS") else "solid", width=2)


def reliability_diagram(bins_by_method: dict, title: str = "Reliability diagram") -> go.Figure:
    """Accuracy against confidence per bin, one line per method, with the diagonal.

    ``bins_by_method``: ``method → {"bin_lower", "bin_upper", "accuracy", "confidence", "count"}``
    (``cfdebug.metrics.reliability_bins``; empty bins hold NaN or None and are skipped). A point
    below the diagonal is over-confident.
    """
    fig = go.Figure()
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration", line=dict(color="#bbbbbb", dash="dot"))
    for method, bins in bins_by_method.items():
        acc = np.array([np.nan if v is None else v for v in bins["accuracy"]], dtype=float)
        conf = np.array([np.nan if v is None else v for v in bins["confidence"]], dtype=float)
        count = np.asarray(bins["count"], dtype=float)
        keep = np.isfinite(acc) & np.isfinite(conf) & (count > 0)
        fig.add_scatter(
            x=conf[keep], y=acc[keep], mode="lines+markers", name=method, line=_xcr_style(method),
            marker=dict(size=np.clip(4 + 14 * np.sqrt(count[keep] / max(count.sum(), 1)), 4, 18)),
            customdata=count[keep], hovertemplate="confidence %{x:.2f}<br>accuracy %{y:.2f}<br>%{customdata:.0f} images<extra>" + method + "</extra>",
        )
    fig.update_xaxes(title="confidence (mean of the bin)", range=[0, 1])
    fig.update_yaxes(title="accuracy", range=[0, 1.02])
    return _layout(fig, title, height=380, legend=dict(x=0.02, y=0.98, xanchor="left", yanchor="top"))


def severity_lines(rows: Sequence[dict], corruption: str, metric: str = "accuracy", title: str | None = None, clean: dict | None = None) -> go.Figure:
    """``metric`` against corruption severity, one line per method.

    ``rows``: per-corruption rows ``{"method", "corruption", "severity", metric, …}``.
    ``corruption``: a corruption name, or ``"mean"`` for the mean over all corruptions at each
    severity. ``clean``: optional ``method → clean value``, drawn at severity 0.
    """
    label = {"accuracy": "accuracy", "ece": "ECE", "nll": "NLL", "brier": "Brier score (0–2)"}.get(metric, metric)
    fig = go.Figure()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for method in methods:
        sel = [r for r in rows if r["method"] == method and (corruption == "mean" or r["corruption"] == corruption)]
        severities = sorted({int(r["severity"]) for r in sel})
        ys = [float(np.mean([r[metric] for r in sel if int(r["severity"]) == s])) for s in severities]
        if clean is not None and method in clean and clean[method] is not None:
            severities, ys = [0] + severities, [float(clean[method])] + ys
        fig.add_scatter(x=severities, y=ys, mode="lines+markers", name=method, line=_xcr_style(method),
                        hovertemplate="severity %{x}<br>" + label + " %{y:.3f}<extra>" + method + "</extra>")
    fig.update_xaxes(title="severity (0 = clean)" if clean is not None else "severity", dtick=1)
    fig.update_yaxes(title=label, range=[0, 1.02] if metric in ("accuracy", "ece") else None, rangemode="tozero")
    name = "mean over corruptions" if corruption == "mean" else corruption.replace("_", " ")
    return _layout(fig, title or f"{label} vs severity: {name}", height=340)
