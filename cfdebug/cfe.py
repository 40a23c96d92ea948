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
to 7×7 and has no ``pooled_head``; that path needs cached feature maps and is not implemented
yet (:func:`fit_mc_heads` raises a :class:`~cfdebug.errors.CfdebugError` saying so).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import CFEConfig
from .errors import CfdebugError

Progress = Callable[[float, str], None]

# Architectures whose head runs on pooled g(x); kept in one place for the error message.
SUPPORTED_ARCHITECTURES = (
    "demo-cnn, ResNet/ResNeXt/Wide-ResNet (layer4 → fc), DenseNet, EfficientNet, MobileNetV2/V3, "
    "RegNet and other `features → global average pool → classifier` models"
)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


def thresholded_relu(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """``x`` where ``x > threshold``, else 0 (Keras' ThresholdedReLU).

    Its gradient is 1 above the threshold and 0 below, which is what autograd gives for this
    expression; the CFE heads train with that gradient (a filter switched off by one image can
    still be switched on again through the images where it is on).
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

    def pre_activation(self, g: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """``g`` [B, C] → ``W_k g + b_k``: [B, K, C] for all heads, or [B, C] for ``classes`` [B]."""
        g = (g - self.shift) / self.scale
        if classes is None:
            return torch.einsum("kji,bi->bkj", self.weight, g) + self.bias  # [B, K, C]
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

    def soft_masks(self, g: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Soft masks: [B, K, C] for every head, or [B, C] for one head per image (``classes`` [B])."""
        return thresholded_relu(torch.sigmoid(self.pre_activation(g, classes)), self.threshold)

    def binary_masks(self, g: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """``MC_x = m > 0`` as bool, same shapes as :meth:`soft_masks`."""
        # sigmoid(a) > θ  ⇔  a > logit(θ); exact for θ = 0.5 (a > 0) and avoids sigmoid rounding.
        return self.pre_activation(g, classes) > math.log(self.threshold / (1.0 - self.threshold))

    def forward(self, g: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        return self.soft_masks(g, classes)


class MIHeads(_StackedDense):
    """All ``K`` MI heads (one per alter class): ``g`` [B, C] → additive ``m = ReLU(W g + b) ≥ 0``."""

    def soft_masks(self, g: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        return F.relu(self.pre_activation(g, classes))

    def binary_masks(self, g: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        return self.pre_activation(g, classes) > 0

    def forward(self, g: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        return self.soft_masks(g, classes)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def mc_loss(heads: MCHeads, pooled_head: nn.Module, g: torch.Tensor, config: CFEConfig) -> dict[str, torch.Tensor]:
    """The MC loss of every head on one batch, summed over batch, heads and filters.

    Args:
        g: ``[B, C]`` float32 pooled features. Head ``k``'s target is class ``k`` for every image.

    Returns:
        ``{"loss", "ce", "sparsity", "logits"}`` scalar tensors: ``ce = Σ CE(k, softmax(z'))``,
        ``sparsity = λ_sparse·scale·Σ|m|``, ``logits = −logits_weight·Σ z'_k`` (≤ 0 when the
        target logits are positive) and ``loss = ce + sparsity + logits``.
    """
    b, c = g.shape
    k = heads.num_classes
    m = heads.soft_masks(g)  # [B, K, C]
    masked = (g[:, None, :] * m).reshape(b * k, c)  # [B·K, C], row b·K + k = head k on image b
    z = pooled_head(masked)  # [B·K, K]
    target = torch.arange(k, device=g.device).repeat(b)  # [B·K]
    ce = F.cross_entropy(z, target, reduction="sum")
    sparsity = config.sparsity_lambda * config.sparsity_scale * m.abs().sum()
    logits = -config.logits_weight * z.gather(1, target[:, None]).sum()
    return {"loss": ce + sparsity + logits, "ce": ce, "sparsity": sparsity, "logits": logits}


def mi_loss(heads: MIHeads, pooled_head: nn.Module, g: torch.Tensor, preds: torch.Tensor, config: CFEConfig) -> dict[str, torch.Tensor]:
    """The MI loss of every head on one batch: head ``t`` pushes ``g + m`` to class ``t``.

    Images already predicted ``t`` (``preds`` [B]) are left out of head ``t``'s terms: there is
    nothing to alter. Returns ``{"loss", "ce", "sparsity"}`` summed over batch, heads, filters.
    """
    b, c = g.shape
    k = heads.num_classes
    m = heads.soft_masks(g)  # [B, K, C]
    z = pooled_head((g[:, None, :] + m).reshape(b * k, c))  # [B·K, K]
    target = torch.arange(k, device=g.device).repeat(b)  # [B·K]
    keep = (preds.to(g.device).long()[:, None] != torch.arange(k, device=g.device)).to(g.dtype)  # [B, K]
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


def _require_pooled_head(pooled_head) -> None:
    if pooled_head is None:
        raise CfdebugError(
            "Expected the target layer to have a `pooled_head` (global average pooling followed by "
            "the classifier), but got an architecture without one (e.g. torchvision VGG, which pools "
            "to 7×7, or a layer named with `--layer`). CFE heads on cached feature maps are not "
            f"implemented yet; supported now: {SUPPORTED_ARCHITECTURES}."
        )


def _check_head_classes(head: nn.Module, channels: int, num_classes: int, device) -> None:
    with torch.no_grad():
        out = head(torch.zeros(1, channels, device=device))
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise CfdebugError(
            f"Expected the classifier head to output [B, {num_classes}] logits for [B, {channels}] features, "
            f"but got shape {tuple(out.shape)}. Check that `num_classes` matches the model."
        )


def _as_features(features: Any, device) -> torch.Tensor:
    g = torch.as_tensor(np.asarray(features, dtype=np.float32) if not isinstance(features, torch.Tensor) else features)
    if g.ndim != 2 or g.shape[0] == 0 or g.shape[1] == 0:
        raise CfdebugError(f"Expected `features` to have shape [N, C] with N, C >= 1, but got shape {tuple(g.shape)}")
    return g.to(device=device, dtype=torch.float32)


def _fit(heads, loss_fn, g: torch.Tensor, config: CFEConfig, progress: Progress | None, label: str) -> list[dict]:
    return _fit_loop(heads, loss_fn, g, config, progress, label)


def _fit_loop(heads, loss_fn, g: torch.Tensor, config: CFEConfig, progress: Progress | None, label: str) -> list[dict]:
    opt = torch.optim.SGD(heads.parameters(), lr=config.lr, momentum=config.momentum)
    batches = batch_order(g.shape[0], config.batch_size, config.epochs, config.seed)
    per_epoch = math.ceil(g.shape[0] / config.batch_size)
    history: list[dict] = []
    sums: dict[str, float] = {}
    for step, idx in enumerate(batches):
        idx_t = torch.as_tensor(idx, device=g.device)
        terms = loss_fn(idx_t)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        if (step + 1) % per_epoch == 0:
            epoch = (step + 1) // per_epoch
            history.append({"epoch": epoch, **{k: v / g.shape[0] for k, v in sums.items()}})
            sums = {}
            if progress:
                progress(epoch / config.epochs, f"{label} epoch {epoch}/{config.epochs}, loss {history[-1]['loss']:.4f}/image")
    return history


def _fit_inputs(features: Any, pooled_head: nn.Module | None, num_classes: int, device) -> tuple[torch.Tensor, nn.Module]:
    """Validated training features ``g`` [N, C] on ``device`` and the frozen pooled head."""
    _require_pooled_head(pooled_head)
    g = _as_features(features, device)
    head = frozen_head(pooled_head, device)
    _check_head_classes(head, g.shape[1], num_classes, device)
    return g, head


def _init_heads(heads, g: torch.Tensor, config: CFEConfig, seed: int):
    """Seeded initial weights, input standardisation from ``g`` when configured; train mode."""
    heads.reset_parameters(seed)
    if config.standardise_inputs:
        heads.set_input_standardisation(g)
    return heads.train()


def fit_mc_heads(
    features: Any,
    pooled_head: nn.Module | None,
    num_classes: int,
    config: CFEConfig | None = None,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> tuple[MCHeads, list[dict]]:
    """Train all ``K`` MC heads at once on training features.

    Args:
        features: ``[N, C]`` float32 ``g(x)`` of all training images (numpy or tensor).
        pooled_head: the frozen classifier head ``[B, C] → [B, K]`` (never modified).
        num_classes: ``K``.

    Returns:
        ``(heads, history)``: an eval-mode :class:`MCHeads` on ``device`` and one dict per epoch
        with the per-image mean of each loss term (``loss``, ``ce``, ``sparsity``, ``logits``).
    """
    config = config or CFEConfig()
    g, head = _fit_inputs(features, pooled_head, num_classes, device)
    heads = _init_heads(MCHeads(num_classes, g.shape[1], config.mask_threshold).to(device), g, config, config.seed)
    history = _fit(heads, lambda idx: mc_loss(heads, head, g[idx], config), g, config, progress, "MC heads")
    return heads.eval(), history


def fit_mi_heads(
    features: Any,
    pooled_head: nn.Module | None,
    num_classes: int,
    config: CFEConfig | None = None,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> tuple[MIHeads, list[dict]]:
    """Train all ``K`` MI heads at once: head ``t`` alters every training image not predicted ``t``
    to class ``t`` (``features`` ``[N, C]`` float32). Returns ``(heads, history)``."""
    config = config or CFEConfig()
    g, head = _fit_inputs(features, pooled_head, num_classes, device)
    with torch.no_grad():
        preds = head(g).argmax(1)
    heads = _init_heads(MIHeads(num_classes, g.shape[1]).to(device), g, config, config.seed + 1)
    history = _fit(heads, lambda idx: mi_loss(heads, head, g[idx], preds[idx], config), g, config, progress, "MI heads")
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
def masked_predictions(pooled_head: nn.Module, features: Any, masks: Any, batch_size: int = 8192) -> np.ndarray:
    """Classes the frozen head predicts for ``g ⊙ mask`` (``[N, C]`` features, ``[N, C]`` masks) → ``[N]``."""
    device = next(pooled_head.parameters()).device
    g = _as_features(features, "cpu")
    m = torch.as_tensor(np.asarray(masks), dtype=torch.float32)
    out = []
    was_training = pooled_head.training
    pooled_head.eval()
    try:
        for s in range(0, g.shape[0], batch_size):
            out.append(pooled_head((g[s : s + batch_size] * m[s : s + batch_size]).to(device)).argmax(1).cpu())
    finally:
        pooled_head.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


@torch.no_grad()
def alter_rate(heads: MIHeads, pooled_head: nn.Module, features: Any, alter: Any) -> float:
    """Fraction of images that the frozen head assigns to their alter class once the MI head of
    that class has been added: ``argmax head(g + m) == alter`` (``features`` [N, C], ``alter`` [N])."""
    device = _heads_device(heads)
    g = _as_features(features, device)
    a = torch.as_tensor(np.asarray(alter), dtype=torch.long, device=device)
    pred = pooled_head(g + heads.soft_masks(g, a)).argmax(1)
    return float((pred == a).float().mean())


def keep_rate(heads: MCHeads, pooled_head: nn.Module, features: Any, labels: Any, preds: Any, num_classes: int) -> dict[str, np.ndarray | float]:
    """How often the MC filters alone keep a correct decision, per class.

    Over the correctly classified images of class ``c`` (``labels == preds == c``), the head of
    ``c`` gives ``MC_x`` and the frozen head is run on ``g(x) ⊙ MC_x`` (binary mask: the MC
    filters at their full activation, every other filter zeroed).

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
    g = np.asarray(features, dtype=np.float32)[correct]
    y = labels[correct]
    masks = predict_masks(heads, g, y)  # [n, C]
    kept = masked_predictions(pooled_head, g, masks) == y
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


def _load_heads(workspace, kind: str, key: str, cls, config: CFEConfig) -> FittedHeads:
    arrays, meta = workspace.store.load_arrays(CACHE_KIND, key)
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
    _require_pooled_head(workspace.target.pooled_head)
    key = heads_key(workspace, "mc", config)
    if not workspace.store.exists(CACHE_KIND, key):
        train = workspace.extractions.get("train", progress=scaled_progress(progress, 0.0, 0.1))
        start = time.perf_counter()
        heads, history = fit_mc_heads(train.features, workspace.target.pooled_head, workspace.data.num_classes, config, workspace.device, scaled_progress(progress, 0.1, 0.95))
        seconds = time.perf_counter() - start
        head = frozen_head(workspace.target.pooled_head, workspace.device)
        stats = keep_rate(heads, head, train.features, train.labels, train.preds, workspace.data.num_classes)
        meta = {
            "kind": "mc",
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
    _require_pooled_head(workspace.target.pooled_head)
    key = heads_key(workspace, "mi", config)
    hit = workspace.store.exists(CACHE_KIND, key)
    if not hit:
        train = workspace.extractions.get("train", progress=scaled_progress(progress, 0.0, 0.1))
        start = time.perf_counter()
        heads, history = fit_mi_heads(train.features, workspace.target.pooled_head, workspace.data.num_classes, config, workspace.device, scaled_progress(progress, 0.1, 1.0))
        meta = {
            "kind": "mi",
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
        workspace.store.save_arrays(CACHE_KIND, key, arrays, meta)
    result = _load_heads(workspace, "mi", key, MIHeads, config)
    result.cache_hit = hit
    return result


def scaled_progress(progress: Progress | None, lo: float, hi: float) -> Progress | None:
    """Map a stage's progress in [0, 1] onto [lo, hi] of the caller's bar."""
    if progress is None:
        return None
    return lambda frac, text: progress(lo + (hi - lo) * frac, text)


__all__ = [
    "CFEConfig",
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
    "scaled_progress",
    "second_most_probable",
    "thresholded_relu",
]
