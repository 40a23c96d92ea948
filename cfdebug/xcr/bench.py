"""Explanation speed: the XCR selector's masks/s against captum ``Occlusion`` on the same images
(``python -m cfdebug bench xcr`` prints :func:`~cfdebug.xcr.text.format_bench` of the result)."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import torch

from ..config import check_int
from ..errors import CfdebugError
from ..metrics import explanation_metrics
from ..runtime import Progress
from ..store import jsonable
from .patches import check_k, num_patches
from .selector import SelectorConfig, compute_masks, masked_probabilities, trained_selector

__all__ = ["bench_xcr"]


def _occlusion_masks(model, x: torch.Tensor, targets: torch.Tensor, k: int, patch_size: int, per_eval: int) -> torch.Tensor:
    """Top-k patches by captum ``Occlusion`` attribution: ``[B, d]`` bool."""
    from captum.attr import Occlusion

    p = patch_size
    attr = Occlusion(model).attribute(
        x, target=targets, sliding_window_shapes=(x.shape[1], p, p), strides=(x.shape[1], p, p), baselines=0.0,
        perturbations_per_eval=per_eval,
    )  # [B, C, H, W]; constant within a patch and across channels
    b, _, h, w = attr.shape
    score = attr.sum(1).reshape(b, h // p, p, w // p, p).sum((2, 4)).reshape(b, -1)  # [B, d] patch-major, row-major
    index = score.topk(k, dim=1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, index, True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_selector(selector, batches, k: int, device, batch_size: int, repeats: int):
    """Fastest of ``repeats`` passes of the selector's hard top-k over ``batches``: ``(seconds, masks)``."""
    compute_masks(selector, batches[:1], k, device, batch_size)  # warm-up
    best, masks = math.inf, None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        masks = compute_masks(selector, batches, k, device, batch_size)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, masks


def _time_occlusion(model, x, targets, k: int, patch_size: int, device, batch_size: int, progress):
    """One pass of Occlusion, ``batch_size`` images at a time: ``(seconds, masks [n, d] bool)``."""
    n = len(x)
    chunk = max(1, min(n, batch_size))
    # Forwards of ~512 perturbed images (at most ~256 MB of inputs): Occlusion's own batching.
    image_bytes = 4 * x[0].numel()
    per_eval = max(1, min(512 // chunk, (256 << 20) // max(1, image_bytes * chunk)))
    occ = []
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, n, chunk):
            occ.append(_occlusion_masks(model, x[s : s + chunk].to(device), targets[s : s + chunk].to(device), k, patch_size, per_eval).cpu())
            if progress is not None:
                progress(min(1.0, (s + chunk) / n), f"Occlusion {min(n, s + chunk)}/{n} images")
    _sync(device)
    return time.perf_counter() - t0, torch.cat(occ).numpy()


def bench_xcr(ws, n_images: int = 64, batch_size: int = 64, config: SelectorConfig | None = None, repeats: int = 3, progress: Progress | None = None) -> dict:
    """Explanation speed: selector masks/s against captum ``Occlusion`` on the same images.

    Both explain the black box's predicted class on the first ``n_images`` test images with
    ``k`` patches of side ``p``: the selector by its hard top-k; Occlusion by the ``k`` patches
    with the largest attribution (sliding window ``(3, p, p)``, stride ``p``, baseline 0 = the
    dataset mean after normalisation, ``d`` forward passes per image, batched
    ``batch_size`` perturbed images at a time). The selector is trained (and cached) first and
    its training time is not counted; its timing is the fastest of ``repeats`` passes.

    Returns:
        ``{"n_images", "k", "patch_size", "d", "device", "selector_seconds", "occlusion_seconds",
        "selector_masks_per_s", "occlusion_masks_per_s", "ratio", "target_ratio" (100),
        "selector_avg_drop", "occlusion_avg_drop", "selector_fidelity", "occlusion_fidelity"}``.
    """
    check_int(n_images, "n_images")
    check_int(batch_size, "batch_size")
    check_int(repeats, "repeats")
    from .retrain import default_xcr_config

    cfg = replace(config or default_xcr_config(ws.config).selector, mode="Topk")
    size = ws.data.input_size
    d = num_patches(size, size, cfg.patch_size)
    k = check_k(cfg.k, d)
    device = torch.device(ws.device)
    split = ws.data.torch_split("test")
    n = min(n_images, len(split))
    if n == 0:
        raise CfdebugError("Expected test images to benchmark on, but the test split is empty.")
    x = torch.stack([split[i][0] for i in range(n)])  # [n, 3, S, S]
    selector, _, _ = trained_selector(ws, cfg, progress)
    model = ws.model.eval()
    with torch.no_grad():
        targets = torch.cat([model(x[s : s + 256].to(device)).argmax(1).cpu() for s in range(0, n, 256)])
    batches = [x[s : s + batch_size] for s in range(0, n, batch_size)]  # in-memory batches, as Occlusion gets them
    selector_seconds, sel_masks = _time_selector(selector, batches, k, device, batch_size, repeats)
    occlusion_seconds, occ_masks = _time_occlusion(model, x, targets, k, cfg.patch_size, device, batch_size, progress)

    out = {"n_images": n, "k": k, "patch_size": cfg.patch_size, "d": d, "device": str(device),
           "selector_seconds": selector_seconds, "occlusion_seconds": occlusion_seconds,
           "selector_masks_per_s": n / max(selector_seconds, 1e-12), "occlusion_masks_per_s": n / max(occlusion_seconds, 1e-12)}
    out["ratio"] = out["selector_masks_per_s"] / out["occlusion_masks_per_s"]
    out["target_ratio"] = 100.0
    for name, masks in (("selector", sel_masks), ("occlusion", occ_masks)):
        full, masked = masked_probabilities(model, batches, masks, cfg.patch_size, device)
        m = explanation_metrics(full, masked)
        out[f"{name}_avg_drop"], out[f"{name}_fidelity"] = m["avg_drop"], m["fidelity"]
    return jsonable(out)
