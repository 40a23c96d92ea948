"""The CFE heads' losses: every head's terms on one batch, summed over batch, heads and filters.

MC head ``c`` is trained on *all* training images with target ``c`` (paper A):

    L_c = CE(c, softmax(z')) + λ_sparse·0.001·Σ|m| − 0.001·Σ z'_c      (λ_sparse = 2)

with ``z'`` the frozen head's logits on the masked target-layer output. MI head ``t`` pushes
``g + m`` to class ``t`` for every image not already predicted ``t``. Both return a dict of
terms (``{"loss", "ce", "sparsity", …}``), so the engine logs each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CFEConfig
from .classifier_head import MaskedHead, as_masked_head
from .heads import MCHeads, MIHeads

__all__ = ["mc_loss", "mi_loss"]


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
