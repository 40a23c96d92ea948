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
