"""Counterfactual explanation (CFE) heads: minimum-correct (MC) and minimum-incorrect (MI) filters.

Paper A (after Tariq et al. 2022) explains a decision by the *filters* of the target layer: the
MC filters of image ``x`` for class ``c`` are a small set of channels that, kept alone, still
make the frozen classifier say ``c``; the MI filters are the channels whose activation must grow
to make it say an *alter* class instead.

One MC head per class, all ``K`` of them in one module (:class:`MCHeads`, weights
``[K, C, C]``): ``Dense(C→C) → sigmoid → thresholded ReLU (θ = 0.5)`` on ``g(x)`` (the
global-average-pooled target-layer output ``[B, C]``) gives a soft mask ``m ∈ {0} ∪ (0.5, 1]``
per filter. The mask multiplies the target feature map channel-wise and the frozen head turns
it into logits ``z'``. Head ``c`` is trained on *all* training images with target ``c``:

    L_c = CE(c, softmax(z')) + λ_sparse·0.001·Σ|m| − 0.001·Σ z'_c      (λ_sparse = 2)

summed over the batch and the filters. The masks are binarised only at inference
(``MC_x = m > 0``, i.e. the pre-activation is positive). The heads share nothing, so one
batched forward (an ``einsum`` over ``[K, C, C]``) and one optimiser over the stacked weights
give exactly what ``K`` separately trained heads would (tests compare with that naive loop).

Why the heads can run on cached ``g(x)``: for an architecture whose head after the target layer
is ``GAP → (MLP/linear)``, masking channel ``j`` of the map by ``m_j`` scales its pooled value
by the same ``m_j`` (``mean_hw(m_j·A_j) = m_j·mean_hw(A_j)``), so ``head(GAP(m ⊙ A)) =
head(m ⊙ g(x))``. That is the case for the demo CNN, ResNet/ResNeXt/Wide-ResNet, DenseNet,
EfficientNet, MobileNet and RegNet (``TargetLayer.pooled_head`` is set). Torchvision's VGG pools
to 7×7 and runs three FC layers on that, so there the identity does not hold: its
:class:`MaskedHead` has ``kind == "map"``, the heads still read ``g(x)`` but the loss runs the
frozen ``map_head`` on ``m ⊙ A`` with ``A`` the cached feature maps ``[N, C, h, w]``
(:meth:`~cfdebug.extract.ExtractionCache.maps`, memory-mapped, read one batch at a time), and
the heads are trained a block of classes at a time so the masked block ``[B, J, C, h, w]``
stays within :data:`MAP_BLOCK_ELEMENTS` (the loss is a sum over heads, so the accumulated
gradient is the same as one pass over all ``K``). VGG's map head is itself linear in a mask
``m ≥ 0`` up to its first FC layer (max pool, average pool, flatten, linear), so
:class:`ChannelLinearHead` folds the pooling into that layer's weights and applies the masks to
the pooled channel values: at 32 px the 25,088-wide first layer becomes a 512-wide one, the
same logits to float rounding, ~6× less work per step (the FC layers after it still run per
image and head). At 224 px the pooled map has ``q = 49`` positions per channel, so the rewrite
alone saves nothing; there the ``J`` masks of an image share the per-channel products
``P_b[c] = W_eff[:, c] · pre(A_b)[c]`` (``[C, O]`` per image, formed once), and each mask costs
only ``Σ_c m_c·P_b[c]`` (``C·O`` instead of ``C·q·O`` multiply-adds).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import CFEConfig
from .errors import CfdebugError
from .runtime import Progress, scaled_progress


# Upper bound (elements) of one masked block [rows, C(, h, w)] fed to the frozen head, so the
# feature-map path trains and predicts in bounded memory (64 MiB of float32 per block).
MAP_BLOCK_ELEMENTS = 1 << 24

# Upper bound (elements) of the per-channel products ``P [rows, C, O]`` that
# :class:`ChannelLinearHead`'s shared route holds at once (512 MiB of float32; VGG at 224 px:
# 8 MiB per image, so 64 images).
PRODUCT_BLOCK_ELEMENTS = 1 << 27


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# The frozen head on masked features
# --------------------------------------------------------------------------------------------


# Modules that commute with a non-negative per-channel scale: f(m ⊙ A) = m ⊙ f(A) for m ≥ 0
# (max and ReLU are monotone, and so is float rounding of a product, so this holds bit for bit).
_SCALE_COMMUTING = (nn.MaxPool2d, nn.ReLU, nn.Identity, nn.Dropout)
_LINEAR_POOLS = (nn.AdaptiveAvgPool2d, nn.AvgPool2d)


def _leaves(module: nn.Module) -> list[nn.Module]:
    """The modules of nested ``nn.Sequential`` containers in forward order."""
    if type(module) is nn.Sequential:
        return [leaf for child in module for leaf in _leaves(child)]
    return [module]


class ChannelLinearHead:
    """A feature-map head ``pre → (avg pool) → Flatten → Linear → rest`` rewritten for channel masks.

    ``pre`` commutes with a non-negative per-channel scale (max pool, ReLU), the pooling is
    linear and the same for every channel, so for masks ``m ≥ 0`` the first linear layer's output
    is ``W₁·flatten(pool(pre(m ⊙ A))) = W_eff·flatten(m ⊙ pre(A))`` with ``W_eff [O, C, q]``
    = ``W₁`` folded with the pooling (``q`` = positions of ``pre(A)``). Torchvision's VGG at
    32 px has ``pre(A)`` of 1×1, so the 25,088-wide first layer becomes a 512-wide one, and the
    max pool runs once per image instead of once per image and head. ``rest`` (the FC layers
    after the first) still runs per mask. The result equals the module on ``m ⊙ A`` up to float
    summation order (tests: within 1e-5).
    """

    def __init__(self, pre: list[nn.Module], pool: nn.Module | None, linear: nn.Linear, rest: list[nn.Module]):
        self.pre = nn.Sequential(*pre)
        self.pool, self.linear, self.rest = pool, linear, nn.Sequential(*rest)
        self._weights: dict[tuple, torch.Tensor | None] = {}

    @classmethod
    def split(cls, module: nn.Module) -> "ChannelLinearHead | None":
        """The rewrite of ``module`` when it has that form (torchvision VGG's map head), else ``None``."""
        leaves = _leaves(module)
        i = 0
        while i < len(leaves) and isinstance(leaves[i], _SCALE_COMMUTING):
            i += 1
        pre, pool = leaves[:i], None
        if i < len(leaves) and isinstance(leaves[i], _LINEAR_POOLS):
            pool, i = leaves[i], i + 1
        if i >= len(leaves) or not isinstance(leaves[i], nn.Flatten) or (leaves[i].start_dim, leaves[i].end_dim) != (1, -1):
            return None
        if i + 1 >= len(leaves) or not isinstance(leaves[i + 1], nn.Linear):
            return None
        return cls(pre, pool, leaves[i + 1], leaves[i + 2 :])

    def _weight(self, channels: int, size: tuple[int, int], device) -> torch.Tensor | None:
        """``W_eff`` as ``[O, C·q]`` for ``pre(A)`` of spatial ``size`` (cached), or ``None`` when
        the first layer does not read ``C`` channels of that pooled size."""
        key = (channels, tuple(size), str(device))
        if key not in self._weights:
            q = size[0] * size[1]
            with torch.no_grad():
                basis = torch.eye(q, device=device, dtype=self.linear.weight.dtype).view(q, 1, *size)
                pooled = (basis if self.pool is None else self.pool(basis)).reshape(q, -1)  # [q, S]: the pool as a matrix
                s = pooled.shape[1]
                w = None
                if self.linear.in_features == channels * s:
                    w1 = self.linear.weight.view(-1, channels, s)  # [O, C, S]
                    identity = q == s and torch.equal(pooled, torch.eye(q, device=device, dtype=pooled.dtype))
                    w = self.linear.weight if identity else torch.einsum("ocs,qs->ocq", w1, pooled).reshape(w1.shape[0], -1).contiguous()
            self._weights[key] = w
        return self._weights[key]

    @staticmethod
    def shares_products(q: int, masks: int) -> bool:
        """Whether ``masks`` masks per image cost less through the per-channel products ``P``
        (``O·C·q + J·O·C`` multiply-adds per image) than through ``W_eff`` per mask (``J·O·C·q``):
        never at ``q = 1`` or for one mask per image."""
        return q + masks < q * masks

    def layout(self, map_shape: tuple[int, ...]) -> tuple[int, int] | None:
        """``(q, O)`` for feature maps of shape ``[·, C, h, w]`` (``q`` positions of ``pre(A)``,
        ``O`` outputs of the first linear layer), or ``None`` when the rewrite does not fit them."""
        with torch.no_grad():
            r = self.pre(torch.zeros(1, *map_shape[1:], dtype=self.linear.weight.dtype, device=self.linear.weight.device))
        if self._weight(r.shape[1], tuple(r.shape[-2:]), r.device) is None:
            return None
        return r.shape[-2] * r.shape[-1], self.linear.out_features

    def _products_weight(self, channels: int, size: tuple[int, int], device) -> torch.Tensor:
        """``W_eff`` laid out as ``[C, q, O]`` (cached): one batched matmul over the channels then
        forms ``P``; with ``W_eff``'s own layout each call would copy it (0.4 GB for VGG16)."""
        key = ("products", channels, tuple(size), str(device))
        if key not in self._weights:
            w = self._weight(channels, size, device)
            with torch.no_grad():
                self._weights[key] = w.view(w.shape[0], channels, -1).permute(1, 2, 0).contiguous()
        return self._weights[key]

    def _shared_first_layer(self, r: torch.Tensor, m: torch.Tensor, wp: torch.Tensor) -> torch.Tensor:
        """The first layer's pre-activations ``[B, J, O]`` for ``J`` masks per image through
        ``P_b[c] = W_eff[:, c·q:(c+1)·q] · r_b[c]`` (``r`` [B, C, q], ``m`` [B, J, C]):
        ``h_bj = Σ_c m_bjc·P_b[c] + b₁`` (``wp`` [C, q, O]: :meth:`_products_weight`). ``P`` is
        formed once per image for all its masks, in blocks of rows within
        :data:`PRODUCT_BLOCK_ELEMENTS`; autograd keeps each block for the gradient w.r.t. ``m``,
        so a fit sends that many rows at a time (:func:`_fit_blocks`)."""
        b, c, _ = r.shape
        rows = max(1, PRODUCT_BLOCK_ELEMENTS // (c * wp.shape[2]))
        out = []
        for s in range(0, b, rows):
            p = torch.bmm(r[s : s + rows].transpose(0, 1), wp)  # [C, b', O]
            out.append(torch.matmul(m[s : s + rows], p.transpose(0, 1)))  # [b', J, C] @ [b', C, O]
        return torch.cat(out) + self.linear.bias

    def logits(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor | None:
        """Logits for ``m ⊙ x`` (``x`` [B, C, h, w]; ``m`` [B, C] or [B, J, C], ``m ≥ 0`` when
        ``pre`` is not empty) as the module gives them, or ``None`` when the shapes do not fit.
        ``J`` masks per image share the per-channel products when that costs less
        (:meth:`shares_products`: VGG at 224 px, ``q = 49``)."""
        r = self.pre(x)  # [B, C, h', w'], once per image for all J masks
        w = self._weight(r.shape[1], tuple(r.shape[-2:]), r.device)
        if w is None:
            return None
        if m.ndim == 3 and self.shares_products(r.shape[-2] * r.shape[-1], m.shape[1]):
            wp = self._products_weight(r.shape[1], tuple(r.shape[-2:]), r.device)  # [C, q, O]
            return self.rest(self._shared_first_layer(r.flatten(2), m, wp)).flatten(0, 1)
        r = r.flatten(2)  # [B, C, q]
        v = (m[..., None] * (r[:, None] if m.ndim == 3 else r)).flatten(-2)  # [B(, J), C·q]
        z = self.rest(F.linear(v, w, self.linear.bias))
        return z.flatten(0, 1) if m.ndim == 3 else z


@dataclass(frozen=True)
class MaskedHead:
    """The frozen classifier after the target layer, run on masked target-layer outputs.

    ``kind == "pooled"``: ``module`` maps ``g`` [B, C] → logits [B, K], and its inputs are the
    pooled features ``g(x)`` themselves. ``kind == "map"``: ``module`` maps the target feature
    map [B, C, h, w] → logits (torchvision VGG: the rest of ``features``, the 7×7 avgpool and
    the classifier), and its inputs are the cached feature maps. Either way the masks are per
    filter, ``[B, C]`` or ``[B, J, C]``, broadcast over the map's positions.
    """

    module: nn.Module
    kind: str = "pooled"
    #: The map head rewritten for channel masks (:class:`ChannelLinearHead`), when it has that form.
    channel_linear: ChannelLinearHead | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.kind not in ("pooled", "map"):
            raise CfdebugError(f"Expected `kind` to be 'pooled' or 'map', but got {self.kind!r}")
        if self.kind == "map":
            object.__setattr__(self, "channel_linear", ChannelLinearHead.split(self.module))

    @property
    def device(self) -> torch.device:
        param = next(self.module.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def __call__(self, x: torch.Tensor, m: torch.Tensor, additive: bool = False) -> torch.Tensor:
        """Logits for ``x ⊙ m`` (``x + m`` when ``additive``, the MI heads' edit).

        Args:
            x: ``[B, C]`` (pooled) or ``[B, C, h, w]`` (map) head inputs.
            m: ``[B, C]`` → logits ``[B, K]``; or ``[B, J, C]`` (``J`` masks per image) →
                logits ``[B·J, K]``, row ``b·J + j`` = mask ``j`` on image ``b``.
        """
        fast = self.channel_linear
        # The rewrite needs an eval-mode head (dropout) and, through a max pool, masks m ≥ 0.
        if fast is not None and not additive and not self.module.training and (not len(fast.pre) or bool((m >= 0).all())):
            z = fast.logits(x, m)
            if z is not None:
                return z
        stacked = m.ndim == 3
        if stacked:
            x = x.unsqueeze(1)
        if self.kind == "map":
            m = m[..., None, None]
        out = x + m if additive else x * m
        return self.module(out.flatten(0, 1) if stacked else out)

    def train(self, mode: bool = True) -> "MaskedHead":
        self.module.train(mode)
        return self

    def eval(self) -> "MaskedHead":
        return self.train(False)


def as_masked_head(head: "MaskedHead | nn.Module | None") -> MaskedHead:
    """``head`` itself, or a plain module (a pooled head ``[B, C] → [B, K]``) wrapped as one."""
    if head is None:
        raise CfdebugError(
            "Expected the classifier head after the target layer, but the target layer has none: cfdebug "
            "knows what follows the last conv block of the demo CNN, VGG, ResNet, DenseNet, EfficientNet, "
            "MobileNet and RegNet, not what follows a layer named with `--layer` elsewhere in the network. "
            "Drop `--layer` to use the last conv block."
        )
    return head if isinstance(head, MaskedHead) else MaskedHead(head, "pooled")


def masked_head(target, device: torch.device | str) -> MaskedHead:
    """A frozen copy of the workspace target's head: the pooled head when the architecture has
    one (``GAP → classifier``), else the feature-map head (VGG)."""
    if target.pooled_head is not None:
        return MaskedHead(frozen_head(target.pooled_head, device), "pooled")
    if target.map_head is not None:
        return MaskedHead(frozen_head(target.map_head, device), "map")
    return as_masked_head(None)


def split_head_inputs(workspace, split: str, head: MaskedHead, progress: Progress | None = None) -> np.ndarray | None:
    """What ``head`` reads for ``split`` besides ``g(x)``: ``None`` for a pooled head (the cached
    pooled features are its inputs), the cached feature maps ``[N, C, h, w]`` for a map head."""
    return None if head.kind == "pooled" else workspace.extractions.maps(split, progress)


def _take(inputs: Any, rows: Any, device) -> torch.Tensor:
    """Rows ``rows`` of ``inputs`` (tensor, array or memmap) as float32 on ``device``."""
    if isinstance(inputs, torch.Tensor):
        return inputs[torch.as_tensor(rows, device=inputs.device)].to(device=device, dtype=torch.float32)
    return torch.from_numpy(np.ascontiguousarray(inputs[np.asarray(rows)], dtype=np.float32)).to(device)


def _row_elements(inputs: Any) -> int:
    return int(np.prod(inputs.shape[1:], dtype=np.int64))


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def mc_loss(
    heads: MCHeads,
    head: MaskedHead | nn.Module,
    g: torch.Tensor,
    config: CFEConfig,
    inputs: torch.Tensor | None = None,
    span: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """The MC loss of every head (or of the heads in ``span=(lo, hi)``) on one batch, summed
    over batch, heads and filters.

    Args:
        g: ``[B, C]`` float32 pooled features, the heads' input. Head ``k``'s target is class
            ``k`` for every image.
        inputs: what the frozen ``head`` reads, masked: ``g`` itself when ``None`` (pooled
            head), else the feature maps ``[B, C, h, w]`` of the same images (map head).

    Returns:
        ``{"loss", "ce", "sparsity", "logits"}`` scalar tensors: ``ce = Σ CE(k, softmax(z'))``,
        ``sparsity = λ_sparse·scale·Σ|m|``, ``logits = −logits_weight·Σ z'_k`` (≤ 0 when the
        target logits are positive) and ``loss = ce + sparsity + logits``.
    """
    head = as_masked_head(head)
    lo, hi = span if span is not None else (0, heads.num_classes)
    m = heads.soft_masks(g, span=(lo, hi))  # [B, J, C]
    z = head(g if inputs is None else inputs, m)  # [B·J, K], row b·J + j = head lo+j on image b
    target = torch.arange(lo, hi, device=g.device).repeat(g.shape[0])  # [B·J]
    ce = F.cross_entropy(z, target, reduction="sum")
    sparsity = config.sparsity_lambda * config.sparsity_scale * m.abs().sum()
    logits = -config.logits_weight * z.gather(1, target[:, None]).sum()
    return {"loss": ce + sparsity + logits, "ce": ce, "sparsity": sparsity, "logits": logits}


def mi_loss(
    heads: MIHeads,
    head: MaskedHead | nn.Module,
    g: torch.Tensor,
    preds: torch.Tensor,
    config: CFEConfig,
    inputs: torch.Tensor | None = None,
    span: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """The MI loss of every head (or those in ``span``) on one batch: head ``t`` pushes ``g + m``
    (the map plus ``m`` at every position, for a map head) to class ``t``.

    Images already predicted ``t`` (``preds`` [B]) are left out of head ``t``'s terms: there is
    nothing to alter. Returns ``{"loss", "ce", "sparsity"}`` summed over batch, heads, filters.
    """
    head = as_masked_head(head)
    lo, hi = span if span is not None else (0, heads.num_classes)
    m = heads.soft_masks(g, span=(lo, hi))  # [B, J, C]
    z = head(g if inputs is None else inputs, m, additive=True)  # [B·J, K]
    classes = torch.arange(lo, hi, device=g.device)
    target = classes.repeat(g.shape[0])  # [B·J]
    keep = (preds.to(g.device).long()[:, None] != classes).to(g.dtype)  # [B, J]
    ce = (F.cross_entropy(z, target, reduction="none") * keep.reshape(-1)).sum()
    sparsity = config.mi_sparsity * (m.abs().sum(dim=2) * keep).sum()
    return {"loss": ce + sparsity, "ce": ce, "sparsity": sparsity}


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------


def frozen_head(pooled_head: nn.Module, device: torch.device | str) -> nn.Module:
    """A frozen eval-mode copy of ``pooled_head`` on ``device`` (the user's model is untouched)."""
    head = copy.deepcopy(pooled_head).to(device).eval()
    for p in head.parameters():
        p.requires_grad_(False)
    return head


def batch_order(n: int, batch_size: int, epochs: int, seed: int) -> list[np.ndarray]:
    """The index batches of a seeded shuffle per epoch (shared with the naive reference in tests)."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(epochs):
        perm = rng.permutation(n)
        batches.extend(perm[i : i + batch_size] for i in range(0, n, batch_size))
    return batches


def _check_head_classes(head: MaskedHead, g: torch.Tensor, inputs: Any, num_classes: int) -> None:
    x = g[:1] if inputs is None else _take(inputs, [0], g.device)
    with torch.no_grad():
        out = head(x, torch.ones_like(g[:1]))
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise CfdebugError(
            f"Expected the classifier head to output [B, {num_classes}] logits for inputs of shape "
            f"{tuple(x.shape)}, but got shape {tuple(out.shape)}. Check that `num_classes` matches the model."
        )


def _as_features(features: Any, device) -> torch.Tensor:
    g = torch.as_tensor(np.asarray(features, dtype=np.float32) if not isinstance(features, torch.Tensor) else features)
    if g.ndim != 2 or g.shape[0] == 0 or g.shape[1] == 0:
        raise CfdebugError(f"Expected `features` to have shape [N, C] with N, C >= 1, but got shape {tuple(g.shape)}")
    return g.to(device=device, dtype=torch.float32)


def _check_inputs(head: MaskedHead, inputs: Any, n: int, c: int) -> None:
    """A map head needs ``[N, C, h, w]`` maps for the ``N`` images of ``features``; a pooled head none."""
    if head.kind == "pooled":
        if inputs is not None and tuple(inputs.shape) != (n, c):
            raise CfdebugError(f"Expected the pooled head's inputs to have shape [{n}, {c}], but got {tuple(inputs.shape)}")
        return
    if inputs is None:
        raise CfdebugError(
            "Expected the target feature maps [N, C, h, w] (`head_inputs`) for a head that runs on feature "
            "maps (e.g. torchvision VGG), but got none. `ExtractionCache.maps(split)` caches them."
        )
    if len(inputs.shape) != 4 or tuple(inputs.shape[:2]) != (n, c):
        raise CfdebugError(f"Expected the feature maps to have shape [{n}, {c}, h, w], but got {tuple(inputs.shape)}")


def class_spans(num_classes: int, rows: int, row_elements: int, budget: int | None = None) -> list[tuple[int, int]]:
    """Blocks ``(lo, hi)`` of heads such that a masked block ``[rows, hi-lo, row_elements]``
    stays within ``budget`` elements (default :data:`MAP_BLOCK_ELEMENTS`; at least one head
    per block)."""
    per = max(1, (budget or MAP_BLOCK_ELEMENTS) // max(1, rows * row_elements))
    return [(lo, min(num_classes, lo + per)) for lo in range(0, num_classes, per)]


def _fit_blocks(head: MaskedHead, num_classes: int, rows: int, g: torch.Tensor, inputs: Any, additive: bool) -> tuple[int, list[tuple[int, int]]]:
    """How a training batch of ``rows`` images is cut for the loss: ``(row_step, spans)``, rows
    ``row_step`` at a time, each with the head blocks ``spans`` of :func:`class_spans`.

    By default all rows in one go and the masked block ``[rows, J, C(·h·w)]`` bounds the spans.
    When :class:`ChannelLinearHead` shares the per-channel products (VGG at 224 px, ``q > 1``),
    the rows are cut so their products ``[rows, C, O]`` stay within
    :data:`PRODUCT_BLOCK_ELEMENTS` and the spans are bounded by ``[rows, J, O]``: usually one
    span, so ``P`` is formed once per image and batch. The loss is a sum over rows and heads,
    so the accumulated gradient is the same either way (to float rounding).
    """
    fast = head.channel_linear
    layout = None if fast is None or additive or inputs is None else fast.layout(tuple(inputs.shape))
    if layout is not None:
        (q, out), c = layout, g.shape[1]
        row_step = min(rows, max(1, PRODUCT_BLOCK_ELEMENTS // (c * out)))
        spans = class_spans(num_classes, row_step, out)
        if fast.shares_products(q, spans[0][1] - spans[0][0]):
            return row_step, spans
    return rows, class_spans(num_classes, rows, _row_elements(g if inputs is None else inputs))


def _fit_loop(heads, loss_fn, g: torch.Tensor, inputs: Any, config: CFEConfig, progress: Progress | None, label: str, blocks: tuple[int, list[tuple[int, int]]]) -> list[dict]:
    """SGD over seeded batches; ``loss_fn(idx, g_batch, inputs_batch, span)`` is summed over the
    row and head blocks of ``blocks`` (:func:`_fit_blocks`; one block for pooled heads of
    ordinary size)."""
    opt = torch.optim.SGD(heads.parameters(), lr=config.lr, momentum=config.momentum)
    n = g.shape[0]
    batches = batch_order(n, config.batch_size, config.epochs, config.seed)
    per_epoch = math.ceil(n / config.batch_size)
    row_step, spans = blocks
    history: list[dict] = []
    sums: dict[str, float] = {}
    for step, idx in enumerate(batches):
        idx_t = torch.as_tensor(idx, device=g.device)
        g_b = g[idx_t]
        x_b = None if inputs is None else _take(inputs, idx, g.device)
        opt.zero_grad(set_to_none=True)
        for lo in range(0, len(idx), row_step):
            rows = slice(lo, lo + row_step)
            for span in spans:
                terms = loss_fn(idx_t[rows], g_b[rows], None if x_b is None else x_b[rows], span)
                terms["loss"].backward()
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + float(value.detach())
        opt.step()
        if (step + 1) % per_epoch == 0:
            epoch = (step + 1) // per_epoch
            history.append({"epoch": epoch, **{k: v / n for k, v in sums.items()}})
            sums = {}
            if progress:
                progress(epoch / config.epochs, f"{label} epoch {epoch}/{config.epochs}, loss {history[-1]['loss']:.4f}/image")
    return history


def _fit_inputs(features: Any, head: MaskedHead | nn.Module | None, inputs: Any, num_classes: int, device) -> tuple[torch.Tensor, MaskedHead]:
    """Validated training features ``g`` [N, C] on ``device`` and a frozen copy of the head."""
    head = as_masked_head(head)
    g = _as_features(features, device)
    _check_inputs(head, inputs, g.shape[0], g.shape[1])
    frozen = head if _frozen_on(head, device) else MaskedHead(frozen_head(head.module, device), head.kind)
    _check_head_classes(frozen, g, inputs, num_classes)
    return g, frozen


def _frozen_on(head: MaskedHead, device) -> bool:
    """Whether ``head`` already is a frozen eval-mode copy on ``device`` (e.g. from
    :func:`masked_head`), so fitting need not copy it again (a VGG head is ~0.5 GB)."""
    params = list(head.module.parameters())
    return bool(params) and not head.module.training and not any(p.requires_grad for p in params) and head.device == torch.device(device)


def _init_heads(heads, g: torch.Tensor, config: CFEConfig, seed: int):
    """Seeded initial weights, input standardisation from ``g`` when configured; train mode."""
    heads.reset_parameters(seed)
    if config.standardise_inputs:
        heads.set_input_standardisation(g)
    return heads.train()


def fit_mc_heads(
    features: Any,
    head: MaskedHead | nn.Module | None,
    num_classes: int,
    config: CFEConfig | None = None,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    head_inputs: Any = None,
) -> tuple[MCHeads, list[dict]]:
    """Train all ``K`` MC heads at once on training features.

    Args:
        features: ``[N, C]`` float32 ``g(x)`` of all training images (numpy or tensor).
        head: the frozen classifier head (never modified): a module ``[B, C] → [B, K]`` or a
            :class:`MaskedHead` (``kind="map"`` for VGG-style heads).
        num_classes: ``K``.
        head_inputs: for a map head, the feature maps ``[N, C, h, w]`` of the same images
            (a memmap is read one batch at a time); ``None`` for a pooled head.

    Returns:
        ``(heads, history)``: an eval-mode :class:`MCHeads` on ``device`` and one dict per epoch
        with the per-image mean of each loss term (``loss``, ``ce``, ``sparsity``, ``logits``).
    """
    config = config or CFEConfig()
    g, frozen = _fit_inputs(features, head, head_inputs, num_classes, device)
    heads = _init_heads(MCHeads(num_classes, g.shape[1], config.mask_threshold).to(device), g, config, config.seed)
    blocks = _fit_blocks(frozen, num_classes, min(g.shape[0], config.batch_size), g, head_inputs, additive=False)
    history = _fit_loop(heads, lambda idx, gb, xb, span: mc_loss(heads, frozen, gb, config, xb, span), g, head_inputs, config, progress, "MC heads", blocks)
    return heads.eval(), history


def fit_mi_heads(
    features: Any,
    head: MaskedHead | nn.Module | None,
    num_classes: int,
    config: CFEConfig | None = None,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    head_inputs: Any = None,
) -> tuple[MIHeads, list[dict]]:
    """Train all ``K`` MI heads at once: head ``t`` alters every training image not predicted ``t``
    to class ``t`` (``features`` ``[N, C]`` float32; ``head`` and ``head_inputs`` as in
    :func:`fit_mc_heads`). Returns ``(heads, history)``."""
    config = config or CFEConfig()
    g, frozen = _fit_inputs(features, head, head_inputs, num_classes, device)
    preds = torch.as_tensor(masked_predictions(frozen, g if head_inputs is None else head_inputs, np.ones(tuple(g.shape), dtype=np.float32)), device=device)
    heads = _init_heads(MIHeads(num_classes, g.shape[1]).to(device), g, config, config.seed + 1)
    blocks = _fit_blocks(frozen, num_classes, min(g.shape[0], config.batch_size), g, head_inputs, additive=True)
    history = _fit_loop(heads, lambda idx, gb, xb, span: mi_loss(heads, frozen, gb, preds[idx], config, xb, span), g, head_inputs, config, progress, "MI heads", blocks)
    return heads.eval(), history


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------


def _heads_device(heads: nn.Module) -> torch.device:
    return heads.weight.device


@torch.no_grad()
def predict_masks(heads: MCHeads | MIHeads, features: Any, classes: Any = None, batch_size: int = 4096) -> np.ndarray:
    """Binary filter sets ``MC_x`` (or MI sets) for ``features`` ``[N, C]``.

    Args:
        classes: ``None`` for every head → ``[N, K, C]``; ``[N]`` ints (e.g. the predicted class)
            → ``[N, C]``; ``[N, k]`` ints (e.g. the top-5 classes) → ``[N, k, C]``.

    Returns:
        numpy bool array of the shape above.
    """
    device = _heads_device(heads)
    g_all = _as_features(features, "cpu")
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
def masked_predictions(head: MaskedHead | nn.Module, inputs: Any, masks: Any, rows: Any = None, batch_size: int | None = None) -> np.ndarray:
    """Classes the frozen head predicts for its inputs masked filter-wise.

    Args:
        head: a :class:`MaskedHead` or a pooled head module ``[B, C] → [B, K]``.
        inputs: ``[N, C]`` pooled features or ``[N, C, h, w]`` feature maps (a memmap is read
            one batch at a time).
        masks: ``[n, C]`` masks (bool or float), one per selected row.
        rows: ``[n]`` row indices of ``inputs`` (default: all ``N``, in order).
        batch_size: rows per forward; by default as many as fit :data:`MAP_BLOCK_ELEMENTS`.

    Returns:
        ``[n]`` int64 predicted classes.
    """
    head = as_masked_head(head)
    rows = np.arange(len(inputs)) if rows is None else np.asarray(rows)
    m = np.asarray(masks)
    if m.shape[:1] != rows.shape or m.ndim != 2:
        raise CfdebugError(f"Expected `masks` to have shape [{len(rows)}, C], but got {m.shape}")
    step = batch_size or max(1, MAP_BLOCK_ELEMENTS // max(1, _row_elements(inputs)))
    device = head.device
    out = []
    was_training = head.module.training
    head.eval()
    try:
        for s in range(0, len(rows), step):
            x = _take(inputs, rows[s : s + step], device)
            out.append(head(x, torch.as_tensor(m[s : s + step], dtype=torch.float32, device=device)).argmax(1).cpu())
    finally:
        head.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


@torch.no_grad()
def alter_rate(heads: MIHeads, head: MaskedHead | nn.Module, features: Any, alter: Any, head_inputs: Any = None) -> float:
    """Fraction of images that the frozen head assigns to their alter class once the MI head of
    that class has been added: ``argmax head(g + m) == alter`` (``features`` [N, C], ``alter``
    [N]; ``head_inputs`` the feature maps for a map head)."""
    head = as_masked_head(head)
    device = _heads_device(heads)
    g = _as_features(features, device)
    inputs = g if head_inputs is None else head_inputs
    a = torch.as_tensor(np.asarray(alter), dtype=torch.long, device=device)
    step = max(1, MAP_BLOCK_ELEMENTS // max(1, _row_elements(inputs)))
    hits = 0
    for s in range(0, g.shape[0], step):
        rows = np.arange(s, min(s + step, g.shape[0]))
        m = heads.soft_masks(g[s : s + step], a[s : s + step])
        hits += int((head(_take(inputs, rows, head.device), m.to(head.device), additive=True).argmax(1).to(device) == a[s : s + step]).sum())
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


# --------------------------------------------------------------------------------------------
# Cached entry points
# --------------------------------------------------------------------------------------------


@dataclass
class FittedHeads:
    """Heads of one kind (``"mc"`` or ``"mi"``) for a workspace, with their training record.

    ``stats`` holds numpy arrays (MC: :func:`keep_rate`'s per-class arrays); ``meta`` is the
    stored ``meta.json`` (config, history, fit seconds, key parts).
    """

    heads: MCHeads | MIHeads
    stats: dict[str, np.ndarray] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    cache_hit: bool = False
    key: str = ""


CACHE_KIND = "cfe"
_CACHE_VERSION = "v1"


def heads_key(workspace, kind: str, config: CFEConfig) -> str:
    """Store key of ``kind`` (``mc``/``mi``) heads: the workspace's key parts and the config."""
    from .config import config_dict
    from .store import stable_hash

    return stable_hash(CACHE_KIND, kind, workspace.key_parts, config_dict(config), _CACHE_VERSION)


def _check_finite_heads(arrays: dict[str, np.ndarray], kind: str) -> None:
    """Refuse to store (or use) heads whose parameters are not finite: their masks would be garbage."""
    bad = [name for name in ("weight", "bias", "shift", "scale") if not np.isfinite(arrays[name]).all()]
    if bad:
        raise CfdebugError(
            f"Expected finite {kind.upper()} head parameters, but {', '.join(bad)} are not finite (NaN or inf; the CFE fit "
            "diverged). Nothing was cached; lower the CFE learning rate or check the extracted features."
        )


def _load_heads(workspace, kind: str, key: str, cls, config: CFEConfig) -> FittedHeads:
    arrays, meta = workspace.store.load_arrays(CACHE_KIND, key)
    try:
        _check_finite_heads(arrays, kind)
    except CfdebugError:  # stored before this check existed: drop it so the next run refits
        workspace.store.discard(CACHE_KIND, key, "its head parameters are not finite")
        raise
    w = torch.from_numpy(np.array(arrays.pop("weight")))
    heads = cls(w.shape[0], w.shape[1], config.mask_threshold) if cls is MCHeads else cls(w.shape[0], w.shape[1])
    with torch.no_grad():
        heads.weight.copy_(w)
        heads.bias.copy_(torch.from_numpy(np.array(arrays.pop("bias"))))
        heads.shift.copy_(torch.from_numpy(np.array(arrays.pop("shift"))))
        heads.scale.copy_(torch.from_numpy(np.array(arrays.pop("scale"))))
    heads = heads.to(workspace.device).eval()
    return FittedHeads(heads=heads, stats=arrays, history=meta.get("history", []), meta=meta, cache_hit=True, key=key)


def mc_heads(workspace, config: CFEConfig | None = None, progress: Progress | None = None) -> FittedHeads:
    """The workspace's MC heads, trained on its training split on a cache miss and stored.

    Stored under kind ``"cfe"``: ``weight`` [K, C, C], ``bias`` [K, C], and the per-class
    ``keep_rate``, ``mean_mc_filters`` and ``n_correct`` of :func:`keep_rate` on the training
    split; ``meta.json`` holds the config, the loss history and the fit time.
    """
    from .config import config_dict

    config = config or CFEConfig()
    key = heads_key(workspace, "mc", config)
    if not workspace.store.exists(CACHE_KIND, key):
        head = masked_head(workspace.target, workspace.device)
        train = workspace.extractions.get("train", progress=scaled_progress(progress, 0.0, 0.05))
        maps = split_head_inputs(workspace, "train", head, scaled_progress(progress, 0.05, 0.1))
        start = time.perf_counter()
        heads, history = fit_mc_heads(train.features, head, workspace.data.num_classes, config, workspace.device, scaled_progress(progress, 0.1, 0.95), maps)
        seconds = time.perf_counter() - start
        stats = keep_rate(heads, head, train.features, train.labels, train.preds, workspace.data.num_classes, maps)
        meta = {
            "kind": "mc",
            "head": head.kind,
            "config": config_dict(config),
            "key_parts": workspace.key_parts,
            "classes": list(workspace.data.classes),
            "history": history,
            "fit_seconds": seconds,
            "keep_rate_overall": stats["overall"],
            "mean_mc_filters_overall": stats["overall_mean_mc_filters"],
        }
        arrays = {
            "weight": heads.weight.detach().cpu().numpy(),
            "bias": heads.bias.detach().cpu().numpy(),
            "shift": heads.shift.cpu().numpy(),
            "scale": heads.scale.cpu().numpy(),
            "keep_rate": stats["keep_rate"],
            "mean_mc_filters": stats["mean_mc_filters"],
            "n_correct": stats["n_correct"],
        }
        _check_finite_heads(arrays, "mc")
        workspace.store.save_arrays(CACHE_KIND, key, arrays, meta)
        if progress:
            progress(1.0, "MC heads stored")
        result = _load_heads(workspace, "mc", key, MCHeads, config)
        result.cache_hit = False
        return result
    return _load_heads(workspace, "mc", key, MCHeads, config)


def mi_heads(workspace, config: CFEConfig | None = None, progress: Progress | None = None) -> FittedHeads:
    """The workspace's MI heads (one per alter class), cached like :func:`mc_heads`."""
    from .config import config_dict

    config = config or CFEConfig()
    key = heads_key(workspace, "mi", config)
    hit = workspace.store.exists(CACHE_KIND, key)
    if not hit:
        head = masked_head(workspace.target, workspace.device)
        train = workspace.extractions.get("train", progress=scaled_progress(progress, 0.0, 0.05))
        maps = split_head_inputs(workspace, "train", head, scaled_progress(progress, 0.05, 0.1))
        start = time.perf_counter()
        heads, history = fit_mi_heads(train.features, head, workspace.data.num_classes, config, workspace.device, scaled_progress(progress, 0.1, 1.0), maps)
        meta = {
            "kind": "mi",
            "head": head.kind,
            "config": config_dict(config),
            "key_parts": workspace.key_parts,
            "classes": list(workspace.data.classes),
            "history": history,
            "fit_seconds": time.perf_counter() - start,
        }
        arrays = {
            "weight": heads.weight.detach().cpu().numpy(),
            "bias": heads.bias.detach().cpu().numpy(),
            "shift": heads.shift.cpu().numpy(),
            "scale": heads.scale.cpu().numpy(),
        }
        _check_finite_heads(arrays, "mi")
        workspace.store.save_arrays(CACHE_KIND, key, arrays, meta)
    result = _load_heads(workspace, "mi", key, MIHeads, config)
    result.cache_hit = hit
    return result


__all__ = [
    "CFEConfig",
    "MAP_BLOCK_ELEMENTS",
    "MaskedHead",
    "ChannelLinearHead",
    "as_masked_head",
    "class_spans",
    "split_head_inputs",
    "masked_head",
    "alter_rate",
    "FittedHeads",
    "MCHeads",
    "MIHeads",
    "batch_order",
    "fit_mc_heads",
    "fit_mi_heads",
    "frozen_head",
    "keep_rate",
    "masked_predictions",
    "mc_heads",
    "mc_loss",
    "mi_heads",
    "mi_loss",
    "predict_masks",
    "second_most_probable",
    "thresholded_relu",
]
