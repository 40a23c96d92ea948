"""Re-evaluation of a revised model, as Reveal to Revise does: on the test split, per image.

For every kept model (the method's, the control's, the base model) :func:`reevaluator` records:

* ``test_predictions`` ``[N]``: for accuracy and per-class recall (paired verdicts);
* with a region, the **artifact sensitivity** two ways: ``cam_share`` ``[N]``, the share of the
  Grad-CAM mass (predicted class; at the target layer, or the deepest before it whose map is
  at least 4×4, as the pages draw it) inside the region, to compare with the region's
  area share; and ``wrong_region_predictions`` ``[N]`` on a copy of the test split whose region
  shows a *wrong* class's content (the rectangle of a training image of another class; on Biased
  Digits the training squares carry their class's colour), whose accuracy a model that ignores the
  region keeps.

The flags that remain are counted from the predictions and the base model's flags (the review
budget of the Flagged page) when the verdicts are made (:mod:`cfdebug.revise.verdicts`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .interventions import VALIDATION_SEED, split_tensors
from .region import wrong_class_region

__all__ = ["reevaluator", "WRONG_REGION_SEED"]

#: The seed of the wrong-class test copy (the same donors for every model).
WRONG_REGION_SEED = VALIDATION_SEED + 1


def _predict(model: torch.nn.Module, images: torch.Tensor, device) -> np.ndarray:
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(images[i : i + 256].to(device)).argmax(1).cpu() for i in range(0, len(images), 256)]).numpy()


def reevaluator(ws, region) -> Callable[[torch.nn.Module], dict]:
    """``evaluate(model) → {"test_predictions", "test_acc"[, "cam_share", "wrong_region_predictions",
    "wrong_region_acc", "cam_share_mean"]}`` (lists, JSON-ready) for models of ``ws``; the test
    tensors and the wrong-class copy are built once."""
    from ..gradcam import gradcam, layer_map_sizes, region_share, usable_gradcam_layer

    device = torch.device(ws.device)
    # The layer every page draws Grad-CAM at: the target, or the deepest layer before it whose map
    # can say where (resnet18 at 32 px: layer4's map is 1×1, a flat share for every image).
    layer = usable_gradcam_layer(layer_map_sizes(ws.model, ws.data.input_size, device), ws.target.name)
    images, labels, _ = split_tensors(ws, "test")
    y = labels.numpy()
    wrong = None
    if region is not None:
        donors, donor_labels, _ = split_tensors(ws, "train")
        wrong = wrong_class_region(images, labels, donors, donor_labels, region, WRONG_REGION_SEED)
        del donors

    def evaluate(model: torch.nn.Module) -> dict:
        pred = _predict(model, images, device)
        out = {"test_predictions": pred.tolist(), "test_acc": float(np.mean(pred == y))}
        if region is not None:
            maps = gradcam(model, layer, images, torch.from_numpy(pred), device)  # [N, S, S] in [0, 1]
            share = region_share(maps, region.rows, region.cols)
            wrong_pred = _predict(model, wrong, device)
            out.update(cam_share=share.tolist(), cam_share_mean=float(share.mean()), wrong_region_predictions=wrong_pred.tolist(),
                       wrong_region_acc=float(np.mean(wrong_pred == y)))
        return out

    return evaluate
