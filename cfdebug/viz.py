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
