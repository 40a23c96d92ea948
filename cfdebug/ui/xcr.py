"""Streamlit side of the Calibration & robustness page (paper B, XCR).

The report itself runs as a background run (``python -m cfdebug xcr --config RUN_DIR/run.json
--run-id ID``), started, listed and watched like every run (:mod:`cfdebug.ui.runs`); the page
draws the stored result. The heavy objects (selector masks, Grad-CAM) come from the workspace's
on-disk cache.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import streamlit as st

from ..errors import CfdebugError
from .cache import memo
from .errors import show_user_error
from .runs import start_run
from .workspace import extraction, sample_images, shown

RUN_KIND = "xcr"


def default_config(ws):
    """The XCR config the form starts from (the demo's for the embedded demo)."""
    from ..xcr.retrain import default_xcr_config

    return default_xcr_config(ws.config)


def build_config(ws, *, k: int, beta: float, selector_epochs: int, epochs: int, seeds: int, all_severities: bool, random_baseline: bool,
                 table1_sweep: bool = False):
    """An :class:`~cfdebug.xcr.retrain.XCRConfig` from the form's values (validated now, so a
    mistake shows in the error box instead of a failed run). ``table1_sweep``: Table 1 over
    paper B's grid (:data:`~cfdebug.config.TABLE1_SWEEP`) instead of the one ``k, β``."""
    from ..config import TABLE1_SWEEP
    from ..xcr.patches import check_patch_grid
    from ..xcr.retrain import override_xcr_config

    base = default_config(ws)
    try:
        config = override_xcr_config(
            base, k=int(k), beta=float(beta), selector_epochs=int(selector_epochs), epochs=int(epochs),
            seeds=tuple(range(int(seeds))), severities=(1, 2, 3, 4, 5) if all_severities else None,
            random_baseline=bool(random_baseline), **(TABLE1_SWEEP if table1_sweep else {}),
        )
        check_patch_grid(config, ws.data.input_size)
        return config
    except CfdebugError as exc:
        show_user_error(exc)


def _unit_costs(ws, config):
    """The measured calibration step (:func:`cfdebug.xcr.estimate.measure_unit_costs`), once per
    workspace and per setting that changes a step's cost (cached for the process)."""
    from ..config import config_dict
    from ..store import stable_hash
    from ..xcr.estimate import measure_unit_costs
    from .filters import ws_key

    sel = config_dict(config.selector)
    parts = {k: sel[k] for k in ("k", "patch_size", "width", "batch_size", "estimator")}
    key = ("xcr-unit-costs", ws_key(ws), stable_hash(parts, config.retrain.batch_size, config.corruptions, config.severities))
    return memo(key, lambda: measure_unit_costs(ws, config), max_entries=8)


def estimate(ws, config):
    """How long a run of ``config`` will take on this machine (:class:`~cfdebug.xcr.estimate.XCREstimate`),
    from a few timed steps (measured once per workspace and step size, a few seconds)."""
    from ..xcr.estimate import estimate_xcr

    try:
        with st.spinner("Timing a few training steps on this machine to estimate the run…"):
            return estimate_xcr(ws, config, _unit_costs(ws, config))
    except CfdebugError as exc:
        show_user_error(exc)


def start_xcr_run(ws, config, at_launch=None) -> str:
    """Start an XCR run for ``config`` in the background (:func:`cfdebug.ui.runs.start_run`); its
    id. ``at_launch`` (an :class:`~cfdebug.xcr.estimate.XCREstimate`) is kept in the run's spec,
    so its monitor can hold the run to it."""
    from ..jobs import xcr_spec

    spec = xcr_spec(ws.config, config)
    if at_launch is not None:
        spec["estimate"] = at_launch.as_dict()
    return start_run(ws, RUN_KIND, spec)


def pace(record, progress, now: float | None = None) -> dict | None:
    """How a running XCR run keeps to its estimate: ``{"elapsed", "left", "low", "high"}`` seconds
    (``low``/``high``: the range estimated at launch, ``None`` when the run has none; ``left``:
    the whole run's time left at the pace measured so far, ``None`` until the bar has moved).
    The report's bar moves in proportion to estimated work (:func:`cfdebug.xcr.estimate.stage_spans`),
    so ``elapsed × (1 − f) / f`` is the time left at the run's own speed."""
    import time

    at_launch = (record.config or {}).get("estimate") or {}
    elapsed = max((time.time() if now is None else now) - record.created, 0.0)
    f = float(progress.fraction or 0.0)
    left = elapsed * (1.0 - f) / f if f >= 0.02 else None
    return {"elapsed": elapsed, "left": left, "low": at_launch.get("low"), "high": at_launch.get("high")}


def pace_line(record, progress) -> None:
    """The XCR monitor's extra line (:func:`cfdebug.ui.runs.run_monitor` extras): the estimate made
    at launch, the time so far, and the whole run's time left at its measured pace."""
    from ..runs.progress import describe_seconds_left
    from ..xcr.estimate import describe_duration

    p = pace(record, progress)
    parts = []
    if p["low"] is not None:
        parts.append(f"estimated at launch: {describe_duration(p['low'], p['high'])}")
    parts.append(f"{p['elapsed'] / 60:.1f} min so far")
    if p["left"] is not None:
        parts.append(f"whole run: {describe_seconds_left(p['left'])} at the pace measured so far")
        if p["high"] is not None and p["elapsed"] + p["left"] > 2 * p["high"]:
            parts.append("slower than estimated (is the machine busy with other work?)")
    st.caption(" · ".join(parts))


def xcr_verdict_rows(ws, result: dict) -> list | None:
    """XCR vs vanilla for a finished run's ``result``, paired over seeds and test images
    (:func:`cfdebug.claims.xcr_verdicts` on the report's per-image terms, kept in the workspace's
    store), or ``None`` for a run made before reports kept them."""
    from ..claims import xcr_verdicts
    from ..config import xcr_config_from_dict
    from ..xcr.report import per_image_scores

    if "per_image" not in result:
        return None
    try:
        return xcr_verdicts(result, per_image_scores(ws, xcr_config_from_dict(result["config"]), result))
    except CfdebugError:
        return None


def mask_gallery(ws, selector_config: dict, n: int = 12, flagged_first: bool = False) -> list[dict]:
    """Rows for the mask gallery: ``{"index", "image", "mask", "tx", "gradcam", "caption"}``.

    Images are test images at the model's input size; ``mask`` is the hard top-k patch mask,
    ``tx`` the counterfactual ``T(x)`` (dropped patches in the dataset mean colour), ``gradcam``
    the black box's Grad-CAM toward its prediction. Order: flagged predictions first (paper A's
    detector, when ``flagged_first``), then errors, then the least confident predictions.
    """
    from ..xcr import explanation_images
    from ..xcr.selector import SelectorConfig, selector_masks
    from .filters import detection, gradcam_overlays

    try:
        cfg = replace(SelectorConfig(**selector_config), mode="Topk")
        masks = selector_masks(ws, cfg, "test").masks
    except (CfdebugError, TypeError) as exc:
        show_user_error(exc if isinstance(exc, CfdebugError) else CfdebugError(f"The run's selector config is not readable: {exc}"))
    test = extraction(ws, "test")
    preds, labels, conf = test.preds, test.labels, test.probs.max(1)
    flagged = np.zeros(len(labels), bool)
    if flagged_first:
        flagged = np.asarray([bool(r["flagged"]) for r in detection(ws)["images"]])
    # Sort keys: flagged first, then errors, then low confidence (lexsort: last key is primary).
    order = np.lexsort((conf, preds == labels, ~flagged))[:n]
    classes = ws.data.classes
    cams = gradcam_overlays(ws, "test", order, preds[order])
    rows = []
    for j, i in enumerate(order):
        image = np.asarray(sample_images(ws, "test", [i])[0], dtype=np.uint8)
        if image.shape[:2] != (ws.data.input_size, ws.data.input_size):
            from PIL import Image

            image = np.asarray(Image.fromarray(image).resize((ws.data.input_size,) * 2, Image.BILINEAR))
        mask_img, tx = explanation_images(image, masks[i], cfg.patch_size, ws.data.mean) if shown(ws, "test", i) else (image, image)
        mark = "✗" if preds[i] != labels[i] else "✓"
        flag = " ⚑" if flagged[i] else ""
        rows.append({
            "index": int(i), "image": image, "mask": mask_img, "tx": tx, "gradcam": cams[j],
            "caption": f"{mark}{flag} true {classes[labels[i]]} · pred {classes[preds[i]]} ({conf[i]:.2f})",
        })
    return rows


def corner_patches_kept(ws, selector_config: dict) -> dict | None:
    """How often the selector's hard top-k mask keeps the demo's corner-square patches on test
    images, against chance (a random k-hot mask keeps each patch with probability k/d).
    ``{"kept", "chance", "kept_errors", "kept_correct"}`` in [0, 1]; ``None`` off the embedded
    digits beds."""
    from ..data.digits import SQUARE
    from ..xcr.selector import SelectorConfig, selector_masks

    if ws.config.data.source not in ("biased-digits", "hard-digits") or ws.data.input_size != 32:
        return None
    try:
        cfg = replace(SelectorConfig(**selector_config), mode="Topk")
        masks = np.asarray(selector_masks(ws, cfg, "test").masks, dtype=np.float32) > 0  # [N, d]
    except (CfdebugError, TypeError):
        return None
    p, s = cfg.patch_size, ws.data.input_size
    g = s // p
    square = np.zeros((s, s), bool)
    square[SQUARE] = True
    patches = square.reshape(g, p, g, p).any(axis=(1, 3)).reshape(-1)  # [d]: patches overlapping the square
    kept = masks[:, patches].mean(1)  # [N]
    test = extraction(ws, "test")
    wrong = test.preds != test.labels
    return {"kept": float(kept.mean()), "chance": float(masks.sum(1).mean() / masks.shape[1]),
            "kept_errors": float(kept[wrong].mean()) if wrong.any() else float("nan"), "kept_correct": float(kept[~wrong].mean())}
