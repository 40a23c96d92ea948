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
from .errors import show_user_error
from .runs import start_run
from .workspace import extraction, sample_images, shown

RUN_KIND = "xcr"


def default_config(ws):
    """The XCR config the form starts from (the demo's for the embedded demo)."""
    from ..xcr.retrain import default_xcr_config

    return default_xcr_config(ws.config)


def build_config(ws, *, k: int, beta: float, selector_epochs: int, epochs: int, seeds: int, all_severities: bool, random_baseline: bool):
    """An :class:`~cfdebug.xcr.retrain.XCRConfig` from the form's values (validated now, so a
    mistake shows in the error box instead of a failed run)."""
    from ..xcr.patches import check_patch_grid
    from ..xcr.retrain import override_xcr_config

    base = default_config(ws)
    try:
        config = override_xcr_config(
            base, k=int(k), beta=float(beta), selector_epochs=int(selector_epochs), epochs=int(epochs),
            seeds=tuple(range(int(seeds))), severities=(1, 2, 3, 4, 5) if all_severities else None,
            random_baseline=bool(random_baseline),
        )
        check_patch_grid(config, ws.data.input_size)
        return config
    except CfdebugError as exc:
        show_user_error(exc)


def start_xcr_run(ws, config) -> str:
    """Start an XCR run for ``config`` in the background (:func:`cfdebug.ui.runs.start_run`); its id."""
    from ..jobs import xcr_spec

    return start_run(ws, RUN_KIND, xcr_spec(ws.config, config))


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
