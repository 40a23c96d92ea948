"""Plotly figure builders. Each returns a ``go.Figure``; none calls streamlit.

Every figure can be saved as PNG from its toolbar in the dashboard.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go

PALETTE = {"base": "#4C78A8", "accent": "#F58518", "good": "#54A24B", "bad": "#E45756", "muted": "#9D9D9D"}


def _layout(fig: go.Figure, title: str, height: int = 380, **kwargs) -> go.Figure:
    kwargs.setdefault("margin", dict(l=40, r=20, t=50, b=40))
    fig.update_layout(title=title, height=height, template="plotly_white", **kwargs)
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


def filter_heatmap(values: np.ndarray, classes: Sequence[str], filter_order: np.ndarray, title: str = "Global MC filters per class",
                   signed: bool = False) -> go.Figure:
    """Class × filter heatmap of ``values`` [K, C] (e.g. the MC frequency, or a signed
    specificity in [-1, 1] when ``signed``), columns in ``filter_order``."""
    order = np.asarray(filter_order)
    z = np.asarray(values, dtype=float)[:, order]
    scale = dict(colorscale="RdBu", zmin=-1, zmax=1, zmid=0) if signed else dict(colorscale="Viridis", zmin=0, zmax=1)
    fig = go.Figure(
        go.Heatmap(
            z=z, x=[f"f{i}" for i in order], y=[str(c) for c in classes], **scale,
            hovertemplate="class %{y}, filter %{x}<br>value %{z:.2f}<extra></extra>",
            colorbar=dict(title="scaled"),
        )
    )
    fig.update_xaxes(title="filter (ranked)", type="category", showticklabels=len(order) <= 64, tickfont=dict(size=8))
    fig.update_yaxes(title="class", type="category", autorange="reversed")
    return _layout(fig, title, height=max(320, 24 * len(classes) + 140))


def top_filters_bar(filters: np.ndarray, frequency: np.ndarray, title: str, other: np.ndarray | None = None,
                    value_label: str = "fraction of voting images") -> go.Figure:
    """Bars of a class's top filters: ``frequency`` [n] (the class's MC frequency, fraction of its
    voting images) and, when given, ``other`` [n] (the same filters' mean frequency in the other
    classes), so a filter every class uses stands out from one specific to this class."""
    names = [f"f{i}" for i in filters]
    fig = go.Figure(go.Bar(x=names, y=frequency, name="this class", marker_color=PALETTE["base"],
                           hovertemplate="filter %{x}<br>MC in %{y:.0%} of the class's voting images<extra></extra>"))
    if other is not None:
        fig.add_bar(x=names, y=other, name="other classes (mean)", marker_color=PALETTE["muted"],
                    hovertemplate="filter %{x}<br>MC in %{y:.0%} of the other classes' voting images (mean)<extra></extra>")
    fig.update_yaxes(title=value_label, range=[0, 1.05], tickformat=".0%")
    fig.update_xaxes(type="category", title="filter (ranked)")
    return _layout(fig, title, height=300, barmode="group", legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"))


def agreement_bar(local: np.ndarray, global_: np.ndarray, frequency: np.ndarray, title: str = "Local vs global MC filters",
                  activation: np.ndarray | None = None, top: int = 64) -> go.Figure:
    """Filters of one prediction, two-sided: up, the filter's global MC frequency for the predicted
    class (``frequency`` [C] in [0, 1], of the class maximum); down, for the image's own MC
    filters (``local`` [C] bool), its activation on this image (``activation`` [C] ≥ 0, scaled to
    the image's maximum; 1 when not given). Colours: in both sets, only local (MC_x), only global
    (G_ĉ). A filter only in MC_x has (almost) no upward bar, so the downward one shows it.

    At most ``top`` filters are drawn (a resnet18 has 512): the most frequent in the class first,
    then the image's strongest; the legend still counts every filter of each group, and the
    title says how many are shown."""
    local, global_ = np.asarray(local, bool), np.asarray(global_, bool)
    frequency = np.asarray(frequency, float)
    act = np.ones(len(local)) if activation is None else np.asarray(activation, float) / max(float(np.max(activation)), 1e-12)
    shown = np.flatnonzero(local | global_)
    by_class = shown[np.argsort(-frequency[shown], kind="stable")]
    by_image = shown[np.argsort(-(act[shown] * local[shown]), kind="stable")]
    keep = list(dict.fromkeys(np.concatenate([by_class[: (top + 1) // 2], by_image[: top // 2], by_class]).tolist()))[:top]
    keep = np.asarray(keep, dtype=int)
    order = keep[np.lexsort((-act[keep] * local[keep], -frequency[keep]))]
    names = [f"f{i}" for i in order]
    kept = np.zeros(len(local), bool)
    kept[keep] = True
    groups = (("in both", local & global_, PALETTE["good"]), ("only local (this image)", local & ~global_, PALETTE["accent"]),
              ("only global (the class)", ~local & global_, PALETTE["bad"]))
    fig = go.Figure()
    for name, mask, colour in groups:
        idx = np.flatnonzero(mask & kept)
        fig.add_bar(x=[f"f{i}" for i in idx], y=frequency[idx], name=f"{name}: {int(mask.sum())}", marker_color=colour, legendgroup=name,
                    hovertemplate="filter %{x}<br>class frequency %{y:.2f}<extra>" + name + "</extra>")
        down = idx[local[idx]]
        if len(down):
            fig.add_bar(x=[f"f{i}" for i in down], y=-act[down], marker_color=colour, opacity=0.6, legendgroup=name, showlegend=False,
                        customdata=act[down], hovertemplate="filter %{x}<br>activation on this image %{customdata:.2f} of its max<extra>" + name + "</extra>")
    fig.add_hline(y=0, line_color="#555555", line_width=1)
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=names, title="filter", showticklabels=len(names) <= 60)
    fig.update_yaxes(title="↑ class frequency · ↓ this image", range=[-1.05, 1.05])
    if len(keep) < len(shown):
        title = f"{title} (top {len(keep)} of {len(shown)} filters)"
    # Legend under the axis: in a narrow column a legend beside the title runs over it.
    return _layout(fig, title, height=380, barmode="overlay", margin=dict(l=40, r=20, t=50, b=100),
                   legend=dict(orientation="h", y=-0.32, x=0, xanchor="left", yanchor="top"))


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


def confusion_delta_heatmap(delta: np.ndarray, classes: Sequence[str], title: str = "Confusion matrix change (test)") -> go.Figure:
    """Heatmap of a count difference [K, K] (rows true, columns predicted; after − before),
    coloured by whether the change is good: more on the diagonal (correct) or fewer off it
    (errors) is green, the opposite red. The cell text is the signed count change."""
    d = np.asarray(delta, dtype=float)
    k = d.shape[0]
    good = np.where(np.eye(k, dtype=bool), d, -d)  # > 0: better
    bound = max(1.0, float(np.abs(good).max()))
    labels = [str(c) for c in classes]
    text = np.where(d == 0, "", np.vectorize(lambda v: f"{v:+.0f}")(d))
    fig = go.Figure(go.Heatmap(
        z=good, x=labels, y=labels, colorscale=[[0, PALETTE["bad"]], [0.5, "#f7f7f7"], [1, PALETTE["good"]]], zmin=-bound, zmax=bound, zmid=0,
        customdata=d, hovertemplate="true %{y} → predicted %{x}<br>change %{customdata:+.0f} images<extra></extra>",
        colorbar=dict(title="", tickvals=[-bound, 0, bound], ticktext=["worse", "same", "better"]),
    ))
    if len(labels) <= 20:
        fig.update_traces(text=text, texttemplate="%{text}")
    fig.update_yaxes(title="true class", autorange="reversed", type="category")
    fig.update_xaxes(title="predicted class", type="category")
    return _layout(fig, title, height=max(360, 22 * len(labels) + 120))


#: The panels :func:`training_curves` draws when the rows hold them, and their titles.
CURVE_TERMS = {"loss": "total loss", "ce": "cross-entropy", "mc": "Σ|f⊙G_y| (MC)", "non_mc": "Σ|(1−G_y)⊙f| (non-MC)",
               "rrr": "input gradients in the region (RRR)", "filters": "Σ|f| of the chosen filters", "val_acc": "validation accuracy"}


def training_curves(rows: Sequence[dict], title: str = "Per-epoch curves") -> go.Figure:
    """One panel per loss term present (:data:`CURVE_TERMS`: ``loss``, ``ce``, treatment's ``mc``
    and ``non_mc``, revise's ``rrr`` and ``filters``) and validation accuracy, against epoch; one
    line per run part. ``rows``: progress rows ``{"part": str, "epoch": int, term: float, "val_acc": float, …}``."""
    from plotly.subplots import make_subplots

    terms = [t for t in CURVE_TERMS if any(r.get(t) is not None for r in rows)]
    names = CURVE_TERMS
    fig = make_subplots(rows=1, cols=max(len(terms), 1), subplot_titles=[names[t] for t in terms], horizontal_spacing=0.06)
    parts = list(dict.fromkeys(r["part"] for r in rows))
    colours = [PALETTE["base"], PALETTE["accent"], PALETTE["good"], PALETTE["bad"], PALETTE["muted"], "#B279A2", "#72B7B2"]
    for j, part in enumerate(parts):
        sel = sorted((r for r in rows if r["part"] == part), key=lambda r: r["epoch"])
        dash = "dash" if part.startswith("control") else "solid"
        for col, term in enumerate(terms, start=1):
            pts = [(r["epoch"], r[term]) for r in sel if r.get(term) is not None]
            if pts:
                fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=part, legendgroup=part,
                                showlegend=col == 1, line=dict(color=colours[j % len(colours)], dash=dash), row=1, col=col,
                                hovertemplate="epoch %{x}<br>%{y:.4g}<extra>" + part + "</extra>")
    for col, term in enumerate(terms, start=1):
        if term.endswith("_acc"):
            fig.update_yaxes(range=[0, 1.02], tickformat=".0%", row=1, col=col)  # an accuracy, never above 1
    fig.update_xaxes(title="epoch", dtick=1)
    return _layout(fig, title, height=320, legend=dict(orientation="h", y=-0.25, x=0, xanchor="left", yanchor="top"))


def region_picker(image: np.ndarray, region=None, proposal=None, title: str = "Drag a box over what is not evidence") -> go.Figure:
    """``image`` ``[H, W, 3]`` uint8 in pixel coordinates with the chosen ``region`` (solid) and a
    ``proposal`` (dashed) drawn as rectangles (:class:`~cfdebug.revise.Region`), in box-select mode.

    Transparent markers sit on the pixel centres (every pixel up to 64 px, a grid beyond), so a box
    drawn on the chart selects points even where a chart reports no box; the page turns either into
    a region (:func:`cfdebug.ui.revise.box_region`).
    """
    h, w = image.shape[:2]
    step = max(1, int(np.ceil(max(h, w) / 64)))
    ys, xs = np.mgrid[0:h:step, 0:w:step]
    fig = go.Figure(go.Image(z=image, hoverinfo="skip"))
    fig.add_scatter(x=xs.ravel(), y=ys.ravel(), mode="markers", marker=dict(size=4, opacity=0.01, color="#000000"),
                    hovertemplate="x %{x}, y %{y}<extra></extra>", showlegend=False)
    same = proposal is not None and proposal == region
    for r, dash, colour, name in ((None if same else proposal, "dash", PALETTE["accent"], "proposed"),
                                  (region, "solid", PALETTE["bad"], "not evidence (proposed)" if same else "not evidence")):
        if r is not None:
            fig.add_shape(type="rect", x0=r.x0 - 0.5, y0=r.y0 - 0.5, x1=r.x1 - 0.5, y1=r.y1 - 0.5, line=dict(color=colour, width=2, dash=dash))
            top = r.y0 < 0.15 * h  # a box at the top edge: its label goes under it, inside the image
            fig.add_annotation(x=r.x0 - 0.5, y=(r.y1 if top else r.y0) - 0.5, text=name, showarrow=False, xanchor="left",
                               yanchor="top" if top else "bottom", font=dict(color=colour, size=11), bgcolor="rgba(255,255,255,0.8)")
    fig.update_xaxes(range=[-0.5, w - 0.5], showgrid=False, constrain="domain")
    fig.update_yaxes(range=[h - 0.5, -0.5], showgrid=False, scaleanchor="x")
    return _layout(fig, title, height=360, dragmode="select", margin=dict(l=10, r=10, t=40, b=10))


# ---- XCR (paper B): calibration and robustness --------------------------------------------

_XCR_COLOURS = {"vanilla": PALETTE["base"], "xcr": PALETTE["accent"], "random": PALETTE["muted"]}


def _xcr_style(method: str) -> dict:
    """Colour by retraining method, dashed for the temperature-scaled variant (``+TS``)."""
    base = method.removesuffix("+TS")
    return dict(color=_XCR_COLOURS.get(base, PALETTE["good"]), dash="dash" if method.endswith("+TS") else "solid", width=2)


def reliability_diagram(bins_by_method: dict, title: str = "Reliability diagram", min_share: float = 0.005) -> go.Figure:
    """Accuracy against confidence per bin, one line per method, with the diagonal; below it the
    number of images per bin.

    ``bins_by_method``: ``method → {"bin_lower", "bin_upper", "accuracy", "confidence", "count"}``
    (``cfdebug.metrics.reliability_bins``; empty bins hold NaN or None and are skipped). A point
    below the diagonal is over-confident. A bin holding fewer than 10 images, or less than
    ``min_share`` of them, is drawn as a hollow marker off the line, so a few stray images do not
    draw a drop to 0.
    """
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.74, 0.26], vertical_spacing=0.04)
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration", line=dict(color="#bbbbbb", dash="dot"), row=1, col=1)
    for method, bins in bins_by_method.items():
        acc = np.array([np.nan if v is None else v for v in bins["accuracy"]], dtype=float)
        conf = np.array([np.nan if v is None else v for v in bins["confidence"]], dtype=float)
        count = np.asarray(bins["count"], dtype=float)
        lower, upper = np.asarray(bins["bin_lower"], float), np.asarray(bins["bin_upper"], float)
        keep = np.isfinite(acc) & np.isfinite(conf) & (count > 0)
        sparse = keep & (count < max(min_share * count.sum(), 10))
        solid = keep & ~sparse
        style = _xcr_style(method)
        fig.add_scatter(
            x=conf[solid], y=acc[solid], mode="lines+markers", name=method, line=style, legendgroup=method, row=1, col=1,
            customdata=count[solid], hovertemplate="confidence %{x:.2f}<br>accuracy %{y:.2f}<br>%{customdata:.0f} images<extra>" + method + "</extra>",
        )
        if sparse.any():
            fig.add_scatter(x=conf[sparse], y=acc[sparse], mode="markers", name=method, legendgroup=method, showlegend=False, row=1, col=1,
                            marker=dict(symbol="circle-open", size=7, color=style["color"]), customdata=count[sparse],
                            hovertemplate="confidence %{x:.2f}<br>accuracy %{y:.2f}<br>only %{customdata:.0f} image(s)<extra>" + method + "</extra>")
        fig.add_bar(x=(lower + upper) / 2, y=count, width=(upper - lower) * 0.9 / max(len(bins_by_method), 1), name=method, legendgroup=method,
                    showlegend=False, marker_color=style["color"], opacity=0.7, row=2, col=1,
                    hovertemplate="bin %{x:.2f}<br>%{y:.0f} images<extra>" + method + "</extra>")
    fig.update_xaxes(range=[0, 1], row=1, col=1)
    fig.update_xaxes(title="confidence", range=[0, 1], row=2, col=1)
    fig.update_yaxes(title="accuracy", range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(title="images", type="log", dtick=1, row=2, col=1)  # ticks at 1, 10, 100, … only
    return _layout(fig, title, height=460, barmode="group", legend=dict(orientation="h", y=-0.18, x=0, xanchor="left", yanchor="top"),
                   margin=dict(l=50, r=20, t=50, b=90))


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
