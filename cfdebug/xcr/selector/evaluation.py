"""A trained selector run over data: its hard top-k (and softmax) masks, the approximator's
accuracy on ``T(x)``, and the black box's probabilities on ``x`` and ``T(x)``."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CfdebugError
from .masks import apply_mask, selection_map, topk_mask
from .networks import PatchSelector


def _batches(data, batch_size: int):
    """A Dataset becomes an in-order DataLoader; a DataLoader (or any iterable) is used as is."""
    if isinstance(data, torch.utils.data.Dataset):
        return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    return data


def _images(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def compute_masks(selector: PatchSelector, data, k: int, device: torch.device, batch_size: int = 256) -> np.ndarray:
    """Hard top-k explanation masks of ``selector`` in the order ``data`` yields its images.

    Args:
        selector: a trained :class:`PatchSelector` (its train/eval mode is restored afterwards).
        data: a Dataset of ``(image [C, H, W], …)`` items (read in order, ``batch_size`` at a
            time) or an iterable of batches ``(images [B, C, H, W], …)`` / image tensors.
        k: patches kept per image, 1..d.
        device: where the selector runs; batches are moved there.

    Returns:
        ``[N, d]`` bool NumPy array with exactly ``k`` True per row.
    """
    return selector_maps(selector, data, k, device, batch_size, soft=False)[0]


@torch.no_grad()
def selector_maps(selector, data, k, device, batch_size, soft: bool):
    was_training = selector.training
    selector.eval()
    hard, probs = [], []
    try:
        for batch in _batches(data, batch_size):
            log_p = selector(_images(batch).to(device))  # [B, d]
            hard.append(topk_mask(log_p, k).bool().cpu())
            if soft:
                probs.append(log_p.exp().float().cpu())
    finally:
        selector.train(was_training)
    if not hard:
        raise CfdebugError("Expected at least one image to compute masks for, but the data is empty")
    return torch.cat(hard).numpy(), (torch.cat(probs).numpy() if soft else None)


@torch.no_grad()
def approximator_accuracy(selector: PatchSelector, approximator: nn.Module, data, k: int, patch_size: int, device: torch.device, mode: str = "Topk", batch_size: int = 256) -> float:
    """Accuracy in ``[0, 1]`` of ``approximator`` on ``T(x)`` with the evaluation mask of ``mode``.

    ``data`` yields ``(images, labels, …)`` batches or is such a Dataset; the labels are the
    true classes (the XCR measure, also reported for VIBI-trained selectors). Both networks'
    train/eval modes are restored afterwards.
    """
    return approximator_scores(selector, approximator, data, k, patch_size, device, mode, batch_size)[0]


@torch.no_grad()
def approximator_scores(selector, approximator, data, k, patch_size, device, mode="Topk", batch_size=256) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of the approximator on ``T(x)`` against the true labels
    (NaN for no data); see :func:`approximator_accuracy`."""
    modes = (selector.training, approximator.training)
    selector.eval()
    approximator.eval()
    correct = total = 0
    loss_sum = 0.0
    try:
        for x, y, *_ in _batches(data, batch_size):
            x, y = x.to(device), y.to(device)
            mask = selection_map(selector(x), k, mode)
            logits = approximator(apply_mask(x, mask, patch_size))
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            total += len(y)
    finally:
        selector.train(modes[0])
        approximator.train(modes[1])
    return (correct / total, loss_sum / total) if total else (float("nan"), float("nan"))


@torch.no_grad()
def masked_probabilities(model: nn.Module, data, masks, patch_size: int, device: torch.device, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Black-box softmax on ``x`` and on ``T(x)``, the inputs of ``metrics.explanation_metrics``.

    Args:
        model: the black box (eval mode is used; its mode is restored).
        data: Dataset or in-order batches of ``(images [B, C, H, W], …)``.
        masks: ``[N, d]`` bool/float, one row per image in ``data``'s order.
        patch_size: ``p`` of the masks.

    Returns:
        ``(probs_full, probs_masked)``, each ``[N, K]`` float32.
    """
    masks = torch.as_tensor(np.asarray(masks))
    was_training = model.training
    model.eval()
    full, masked, start = [], [], 0
    try:
        for batch in _batches(data, batch_size):
            x = _images(batch).to(device)
            m = masks[start : start + len(x)].to(device)
            start += len(x)
            full.append(torch.softmax(model(x).float(), 1).cpu())
            masked.append(torch.softmax(model(apply_mask(x, m, patch_size)).float(), 1).cpu())
    finally:
        model.train(was_training)
    if start != len(masks):
        raise CfdebugError(f"Expected one mask per image ({start} images), but got {len(masks)} masks")
    return torch.cat(full).numpy(), torch.cat(masked).numpy()
