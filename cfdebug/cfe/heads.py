"""The MC and MI heads (all ``K`` of each in one module) and what they predict.

One MC head per class, all ``K`` of them in one module (:class:`MCHeads`, weights
``[K, C, C]``): ``Dense(C→C) → sigmoid → thresholded ReLU (θ = 0.5)`` on ``g(x)`` (the
global-average-pooled target-layer output ``[B, C]``) gives a soft mask ``m ∈ {0} ∪ (0.5, 1]``
per filter. The mask multiplies the target feature map channel-wise and the frozen head turns
it into logits ``z'`` (:mod:`~cfdebug.cfe.losses`). The masks are binarised only at inference
(``MC_x = m > 0``, i.e. the pre-activation is positive; :func:`predict_masks`). The heads share
nothing, so one batched forward (an ``einsum`` over ``[K, C, C]``) and one optimiser over the
stacked weights give exactly what ``K`` separately trained heads would (tests compare with that
naive loop). :class:`MIHeads` (one per alter class) add ``m = ReLU(W g + b) ≥ 0`` instead.

How well fitted heads do: :func:`keep_rate` (the MC filters alone keep a correct decision) and
:func:`alter_rate` (the MI edit reaches the alter class, by default
:func:`second_most_probable`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CfdebugError
from .classifier_head import MaskedHead, as_masked_head, masked_predictions, rows_per_block, take_rows

__all__ = [
    "thresholded_relu",
    "MCHeads",
    "MIHeads",
    "as_features",
    "predict_masks",
    "second_most_probable",
    "keep_rate",
    "alter_rate",
]


def thresholded_relu(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """``x`` where ``x > threshold``, else 0 (Keras' ThresholdedReLU; paper A eq. 5's ``ReLU_t``),
    element-wise, any shape and dtype.

    Gradient: exactly what the formula implies, ``∂out/∂x = 1`` where ``x > threshold`` and 0
    where ``x ≤ threshold`` (at the threshold too): it is computed as ``x * 1[x > threshold]``,
    so autograd differentiates a product with a constant 0/1 mask (no straight-through estimate,
    no smoothing). The CFE heads train with that gradient (a filter switched off by one image can
    still be switched on through the images where it is on); in treatment a filter whose
    ``sigmoid(g)`` is at or below θ gets no gradient from the MC/non-MC terms.
    """
    return x * (x > threshold).to(x.dtype)


class _StackedDense(nn.Module):
    """``K`` independent ``Dense(C→C)`` layers stored as ``weight [K, C, C]``, ``bias [K, C]``.

    The layers read ``(g − shift) / scale`` (buffers ``[C]``, 0 and 1 unless set with
    :meth:`set_input_standardisation`). That is an affine reparametrisation of the same
    ``Dense(C→C)`` on ``g`` (``W' = W/scale``, ``b' = b − W·shift/scale``): it changes only how
    the initialisation and SGD see the input. Pooled ReLU features share a large positive mean,
    so on raw ``g`` the pre-activations are dominated by ``W·mean(g)`` and the masks come out
    almost the same for every image; standardised, they vary with the image.
    """

    def __init__(self, num_classes: int, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, channels, channels))  # [K, C_out, C_in]
        self.bias = nn.Parameter(torch.zeros(num_classes, channels))  # [K, C_out]
        self.register_buffer("shift", torch.zeros(channels))
        self.register_buffer("scale", torch.ones(channels))

    def set_input_standardisation(self, g: torch.Tensor) -> None:
        """Standardise the Dense input with the per-filter mean and std of ``g`` [N, C] (std floor 1e-6)."""
        with torch.no_grad():
            self.shift.copy_(g.mean(0))
            self.scale.copy_(g.std(0, unbiased=False).clamp_min(1e-6))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def channels(self) -> int:
        return self.weight.shape[1]

    def reset_parameters(self, seed: int) -> None:
        """Glorot-uniform weights (Keras' Dense default) and zero bias, from ``seed``."""
        gen = torch.Generator().manual_seed(int(seed))
        k, c, _ = self.weight.shape
        bound = math.sqrt(6.0 / (c + c))
        with torch.no_grad():
            w = (torch.rand(k, c, c, generator=gen) * 2.0 - 1.0) * bound
            self.weight.copy_(w.to(self.weight.device))
            self.bias.zero_()

    def pre_activation(self, g: torch.Tensor, classes: torch.Tensor | None = None, span: tuple[int, int] | None = None) -> torch.Tensor:
        """``g`` [B, C] → ``W_k g + b_k``: [B, K, C] for all heads (or [B, J, C] for the heads
        ``lo..hi-1`` of ``span=(lo, hi)``), or [B, C] for one head per image (``classes`` [B])."""
        g = (g - self.shift) / self.scale
        if classes is None:
            lo, hi = span if span is not None else (0, self.num_classes)
            return torch.einsum("kji,bi->bkj", self.weight[lo:hi], g) + self.bias[lo:hi]  # [B, J, C]
        classes = classes.to(g.device).long()
        out = torch.empty(g.shape[0], self.channels, dtype=g.dtype, device=g.device)
        # Grouping by class costs K small matmuls instead of gathering a [B, C, C] weight stack.
        for k in torch.unique(classes).tolist():
            rows = (classes == k).nonzero(as_tuple=True)[0]
            out[rows] = g[rows] @ self.weight[k].T + self.bias[k]
        return out

    def forward(self, g: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        return self.pre_activation(g, classes)


class MCHeads(_StackedDense):
    """All ``K`` MC heads: ``g(x)`` [B, C] float32 → soft masks ``m`` [B, K, C] in {0} ∪ (θ, 1]."""

    def __init__(self, num_classes: int, channels: int, threshold: float = 0.5):
        super().__init__(num_classes, channels)
        self.threshold = float(threshold)

    def soft_masks(self, g: torch.Tensor, classes: torch.Tensor | None = None, span: tuple[int, int] | None = None) -> torch.Tensor:
        """Soft masks: [B, K, C] for every head ([B, J, C] for ``span``), or [B, C] for one head
        per image (``classes`` [B])."""
        return thresholded_relu(torch.sigmoid(self.pre_activation(g, classes, span)), self.threshold)

    def binary_masks(self, g: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """``MC_x = m > 0`` as bool, same shapes as :meth:`soft_masks`."""
        # sigmoid(a) > θ  ⇔  a > logit(θ); exact for θ = 0.5 (a > 0) and avoids sigmoid rounding.
        return self.pre_activation(g, classes) > math.log(self.threshold / (1.0 - self.threshold))

    def forward(self, g: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        return self.soft_masks(g, classes)


class MIHeads(_StackedDense):
    """All ``K`` MI heads (one per alter class): ``g`` [B, C] → additive ``m = ReLU(W g + b) ≥ 0``."""

    def soft_masks(self, g: torch.Tensor, classes: torch.Tensor | None = None, span: tuple[int, int] | None = None) -> torch.Tensor:
        return F.relu(self.pre_activation(g, classes, span))

    def binary_masks(self, g: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        return self.pre_activation(g, classes) > 0

    def forward(self, g: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        return self.soft_masks(g, classes)


def as_features(features: Any, device) -> torch.Tensor:
    """``features`` (numpy or tensor) as validated float32 ``g`` [N, C] on ``device`` (N, C ≥ 1)."""
    g = torch.as_tensor(np.asarray(features, dtype=np.float32) if not isinstance(features, torch.Tensor) else features)
    if g.ndim != 2 or g.shape[0] == 0 or g.shape[1] == 0:
        raise CfdebugError(f"Expected `features` to have shape [N, C] with N, C >= 1, but got shape {tuple(g.shape)}")
    return g.to(device=device, dtype=torch.float32)


@torch.no_grad()
def predict_masks(heads: MCHeads | MIHeads, features: Any, classes: Any = None, batch_size: int = 4096) -> np.ndarray:
    """Binary filter sets ``MC_x`` (or MI sets) for ``features`` ``[N, C]``.

    Args:
        classes: ``None`` for every head → ``[N, K, C]``; ``[N]`` ints (e.g. the predicted class)
            → ``[N, C]``; ``[N, k]`` ints (e.g. the top-5 classes) → ``[N, k, C]``.

    Returns:
        numpy bool array of the shape above.
    """
    device = heads.weight.device
    g_all = as_features(features, "cpu")
    n, c = g_all.shape
    if c != heads.channels:
        raise CfdebugError(f"Expected `features` to have {heads.channels} channels, but got {c}")
    if classes is None:
        out = np.zeros((n, heads.num_classes, c), dtype=bool)
        step = max(1, (1 << 24) // max(1, heads.num_classes * c))  # bound the [b, K, C] block
        for s in range(0, n, step):
            out[s : s + step] = heads.binary_masks(g_all[s : s + step].to(device)).cpu().numpy()
        return out
    cls = np.asarray(classes)
    if cls.shape[:1] != (n,) or cls.ndim not in (1, 2) or not np.issubdtype(cls.dtype, np.integer):
        raise CfdebugError(f"Expected `classes` to be integers of shape [N] or [N, k] with N={n}, but got shape {cls.shape} and dtype {cls.dtype}")
    if cls.size and (cls.min() < 0 or cls.max() >= heads.num_classes):
        raise CfdebugError(f"Expected `classes` in 0..{heads.num_classes - 1}, but got values in [{cls.min()}, {cls.max()}]")
    k = 1 if cls.ndim == 1 else cls.shape[1]
    flat_cls = torch.as_tensor(cls.reshape(-1), dtype=torch.long)  # [N·k]
    flat_g = g_all.repeat_interleave(k, dim=0)  # [N·k, C], row i·k + j = image i, class j
    out = np.zeros((n * k, c), dtype=bool)
    for s in range(0, n * k, batch_size):
        out[s : s + batch_size] = heads.binary_masks(flat_g[s : s + batch_size].to(device), flat_cls[s : s + batch_size]).cpu().numpy()
    return out.reshape(cls.shape + (c,))


def second_most_probable(logits: Any) -> np.ndarray:
    """The default MI alter class: index of the second largest logit per row (``[N, K]`` → ``[N]``)."""
    z = np.asarray(logits)
    return np.argsort(-z, axis=1, kind="stable")[:, 1]


@torch.no_grad()
def alter_rate(heads: MIHeads, head: MaskedHead | nn.Module, features: Any, alter: Any, head_inputs: Any = None) -> float:
    """Fraction of images that the frozen head assigns to their alter class once the MI head of
    that class has been added: ``argmax head(g + m) == alter`` (``features`` [N, C], ``alter``
    [N]; ``head_inputs`` the feature maps for a map head)."""
    head = as_masked_head(head)
    device = heads.weight.device
    g = as_features(features, device)
    inputs = g if head_inputs is None else head_inputs
    a = torch.as_tensor(np.asarray(alter), dtype=torch.long, device=device)
    step = rows_per_block(inputs)
    hits = 0
    for s in range(0, g.shape[0], step):
        rows = np.arange(s, min(s + step, g.shape[0]))
        m = heads.soft_masks(g[s : s + step], a[s : s + step])
        hits += int((head(take_rows(inputs, rows, head.device), m.to(head.device), additive=True).argmax(1).to(device) == a[s : s + step]).sum())
    return hits / g.shape[0]


def keep_rate(heads: MCHeads, head: MaskedHead | nn.Module, features: Any, labels: Any, preds: Any, num_classes: int, head_inputs: Any = None) -> dict[str, np.ndarray | float]:
    """How often the MC filters alone keep a correct decision, per class.

    Over the correctly classified images of class ``c`` (``labels == preds == c``), the head of
    ``c`` gives ``MC_x`` and the frozen head is run on ``g(x) ⊙ MC_x`` (binary mask: the MC
    filters at their full activation, every other filter zeroed; for a map head, the feature
    maps ``head_inputs`` with the other channels zeroed).

    Returns:
        ``keep_rate`` [K] float64 in [0, 1] (NaN for a class with no correct image),
        ``mean_mc_filters`` [K] float64 (mean ``|MC_x|`` over those images), ``n_correct`` [K]
        int64, and ``overall`` / ``overall_mean_mc_filters`` floats pooled over all those images.
    """
    labels = np.asarray(labels)
    preds = np.asarray(preds)
    correct = np.nonzero(labels == preds)[0]
    keep = np.full(num_classes, np.nan)
    mean_mc = np.full(num_classes, np.nan)
    n_correct = np.bincount(labels[correct], minlength=num_classes).astype(np.int64)
    if correct.size == 0:
        return {"keep_rate": keep, "mean_mc_filters": mean_mc, "n_correct": n_correct, "overall": float("nan"), "overall_mean_mc_filters": float("nan")}
    features = np.asarray(features, dtype=np.float32)
    y = labels[correct]
    masks = predict_masks(heads, features[correct], y)  # [n, C]
    kept = masked_predictions(head, features if head_inputs is None else head_inputs, masks, rows=correct) == y
    sizes = masks.sum(1)
    for c in range(num_classes):
        sel = y == c
        if sel.any():
            keep[c] = float(kept[sel].mean())
            mean_mc[c] = float(sizes[sel].mean())
    return {"keep_rate": keep, "mean_mc_filters": mean_mc, "n_correct": n_correct, "overall": float(kept.mean()), "overall_mean_mc_filters": float(sizes.mean())}
