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


#: Session state / URL parameter: the layer Grad-CAM is drawn at, when the user picked one.
CAM_LAYER_KEY = "cam"


def layer_sizes(ws) -> list[tuple[str, int, int]]:
    """``(name, h, w)`` of the model's feature-map layers at the workspace's input size, in
    forward order (:func:`cfdebug.gradcam.layer_map_sizes`), cached."""
    from ..gradcam import layer_map_sizes

    try:
        return memo(("layer-sizes", ws_key(ws)), lambda: layer_map_sizes(ws.model, ws.data.input_size, ws.device))
    except CfdebugError as exc:
        show_user_error(exc)


def gradcam_layer(ws) -> str:
    """The layer the pages draw Grad-CAM at: the one picked in the sidebar (``?cam=``), else the
    target layer, or, when the target's map is smaller than
    :data:`~cfdebug.gradcam.MIN_MAP_SIDE` on a side (resnet18's ``layer4`` at 32 px is 1×1: a
    flat tint), the deepest layer whose map is not (:func:`cfdebug.gradcam.usable_gradcam_layer`).
    The CFE heads, flags and treatment keep the target layer."""
    from ..gradcam import usable_gradcam_layer

    sizes = layer_sizes(ws)
    picked = _picked_layer()
    if picked and picked in {n for n, _, _ in sizes}:
        return picked
    return usable_gradcam_layer(sizes, ws.target.name)


def _picked_layer() -> str | None:
    """The Grad-CAM layer picked in the sidebar: in the URL, or kept in the session (a page switch
    drops the URL's page parameters)."""
    return st.query_params.get(CAM_LAYER_KEY) or st.session_state.get(CAM_LAYER_KEY)


def gradcam_layer_note(ws, where=st) -> None:
    """Under Grad-CAM images, when it matters: a caption when Grad-CAM is not at the target layer
    (which one, its map size, why), a warning when its map is smaller than
    :data:`~cfdebug.gradcam.MIN_MAP_SIDE` on a side (a flat tint); nothing when the target's map
    is usable. ``where``: the container to draw in."""
    from ..gradcam import MIN_MAP_SIDE

    sizes = {n: (h, w) for n, h, w in layer_sizes(ws)}
    target, layer = ws.target.name, gradcam_layer(ws)
    th, tw = sizes.get(target, (MIN_MAP_SIDE, MIN_MAP_SIDE))
    lh, lw = sizes.get(layer, (th, tw))
    size = ws.data.input_size
    if min(lh, lw) < MIN_MAP_SIDE:
        where.warning(f"Grad-CAM at `{layer}` is a {lh}×{lw} map at {size} px: upsampled it is a flat tint that carries no location. "
                      "Pick an earlier layer in the sidebar's **Grad-CAM layer**, or use a larger **Input size**.", icon=":material/warning:")
    elif layer != target:
        where.caption(f"Grad-CAM at `{layer}` ({lh}×{lw} map): the target layer `{target}` is {th}×{tw} at {size} px, which upsampled "
                      f"is a flat tint that says nothing about where the model looks. The filters, flags and treatment keep `{target}`; "
                      "the sidebar's **Grad-CAM layer** changes this.")


def gradcam_layer_picker(ws) -> None:
    """The sidebar's Grad-CAM layer choice (in the URL as ``?cam=``): the layers at or before the
    target, each with its map size; the default (:func:`gradcam_layer`) first."""
    sizes = layer_sizes(ws)
    names = [n for n, _, _ in sizes]
    if ws.target.name not in names:
        return
    from ..gradcam import usable_gradcam_layer

    default = usable_gradcam_layer(sizes, ws.target.name)
    options = [n for n in names[: names.index(ws.target.name) + 1] if n != default]
    options = [default] + options[::-1]
    label = {n: f"{n} ({h}×{w})" for n, h, w in sizes}
    picked = _picked_layer()
    index = options.index(picked) if picked in options else 0
    choice = st.sidebar.selectbox("Grad-CAM layer", options, index=index, format_func=lambda n: label[n] + (" · default" if n == default else ""),
                                  help="Where the Grad-CAM images of every page are computed (its map size at this input size). "
                                       "Default: the target layer, or the deepest layer with a map of at least 4×4 when the target's is smaller.",
                                  key=f"cam-{ws_key(ws)}")
    if choice == default:
        st.query_params.pop(CAM_LAYER_KEY, None)
        st.session_state.pop(CAM_LAYER_KEY, None)
    else:
        st.session_state[CAM_LAYER_KEY] = choice
        if st.query_params.get(CAM_LAYER_KEY) != choice:
            st.query_params[CAM_LAYER_KEY] = choice


def gradcam_maps(ws, split: str, indices, targets) -> np.ndarray:
    """Grad-CAM maps ``[n, H, W]`` float32 in [0, 1] (input size) toward ``targets`` at
    :func:`gradcam_layer`, in one batch, cached (:func:`~cfdebug.ui.cache.memo`): the one
    Grad-CAM computation every page's overlays are drawn from. Do not modify the returned array."""
    from ..gradcam import gradcam

    indices, targets = tuple(int(i) for i in indices), tuple(int(t) for t in targets)
    layer = gradcam_layer(ws)
    compute = lambda: gradcam(ws.model, layer, _batch(ws, split, indices), list(targets), ws.device)  # noqa: E731
    try:
        return memo(("gradcam", ws_key(ws), layer, split, indices, targets), compute, max_entries=32)
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
