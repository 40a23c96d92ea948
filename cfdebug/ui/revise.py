"""The Revise page's helpers: propose a region, turn a box drawn on an image into one, launch a
revise run, read a finished run (its models, their Grad-CAM, the images it fixed and broke).

The runs are listed and watched like every run (:mod:`cfdebug.ui.runs`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import CfdebugError
from .cache import memo
from .errors import show_error, show_user_error
from .filters import gradcam_maps, ws_key
from .runs import epoch_curves, epoch_rows, start_run

__all__ = ["box_region", "url_region", "cached_detection", "proposed_region", "suggested_filters", "launch_revise", "model_weights", "revised_workspace",
           "part_label", "live_curves"]


def box_region(selection: dict | None, size: int):
    """The :class:`~cfdebug.revise.Region` a box drawn on the image picker selects, or ``None``.

    ``selection`` is ``st.plotly_chart(..., on_select="rerun")``'s selection: a box's ``x``/``y``
    ranges in pixel coordinates (pixel ``i`` is centred on ``i``), or, where the chart
    reports none, the pixel-centre points inside it. The region covers every pixel whose centre
    lies in the box, clipped to the ``size``×``size`` image.
    """
    from ..revise import Region

    selection = selection or {}
    boxes = selection.get("box") or []
    if boxes:
        xs, ys = boxes[-1].get("x") or [], boxes[-1].get("y") or []
        if len(xs) >= 2 and len(ys) >= 2:
            x0, x1 = sorted(float(v) for v in xs[:2])
            y0, y1 = sorted(float(v) for v in ys[:2])
            x0, y0 = max(0, int(np.ceil(x0))), max(0, int(np.ceil(y0)))  # the first pixel centre inside
            x1, y1 = min(size, int(np.floor(x1)) + 1), min(size, int(np.floor(y1)) + 1)  # one past the last
            return Region(x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None
    points = selection.get("points") or []
    if points:
        xs = [int(round(p["x"])) for p in points if "x" in p]
        ys = [int(round(p["y"])) for p in points if "y" in p]
        if xs and ys:
            return Region(max(0, min(xs)), max(0, min(ys)), min(size, max(xs) + 1), min(size, max(ys) + 1))
    return None


def url_region(text: str | None, size: int):
    """The region a URL or text field gives (``"X0,Y0,X1,Y1"``), or ``None`` (an error box says why)."""
    from ..revise import parse_region

    try:
        return parse_region(text, size)
    except CfdebugError as exc:
        show_error(str(exc))
        return None


def cached_detection(ws) -> dict | None:
    """The workspace's detection report when it is cached (or the page computes inline), else
    ``None``: the Revise page only uses it for the proposal and the image to draw on, so it never
    waits for a prepare run (the Flagged page starts one)."""
    from ..jobs import prepared
    from .workspace import inline

    try:
        if not (inline() or prepared(ws, "detect")):
            return None
    except CfdebugError:
        return None
    from .filters import detection

    return detection(ws)


def proposed_region(ws, detection: dict):
    """The Grad-CAM hot spot of the test errors (:func:`cfdebug.revise.region.hot_spot`): where the
    base model looks on its errors more than on its correct predictions, from up to 64 of each."""
    from ..revise.region import hot_spot

    images = detection["images"]  # one row per test image, in split order
    errors = [i for i, r in enumerate(images) if r["error"]][:64]
    correct = [i for i, r in enumerate(images) if not r["error"]][:64]
    if not errors or not correct:
        return None
    preds = [r["predicted"] for r in images]
    try:
        maps_e = gradcam_maps(ws, "test", errors, [preds[i] for i in errors])
        maps_c = gradcam_maps(ws, "test", correct, [preds[i] for i in correct])
        return memo(("hot-spot", ws_key(ws)), lambda: hot_spot(maps_e, maps_c))
    except CfdebugError as exc:
        show_user_error(exc)


def suggested_filters(ws, n: int = 8) -> list[int]:
    """The ``n`` most class-specific filters (the Class filters page's ranking)."""
    from ..revise import most_specific_filters

    try:
        return memo(("specific-filters", ws_key(ws), n), lambda: most_specific_filters(ws, n))
    except CfdebugError as exc:
        show_user_error(exc)


def launch_revise(ws, method: str, region, filters, seeds: list[int], config) -> str:
    """Start a revise run in the background: the same command a user types,
    ``python -m cfdebug revise --config run.json``. A mistake shows in the error box."""
    from ..jobs import revise_spec
    from ..revise import declare

    try:
        decl = declare(ws, method, region, filters)
        spec = revise_spec(ws.config, config, decl.as_dict(), seeds)
    except CfdebugError as exc:
        show_user_error(exc)
    return start_run(ws, "revise", spec)


def model_weights(record, part: str) -> Path | None:
    """The weights of the first seed's ``part`` ("method" or "control") of a finished run, when on disk."""
    records = [r for r in (record.result or {}).get(part, []) if r.get("weights")]
    path = Path(records[0]["weights"]) if records else None
    return path if path is not None and path.is_file() else None


def revised_workspace(ws, weights: Path):
    """The workspace with ``weights`` instead of its model's (cached; for Grad-CAM before/after)."""
    from ..workspace import Workspace

    cfg = replace(ws.config, model=replace(ws.config.model, weights=str(weights)))
    try:
        return memo(("revised-ws", str(weights), ws_key(ws)), lambda: Workspace(cfg), max_entries=4)
    except CfdebugError as exc:
        show_user_error(exc)


def part_label(row: dict) -> str:
    """``"control · seed 0"`` or ``"region-counterfactual · seed 0"`` from an epoch row's tag."""
    return f"{row.get('part', '?')} · seed {row.get('seed', '?')}"


def live_curves(record, progress) -> None:
    """The running revise run's per-epoch loss terms and counterfactual validation accuracy (the
    :func:`~cfdebug.ui.runs.run_monitor` extras of the Revise page)."""
    epoch_curves(record, epoch_rows(progress, part_label), "per-epoch loss terms and validation accuracy (counterfactual)")
