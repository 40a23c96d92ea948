"""Batched Grad-CAM at the target layer through captum's ``LayerGradCam``.

Maps are computed a batch at a time on the workspace device (captum and grad-cam users'
most common complaint is a per-image loop), upsampled to the input size and scaled to [0, 1]
per image.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch
from torch import nn

from .errors import CfdebugError


def _without_inplace(model: nn.Module) -> list[nn.Module]:
    """Turn off ``inplace`` on activations (an in-place ReLU breaks the layer's gradient hook);
    return the modules changed so the caller can restore them."""
    changed = []
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
            changed.append(module)
    return changed


def _frozen_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Stop ``model``'s parameters from requiring grad; return those changed (to restore).

    Grad-CAM needs the gradient at the target layer only: with frozen parameters autograd records
    nothing before that layer (captum makes the layer's output require grad itself), so the body's
    forward runs at inference cost."""
    changed = [p for p in model.parameters() if p.requires_grad]
    for p in changed:
        p.requires_grad_(False)
    return changed


def gradcam(
    model: nn.Module,
    layer: str,
    images: torch.Tensor,
    targets: Sequence[int] | torch.Tensor,
    device: torch.device,
    batch_size: int = 64,
) -> np.ndarray:
    """Grad-CAM maps ``[B, H, W]`` float32 in [0, 1] for ``images`` [B, 3, H, W] (normalised)
    and the class ``targets`` [B] (e.g. the predicted class)."""
    from captum.attr import LayerAttribution, LayerGradCam

    modules = dict(model.named_modules())
    if layer not in modules:
        raise CfdebugError(f"The model has no module named {layer!r} for Grad-CAM.")
    if batch_size <= 0:
        raise CfdebugError(f"Expected `batch_size` to be a positive integer, but got {batch_size}.")
    targets = torch.as_tensor(targets, dtype=torch.long)
    if images.dim() != 4 or len(targets) != len(images):
        raise CfdebugError(f"Expected images [B, 3, H, W] and B targets, but got {tuple(images.shape)} and {len(targets)} targets.")
    model.eval()
    changed = _without_inplace(model)
    frozen = _frozen_parameters(model)
    try:
        explainer = LayerGradCam(model, modules[layer])
        maps = []
        for start in range(0, len(images), batch_size):
            # Channels-last input: CPU convolutions on a batch run ~1.5-2x faster (oneDNN's NHWC
            # kernels), one image hardly changes; the maps agree with NCHW to float rounding.
            x = images[start : start + batch_size].to(device).contiguous(memory_format=torch.channels_last)
            t = targets[start : start + batch_size].to(device)
            attr = explainer.attribute(x, target=t, relu_attributions=True)  # [b, 1, h, w]
            attr = LayerAttribution.interpolate(attr, tuple(x.shape[-2:]), interpolate_mode="bilinear")
            attr = attr[:, 0].detach().float()
            peak = attr.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
            maps.append((attr / peak).cpu())
    finally:
        for module in changed:
            module.inplace = True
        for p in frozen:
            p.requires_grad_(True)
    return torch.cat(maps).numpy()


#: The smallest side of a Grad-CAM map that can say where (a 1×1 or 2×2 map upsampled is a flat tint).
MIN_MAP_SIDE = 4


def layer_map_sizes(model: nn.Module, input_size: int, device: torch.device) -> list[tuple[str, int, int]]:
    """``(name, h, w)`` of every layer down to one level of nesting (``layer3``, ``features.28``)
    whose output is a feature map ``[B, C, h, w]``, in forward order, for one zero image of side
    ``input_size`` (one forward pass through :func:`cfdebug.hooks.capture`)."""
    from .hooks import capture

    names = [n for n, m in model.named_modules() if n and n.count(".") <= 1 and not isinstance(m, (nn.BatchNorm2d, nn.Dropout, nn.Dropout2d))]
    shape = lambda out: torch.tensor(out.shape[-2:] if torch.is_tensor(out) and out.dim() == 4 else (0, 0))  # noqa: E731
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), capture(model, names, reduce=shape) as seen:
            model(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        model.train(was_training)
    return [(n, int(hw[0]), int(hw[1])) for n, hw in seen.activations.items() if int(hw[0]) > 0]


def usable_gradcam_layer(sizes: Sequence[tuple[str, int, int]], target: str) -> str:
    """The layer Grad-CAM is drawn at: ``target`` when its map is at least :data:`MIN_MAP_SIDE` on
    a side, else the deepest layer before it (in ``sizes``' forward order, :func:`layer_map_sizes`)
    whose map is; ``target`` when none is."""
    order = [n for n, _, _ in sizes]
    if target not in order:
        return target
    for name, h, w in reversed(list(sizes)[: order.index(target) + 1]):
        if min(h, w) >= MIN_MAP_SIDE:
            return name
    return target


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a Grad-CAM map ``[h, w]`` in [0, 1] (resized to the image) over ``image`` [H, W, 3] uint8."""
    h, w = image.shape[:2]
    heat = cv2.resize(np.clip(cam, 0, 1).astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    coloured = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]  # BGR → RGB
    return (alpha * coloured + (1 - alpha) * image).clip(0, 255).astype(np.uint8)


def filter_maps(model: nn.Module, layer: str, images: torch.Tensor, filter_index: int, device: torch.device, activation=None) -> np.ndarray:
    """Where one target-layer filter fires: its activation map ``[B, H, W]`` float32 in [0, 1]
    for ``images`` [B, 3, H, W], upsampled to the input size (the receptive region to highlight)."""
    from .hooks import capture

    with torch.inference_mode(), capture(model, layer) as cap:
        model.eval()(images.to(device))
    fmap = cap.activations[layer]  # [B, C, h, w]
    if not 0 <= filter_index < fmap.shape[1]:
        raise CfdebugError(f"Expected `filter_index` in 0..{fmap.shape[1] - 1}, but got {filter_index}.")
    if activation is not None:
        fmap = activation(fmap)
    one = fmap[:, filter_index : filter_index + 1].float()  # [B, 1, h, w]
    one = torch.nn.functional.interpolate(one, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    peak = one.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return (one.clamp_min(0) / peak).cpu().numpy()


def region_overlay(image: np.ndarray, heat: np.ndarray, level: float = 0.5, scale: int = 4,
                   colour: tuple[int, int, int] = (255, 140, 0), alpha: float = 0.25) -> np.ndarray:
    """Where ``heat`` ``[h, w]`` in [0, 1] is at least ``level``, as a translucent tint with an
    outline over ``image`` [H, W, 3] uint8, so the image stays readable (a jet blend hides a small
    digit). Small images are upscaled ``scale``× (nearest) first, so the outline is thin.

    Returns ``[scale·H, scale·W, 3]`` uint8.
    """
    image = np.asarray(image, dtype=np.uint8)
    h, w = image.shape[:2]
    big = cv2.resize(image, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
    heat = cv2.resize(np.clip(np.asarray(heat, np.float32), 0, 1), (w * scale, h * scale), interpolation=cv2.INTER_LINEAR)
    region = (heat >= level).astype(np.uint8)  # [sH, sW]
    out = big.astype(np.float32)
    tint = np.asarray(colour, np.float32)
    out[region > 0] = (1 - alpha) * out[region > 0] + alpha * tint
    out = out.clip(0, 255).astype(np.uint8)
    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), thickness=max(1, scale // 2))
    return out


def region_share(maps: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    """The share of each map's mass inside ``maps[:, rows, cols]``: ``[B]`` float64 in [0, 1]
    for ``maps`` [B, H, W] ≥ 0 (0 for an all-zero map). Compare it with the region's area share
    (``region pixels / (H·W)``): a map that ignores the region has about that share."""
    m = np.asarray(maps, dtype=np.float64)
    if m.ndim != 3:
        raise CfdebugError(f"Expected `maps` of shape [B, H, W], but got shape {m.shape}")
    total = m.reshape(len(m), -1).sum(1)  # [B]
    inside = m[:, rows, cols].reshape(len(m), -1).sum(1)  # [B]
    return np.where(total > 0, inside / np.maximum(total, 1e-12), 0.0)
