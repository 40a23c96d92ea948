"""Cached paper-A results for the Class-filters and Flagged-predictions pages."""

from __future__ import annotations

import numpy as np
import streamlit as st

from ..config import config_dict
from ..errors import CfdebugError
from ..store import stable_hash
from .errors import show_user_error
from .cache import memo
from .workspace import await_prepare, inline, progress_callback, sample_images, shown


def ws_key(ws) -> str:
    """The key of an open workspace in the page caches (its artifacts' key parts)."""
    return stable_hash(ws.key_parts)


def _prepared(ws, through: str, what: str) -> None:
    """Make sure the prepare artifacts up to ``through`` are cached: on a miss (outside inline
    mode) a background prepare run makes them while the page shows its progress and stops."""
    from ..jobs import prepared

    if inline() or prepared(ws, through):
        return
    failure = await_prepare(ws.config, through, lambda record: prepared(ws, through), what)
    show_user_error(CfdebugError(failure))


def _detection(ws, config, progress=None) -> dict:
    from ..detect import run_detection

    key = ("detection", ws_key(ws), stable_hash(config_dict(config)))
    return memo(key, lambda: run_detection(ws, config, progress))


def detection(ws, config=None) -> dict:
    """``run_detection`` for the workspace (CFE heads, global filters, flags). With the default
    config a miss is computed by a background prepare run; another config is computed here."""
    from ..detect import DetectConfig

    try:
        if config is None or config == DetectConfig():
            _prepared(ws, "detect", f"Fitting the CFE heads of {ws.config.model.name} and scoring its test predictions")
        config = config or DetectConfig()
        bar = st.empty()
        result = _detection(ws, config, progress_callback(bar))
        bar.empty()
        return result
    except CfdebugError as exc:
        show_user_error(exc)


def _filters(ws):
    from ..mcfilters import global_mc_filters

    return memo(("filters", ws_key(ws)), lambda: global_mc_filters(ws))


def global_filters(ws):
    """The workspace's cached global MC filters (histogram, magnitude, counts)."""
    try:
        _prepared(ws, "filters", f"Fitting the CFE heads of {ws.config.model.name}")
        return _filters(ws)
    except CfdebugError as exc:
        show_user_error(exc)


def local_masks(ws, split: str, indices, classes) -> np.ndarray:
    """MC_x ``[n, C]`` bool for images ``indices`` of ``split`` from the heads of ``classes``."""
    from ..cfe import mc_heads, predict_masks

    try:
        _prepared(ws, "filters", f"Fitting the CFE heads of {ws.config.model.name}")
        fitted = mc_heads(ws)
        features = ws.extractions.get(split).features[np.asarray(indices)]
        return predict_masks(fitted.heads, features, np.asarray(classes))
    except CfdebugError as exc:
        show_user_error(exc)


def _batch(ws, split: str, indices):
    import torch

    data = ws.data.torch_split(split)
    return torch.stack([data[int(i)][0] for i in indices])


def gradcam_maps(ws, split: str, indices, targets) -> np.ndarray:
    """Grad-CAM maps ``[n, H, W]`` float32 in [0, 1] (input size) toward ``targets``, in one batch,
    cached (:func:`~cfdebug.ui.cache.memo`): the one Grad-CAM computation every page's overlays
    are drawn from. Do not modify the returned array."""
    from ..gradcam import gradcam

    indices, targets = tuple(int(i) for i in indices), tuple(int(t) for t in targets)
    compute = lambda: gradcam(ws.model, ws.target.name, _batch(ws, split, indices), list(targets), ws.device)  # noqa: E731
    try:
        return memo(("gradcam", ws_key(ws), split, indices, targets), compute, max_entries=32)
    except CfdebugError as exc:
        show_user_error(exc)


def gradcam_overlays(ws, split: str, indices, targets) -> list[np.ndarray]:
    """Grad-CAM overlays (uint8 [H, W, 3]) for ``indices`` toward ``targets`` (:func:`gradcam_maps`);
    an image that may not be shown (:func:`~cfdebug.ui.workspace.shown`) stays withheld."""
    from ..gradcam import overlay

    if len(indices) == 0:
        return []
    maps = gradcam_maps(ws, split, indices, targets)
    images = sample_images(ws, split, indices)
    return [overlay(image, m) if shown(ws, split, i) else image for i, image, m in zip(indices, images, maps)]


def causal_check(ws, cls: int, top_n: int, draws: int) -> dict:
    """Zero class ``cls``'s top global MC filters vs as many random ones (test recall drop)."""
    from ..detect import ablation

    try:
        return ablation(ws, cls, top_n=top_n, n_random_draws=draws)
    except CfdebugError as exc:
        show_user_error(exc)
