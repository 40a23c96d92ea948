"""Fitting the MC and MI heads: a stage of the training engine (:func:`cfdebug.training.run_epochs`).

SGD with momentum over one optimiser for all ``K`` stacked heads, on seeded batches of the
training features (:func:`batch_order`: one NumPy shuffle per epoch, drawn from one generator
continuing across epochs). Per batch the loss (:mod:`~cfdebug.cfe.losses`, a *sum* over images,
heads and filters) is back-propagated block by block (:func:`_fit_blocks`: rows and heads cut so
a masked block fits in memory) and the gradients add up before the one optimizer step. The
engine owns the rest, as for every other stage: the history rows (each term's mean per image
over the epoch), the non-finite check naming epoch, batch and term, the cancel hook
(``should_stop``, polled between batches), progress. There is no validation split to choose an
epoch on: the stage evaluates nothing and the last epoch's heads are the fit.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..config import CFEConfig
from ..errors import CfdebugError
from ..runtime import Progress, scaled_progress
from ..training import Stage, StepOutput, run_epochs
from .classifier_head import (
    ChannelLinearHead,
    MaskedHead,
    as_masked_head,
    class_spans,
    elements_per_row,
    frozen_head,
    masked_predictions,
    take_rows,
)
from .heads import MCHeads, MIHeads, as_features
from .losses import mc_loss, mi_loss

__all__ = ["batch_order", "fit_mc_heads", "fit_mi_heads"]

#: A fit's loss on one block: ``(indices [b], g [b, C], head inputs [b, …] or None, span) → terms``.
_BlockLoss = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", tuple[int, int]], dict[str, torch.Tensor]]


def batch_order(n: int, batch_size: int, epochs: int, seed: int) -> list[np.ndarray]:
    """The index batches of a seeded shuffle per epoch (shared with the naive reference in tests)."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(epochs):
        perm = rng.permutation(n)
        batches.extend(perm[i : i + batch_size] for i in range(0, n, batch_size))
    return batches


def _check_head_classes(head: MaskedHead, g: torch.Tensor, inputs: Any, num_classes: int) -> None:
    x = g[:1] if inputs is None else take_rows(inputs, [0], g.device)
    with torch.no_grad():
        out = head(x, torch.ones_like(g[:1]))
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise CfdebugError(
            f"Expected the classifier head to output [B, {num_classes}] logits for inputs of shape "
            f"{tuple(x.shape)}, but got shape {tuple(out.shape)}. Check that `num_classes` matches the model."
        )


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


def _fit_blocks(head: MaskedHead, num_classes: int, rows: int, g: torch.Tensor, inputs: Any, additive: bool) -> tuple[int, list[tuple[int, int]]]:
    """How a training batch of ``rows`` images is cut for the loss: ``(row_step, spans)``, rows
    ``row_step`` at a time, each with the head blocks ``spans`` of :func:`class_spans`.

    By default all rows in one go and the masked block ``[rows, J, C(·h·w)]`` bounds the spans.
    When :class:`ChannelLinearHead` shares the per-channel products (VGG at 224 px, ``q > 1``),
    the rows are cut so their products ``[rows, C, O]`` stay within
    :data:`~cfdebug.cfe.classifier_head.PRODUCT_BLOCK_ELEMENTS` and the spans are bounded by
    ``[rows, J, O]``: usually one span, so ``P`` is formed once per image and batch. The loss is
    a sum over rows and heads, so the accumulated gradient is the same either way (to float
    rounding).
    """
    fast: ChannelLinearHead | None = head.channel_linear
    layout = None if fast is None or additive or inputs is None else fast.layout(tuple(inputs.shape))
    if layout is not None:
        (q, out), c = layout, g.shape[1]
        row_step = min(rows, fast.product_rows(c, out))
        spans = class_spans(num_classes, row_step, out)
        if fast.shares_products(q, spans[0][1] - spans[0][0]):
            return row_step, spans
    return rows, class_spans(num_classes, rows, elements_per_row(g if inputs is None else inputs))


def _fit_stage(name: str, heads: MCHeads | MIHeads, loss: _BlockLoss, g: torch.Tensor, inputs: Any, config: CFEConfig, blocks: tuple[int, list[tuple[int, int]]]) -> Stage:
    """The fit of ``heads`` as an engine stage: epoch ``e`` runs the ``e``-th epoch of
    :func:`batch_order`; a step sums ``loss`` over the row and head blocks of ``blocks``,
    back-propagating each block as it goes (the gradients accumulate; the engine then steps
    the optimizer once). Its terms are batch sums, so a history row holds per-image means."""
    optimizer = torch.optim.SGD(heads.parameters(), lr=config.lr, momentum=config.momentum)
    order = batch_order(g.shape[0], config.batch_size, config.epochs, config.seed)
    per_epoch = math.ceil(g.shape[0] / config.batch_size)
    row_step, spans = blocks

    def step(idx: np.ndarray, epoch: int, index: int) -> StepOutput:
        idx_t = torch.as_tensor(idx, device=g.device)
        g_b = g[idx_t]
        x_b = None if inputs is None else take_rows(inputs, idx, g.device)
        totals: dict[str, float] = {}
        for lo in range(0, len(idx), row_step):
            rows = slice(lo, lo + row_step)
            for span in spans:
                terms = loss(idx_t[rows], g_b[rows], None if x_b is None else x_b[rows], span)
                terms["loss"].backward()
                for key, value in terms.items():
                    totals[key] = totals.get(key, 0.0) + float(value.detach())
        return StepOutput({key: torch.tensor(value, dtype=torch.float64) for key, value in totals.items()}, len(idx))

    return Stage(
        name=name, model=heads, optimizer=optimizer, batches=lambda epoch: order[(epoch - 1) * per_epoch : epoch * per_epoch],
        step=step, evaluate=None, score=None, term_mean="sum", accumulates_gradients=True,
        advice="Lower the CFE learning rate (`CFEConfig.lr`) and fit again.",
    )


def _fit_inputs(features: Any, head: MaskedHead | nn.Module | None, inputs: Any, num_classes: int, device) -> tuple[torch.Tensor, MaskedHead]:
    """Validated training features ``g`` [N, C] on ``device`` and a frozen copy of the head."""
    head = as_masked_head(head)
    g = as_features(features, device)
    _check_inputs(head, inputs, g.shape[0], g.shape[1])
    frozen = head if _frozen_on(head, device) else MaskedHead(frozen_head(head.module, device), head.kind)
    _check_head_classes(frozen, g, inputs, num_classes)
    return g, frozen


def _frozen_on(head: MaskedHead, device) -> bool:
    """Whether ``head`` already is a frozen eval-mode copy on ``device`` (e.g. from
    :func:`~cfdebug.cfe.classifier_head.masked_head`), so fitting need not copy it again (a VGG
    head is ~0.5 GB)."""
    params = list(head.module.parameters())
    return bool(params) and not head.module.training and not any(p.requires_grad for p in params) and head.device == torch.device(device)


def _init_heads(heads, g: torch.Tensor, config: CFEConfig, seed: int):
    """Seeded initial weights, input standardisation from ``g`` when configured; train mode."""
    heads.reset_parameters(seed)
    if config.standardise_inputs:
        heads.set_input_standardisation(g)
    return heads.train()


def _run_fit(stage: Stage, label: str, config: CFEConfig, progress: Progress | None, should_stop: Callable[[], bool] | None) -> list[dict]:
    run = run_epochs(stage, config.epochs, progress=scaled_progress(progress, 0.0, 1.0, f"{label} "), should_stop=should_stop)
    return run.history


def fit_mc_heads(
    features: Any,
    head: MaskedHead | nn.Module | None,
    num_classes: int,
    config: CFEConfig | None = None,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    head_inputs: Any = None,
    *,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[MCHeads, list[dict]]:
    """Train all ``K`` MC heads at once on training features.

    Args:
        features: ``[N, C]`` float32 ``g(x)`` of all training images (numpy or tensor).
        head: the frozen classifier head (never modified): a module ``[B, C] → [B, K]`` or a
            :class:`~cfdebug.cfe.classifier_head.MaskedHead` (``kind="map"`` for VGG-style heads).
        num_classes: ``K``.
        head_inputs: for a map head, the feature maps ``[N, C, h, w]`` of the same images
            (a memmap is read one batch at a time); ``None`` for a pooled head.
        should_stop: polled between batches; when it returns true the fit stops with
            :class:`~cfdebug.runs.RunCancelled` (a background run passes
            ``lambda: registry.cancel_requested(run_id)``).

    Returns:
        ``(heads, history)``: an eval-mode :class:`~cfdebug.cfe.heads.MCHeads` on ``device`` and
        one engine row per epoch (:data:`~cfdebug.training.UNEVALUATED_HISTORY_KEYS`) with the
        per-image mean of each loss term (``loss``, ``ce``, ``sparsity``, ``logits``).

    A non-finite loss term stops the fit with a :class:`CfdebugError` naming its epoch, batch
    and term.
    """
    config = config or CFEConfig()
    g, frozen = _fit_inputs(features, head, head_inputs, num_classes, device)
    heads = _init_heads(MCHeads(num_classes, g.shape[1], config.mask_threshold).to(device), g, config, config.seed)
    blocks = _fit_blocks(frozen, num_classes, min(g.shape[0], config.batch_size), g, head_inputs, additive=False)

    def loss(idx, gb, xb, span):
        return mc_loss(heads, frozen, gb, config, xb, span)

    stage = _fit_stage("fitting the MC heads", heads, loss, g, head_inputs, config, blocks)
    history = _run_fit(stage, "MC heads", config, progress, should_stop)
    return heads.eval(), history


def fit_mi_heads(
    features: Any,
    head: MaskedHead | nn.Module | None,
    num_classes: int,
    config: CFEConfig | None = None,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    head_inputs: Any = None,
    *,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[MIHeads, list[dict]]:
    """Train all ``K`` MI heads at once: head ``t`` alters every training image not predicted ``t``
    to class ``t`` (``features`` ``[N, C]`` float32; ``head``, ``head_inputs`` and
    ``should_stop`` as in :func:`fit_mc_heads`). Returns ``(heads, history)``."""
    config = config or CFEConfig()
    g, frozen = _fit_inputs(features, head, head_inputs, num_classes, device)
    preds = torch.as_tensor(masked_predictions(frozen, g if head_inputs is None else head_inputs, np.ones(tuple(g.shape), dtype=np.float32)), device=device)
    heads = _init_heads(MIHeads(num_classes, g.shape[1]).to(device), g, config, config.seed + 1)
    blocks = _fit_blocks(frozen, num_classes, min(g.shape[0], config.batch_size), g, head_inputs, additive=True)

    def loss(idx, gb, xb, span):
        return mi_loss(heads, frozen, gb, preds[idx], config, xb, span)

    stage = _fit_stage("fitting the MI heads", heads, loss, g, head_inputs, config, blocks)
    history = _run_fit(stage, "MI heads", config, progress, should_stop)
    return heads.eval(), history
