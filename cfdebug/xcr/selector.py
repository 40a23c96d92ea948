"""The XCR explanation selector (paper B, Sec. 3.1): L2X/VIBI patch selection by Gumbel top-k.

An image ``[3, H, W]`` is cut into ``d = (H/p)·(W/p)`` square patches of side ``p``. A small
ResNet-style CNN, the *selector*, gives every patch a log-probability ``log p(x) ∈ R^d`` (a
log-softmax over the ``d`` patches). While training, ``k`` patches are sampled with the
generalised Gumbel-softmax trick and relaxed into a mask ``z* ∈ [0, 1]^d`` so that the gradient
reaches the selector; a second small ResNet, the *approximator*, classifies
``T(x) = upsample(z) ⊙ x`` where ``z`` is ``z*`` itself or (the default, see
:func:`training_mask`) its hard top-k with ``z*``'s gradient. At evaluation the explanation is
the hard top-k of ``log p(x)``: exactly ``k`` patches.

XCR trains the approximator against the true labels (``target="labels"``); VIBI imitates the
black box (``target="blackbox"``). The loss is ``CE + β·KL(p(z|x) ‖ Uniform(d))`` with the
analytic ``KL = log d − H(p)``.

Masked pixels are 0 *after* normalisation (the dataset mean), as in the paper's reference
setting; :func:`apply_mask` multiplies the normalised tensor.

The trained selector and its masks are cached in the workspace store:
``xcr-selector/<key>`` (weights of the selector and the approximator, history, config) and
``xcr-masks/<key>`` (hard top-k masks ``[N, d]`` bool for one split, plus the softmax map
``[N, d]`` float32 when the selection mode is ``"Softmax"``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import SELECTOR_MODES as MODES
from ..config import SELECTOR_TARGETS as TARGETS  # noqa: F401  (re-exported)
from ..config import SelectorConfig, check_int, config_dict
from ..errors import CfdebugError
from ..runtime import Progress, scaled_progress, seed_everything
from ..store import stable_hash
from ..training import Stage, StepOutput, cpu_state, run_epochs
from .patches import check_k, num_patches


MASKS_KIND = "xcr-masks"
SELECTOR_KIND = "xcr-selector"
# Bumped when the networks or the training loop change, so stale cache entries are not reused.
FORMAT_VERSION = "xcr-selector-v2"  # v2: ResNet-style networks, lr schedule, straight-through mask


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Patches and masks (pure functions)
# --------------------------------------------------------------------------------------------


def topk_mask(log_p: torch.Tensor, k: int) -> torch.Tensor:
    """Hard evaluation mask: ``[B, d]`` float 0/1 with exactly ``k`` ones per row.

    ``torch.topk`` returns exactly ``k`` indices even with ties, so the count is exact.
    """
    check_k(k, log_p.shape[1])
    index = log_p.topk(k, dim=1).indices  # [B, k]
    return torch.zeros_like(log_p).scatter_(1, index, 1.0)


def relaxed_mask(log_p: torch.Tensor, k: int, tau: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training sample ``z* = max_l softmax((g^(l) + log p)/τ)``, ``l = 1..k`` (paper B eq. 3–4).

    Args:
        log_p: ``[B, d]`` float log-probabilities of the patches (rows log-sum-exp to 0).
        k: number of independent Gumbel draws, 1..d.
        tau: temperature (> 0); lower is closer to a hard k-hot sample.
        generator: optional torch generator on ``log_p``'s device for the uniform noise.

    Returns:
        ``[B, d]`` float in ``[0, 1]``, differentiable with respect to ``log_p``.
    """
    b, d = log_p.shape
    check_k(k, d)
    # All k draws at once ([B, k, d]), not a Python loop: one kernel per op on the device.
    u = torch.rand((b, k, d), device=log_p.device, dtype=log_p.dtype, generator=generator)
    # Keep u away from 0 and 1 so the double log stays finite.
    tiny = torch.finfo(log_p.dtype).tiny
    u = u.clamp(min=tiny, max=1.0 - torch.finfo(log_p.dtype).eps)
    gumbel = -torch.log(-torch.log(u))
    c = torch.softmax((gumbel + log_p.unsqueeze(1)) / tau, dim=-1)  # [B, k, d]
    return c.max(dim=1).values  # [B, d]


def training_mask(log_p: torch.Tensor, config: SelectorConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """The mask ``T(x)`` uses while training: ``[B, d]`` float, differentiable in ``log_p``.

    ``config.estimator == "relaxed"``: the relaxed sample :func:`relaxed_mask` itself (paper B).
    ``"straight-through"``: its ``k`` largest entries as a hard k-hot mask in the forward pass,
    the relaxed sample's gradient in the backward pass. The relaxed sample draws its ``k``
    patches with replacement, so once ``p`` is peaked it keeps far fewer than ``k`` (about 12
    of 32 on Hard Digits) and the approximator, trained on those, meets ``k`` patches only at
    evaluation; the straight-through mask shows it exactly ``k`` while training too.
    """
    z = relaxed_mask(log_p, config.k, config.tau, generator)
    if config.estimator == "relaxed":
        return z
    return topk_mask(z.detach(), config.k) - z.detach() + z


def selection_map(log_p: torch.Tensor, k: int, mode: str = "Topk") -> torch.Tensor:
    """The evaluation mask for a selection ``mode``: ``[B, d]`` float.

    ``"Topk"``: the hard k-hot map (exactly ``k`` ones). ``"Softmax"``: the softmax map
    ``p(x)`` itself (values in ``[0, 1]``, each row sums to 1), as METHODS.md specifies.
    """
    if mode == "Topk":
        return topk_mask(log_p, k)
    if mode == "Softmax":
        return log_p.exp()
    raise CfdebugError(f"Expected `mode` to be one of {', '.join(MODES)}, but got {mode!r}")


def apply_mask(x: torch.Tensor, mask, patch_size: int) -> torch.Tensor:
    """``T(x) = nearest-upsample(mask) ⊙ x``: keep (or weight) patches, zero the rest.

    Args:
        x: ``[B, C, H, W]`` float, normalised images (0 is the dataset mean, so a dropped
            patch becomes the mean colour).
        mask: ``[B, d]`` bool or float (0/1 or soft weights), ``d = (H/p)·(W/p)``, patches
            in row-major order over the ``(H/p) × (W/p)`` grid; a tensor or a NumPy array.
        patch_size: ``p``; must divide ``H`` and ``W``.

    Returns:
        A new ``[B, C, H, W]`` tensor with ``x``'s dtype and device; inputs are not modified.
    """
    if x.ndim != 4:
        raise CfdebugError(f"Expected `x` to have shape [B, C, H, W], but got shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    d = num_patches(h, w, patch_size)
    mask = torch.as_tensor(mask, device=x.device)
    if mask.shape != (b, d):
        raise CfdebugError(
            f"Expected `mask` to have shape [B, d] = [{b}, {d}] for {h}×{w} images and patch size "
            f"{patch_size}, but got shape {tuple(mask.shape)}"
        )
    grid = mask.to(x.dtype).reshape(b, 1, h // patch_size, w // patch_size)  # [B, d] → [B, 1, H/p, W/p]
    # Nearest upsampling by an integer factor is a repeat; repeat_interleave keeps autograd intact.
    up = grid.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)  # [B, 1, H, W]
    return x * up


def random_masks(n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    """Random k-hot masks (paper B's "Compare with Random"): ``[n, d]`` bool, exactly ``k`` per row.

    Reproducible: the same ``(n, d, k, seed)`` gives the same masks (NumPy ``default_rng``).
    """
    check_int(n, "n", 0)
    check_int(d, "d", 1)
    k = check_k(k, d)
    rng = np.random.default_rng(seed)
    # The k smallest of d i.i.d. uniforms are a uniformly random k-subset.
    index = np.argpartition(rng.random((n, d)), k - 1, axis=1)[:, :k]  # [n, k]
    masks = np.zeros((n, d), dtype=bool)
    np.put_along_axis(masks, index, True, axis=1)
    return masks


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def kl_to_uniform(log_p: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(p ‖ Uniform(d)) = log d − H(p) = log d + Σ_j p_j log p_j``; ``[B]`` float ≥ 0.

    ``p log p`` is taken as 0 where ``p = 0`` (``log_p = -inf``), so a one-hot row gives ``log d``.
    """
    d = log_p.shape[1]
    # Clamping -inf to the most negative finite value makes 0·log 0 = 0 in the forward pass and
    # keeps the backward pass finite (a torch.where over a NaN branch would still leak NaN grads).
    finite = log_p.clamp(min=torch.finfo(log_p.dtype).min)
    return math.log(d) + (log_p.exp() * finite).sum(dim=1)


def selector_loss(approx_logits: torch.Tensor, target: torch.Tensor, log_p: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """``CE(approximator(T(x)), target) + β·KL(p(z|x) ‖ Uniform(d))``, both batch means.

    Args:
        approx_logits: ``[B, K]`` float logits of the approximator on ``T(x)``.
        target: ``[B]`` int64 classes (true labels for XCR, black-box predictions for VIBI).
        log_p: ``[B, d]`` float selector log-probabilities.
        beta: KL weight ≥ 0.

    Returns:
        ``{"loss", "ce", "kl"}`` scalar tensors (``loss`` carries the gradient).
    """
    ce = F.cross_entropy(approx_logits, target)
    kl = kl_to_uniform(log_p).mean()
    return {"loss": ce + beta * kl, "ce": ce, "kl": kl}


# --------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------


def _conv(cin: int, cout: int, kernel: int = 3, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
    padding = dilation * (kernel - 1) // 2 if stride == 1 else 0
    return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ResidualBlock(nn.Module):
    """ResNet basic block: ``[B, cin, H, W]`` → ``[B, cout, H/stride, W/stride]`` float.

    Two 3×3 convolutions with BatchNorm (the first strided, both dilated by ``dilation``) plus a
    shortcut (identity, or a strided 1×1 convolution with BatchNorm when the shape changes).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=dilation, dilation=dilation, bias=False), nn.BatchNorm2d(cout),
        )
        same = stride == 1 and cin == cout
        self.shortcut = nn.Identity() if same else nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


#: Dilations of the selector's residual blocks at patch resolution.
SELECTOR_DILATIONS = (1, 2, 4)


class PatchSelector(nn.Module):
    """Selector CNN: ``[B, C, H, W]`` normalised images → ``log p(x)`` ``[B, d]`` float.

    A ``p×p`` convolution with stride ``p`` embeds each patch (one cell per patch, aligned
    exactly with the patch grid for any ``p``); three residual blocks (:class:`ResidualBlock`)
    with dilation 1, 2, 4 at patch resolution give each patch score a receptive field of 29
    patches (all of a 32×32 image for p=2); a 1×1 convolution to one channel is the patch logit.
    The paper uses a ResNet-18 selector for CIFAR; this ResNet-style one keeps its ingredients
    (residual blocks, BatchNorm) at a size that trains on two CPU cores in well under a minute
    for the demo, which METHODS.md allows (``width`` scales it).
    """

    def __init__(self, patch_size: int = 2, in_channels: int = 3, width: int = 32):
        super().__init__()
        check_int(patch_size, "patch_size", 1)
        self.patch_size = patch_size
        self.patchify = nn.Sequential(*_conv(in_channels, width, kernel=patch_size, stride=patch_size))
        self.context = nn.Sequential(*(ResidualBlock(width, width, dilation=r) for r in SELECTOR_DILATIONS))
        self.score = nn.Conv2d(width, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_patches(x.shape[2], x.shape[3], self.patch_size)
        s = self.score(self.context(self.patchify(x)))  # [B, 1, H/p, W/p]
        return F.log_softmax(s.flatten(1), dim=1)  # [B, d], row-major like apply_mask


class Approximator(nn.Module):
    """Approximator CNN: ``T(x)`` ``[B, C, H, W]`` → class logits ``[B, K]`` float.

    A small ResNet for 32 px inputs: a 3×3 stem convolution (``width`` channels), three residual
    blocks that each halve the resolution and double the width (×2, ×4, ×8), global average
    pooling and a linear layer, so it accepts any input size.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            *_conv(in_channels, width),
            ResidualBlock(width, 2 * width, stride=2),
            ResidualBlock(2 * width, 4 * width, stride=2),
            ResidualBlock(4 * width, 8 * width, stride=2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


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
    return _selector_maps(selector, data, k, device, batch_size, soft=False)[0]


@torch.no_grad()
def _selector_maps(selector, data, k, device, batch_size, soft: bool):
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
    return _approximator_scores(selector, approximator, data, k, patch_size, device, mode, batch_size)[0]


@torch.no_grad()
def _approximator_scores(selector, approximator, data, k, patch_size, device, mode="Topk", batch_size=256) -> tuple[float, float]:
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


@dataclass
class SelectorHistory:
    """Training record of :func:`train_selector`.

    ``rows``: one engine history row per epoch (:data:`cfdebug.training.HISTORY_KEYS`): the mean
    training ``loss``, ``ce``, ``kl`` (per sample), the approximator's running accuracy on the
    relaxed training sample (``train_acc``), its validation accuracy and cross-entropy with the
    hard top-k mask (``val_acc``, ``val_loss``), its test accuracy (``test_acc``, logged only;
    NaN without a test split), with the softmax map ``val_acc_softmax`` (only in ``"Softmax"``
    mode) and the epoch's ``train_seconds`` / ``eval_seconds``. ``best_epoch`` / ``best_val_acc``:
    the kept epoch (highest ``val_acc``) and its ``val_acc``; ``seconds``: total wall time.
    """

    rows: list[dict]
    best_epoch: int
    best_val_acc: float
    seconds: float

    def as_dict(self) -> dict:
        return {"rows": self.rows, "best_epoch": self.best_epoch, "best_val_acc": self.best_val_acc, "seconds": self.seconds}


def _selector_scores(selector, approximator, data, config: SelectorConfig, device, val_loader) -> dict[str, float]:
    """An epoch's scores: top-k validation accuracy and loss, the softmax-map validation accuracy
    (Softmax mode), test accuracy. ``val_loader`` draws its base seed from the global RNG (as it
    always has: the Gumbel noise of the next epoch depends on that stream); the test pass draws
    from a private generator, so logging it changes nothing."""
    k, p = config.k, config.patch_size
    val_acc, val_loss = _approximator_scores(selector, approximator, val_loader, k, p, device)
    scores = {"val_acc": val_acc, "val_loss": val_loss}
    if config.mode == "Softmax":
        scores["val_acc_softmax"] = approximator_accuracy(selector, approximator, val_loader, k, p, device, "Softmax")
    test_acc = float("nan")
    if "test" in data.splits:
        test = torch.utils.data.DataLoader(data.torch_split("test"), batch_size=256, generator=torch.Generator())
        test_acc = approximator_accuracy(selector, approximator, test, k, p, device)
    return {**scores, "test_acc": test_acc}


def _lr_factor(config: SelectorConfig, step: int, steps: int) -> float:
    """The factor on ``config.lr`` at optimizer step ``step`` (0-based) of ``steps``: 1 for
    ``schedule="constant"``; for ``"cosine"`` half a cosine from 1 down to 0."""
    if config.schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / max(steps, 1)))


def lr_schedule(optimizer: torch.optim.Optimizer, config: SelectorConfig, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The selector's learning-rate schedule over ``steps`` optimizer steps, stepped once per batch:
    ``config.lr`` (the optimizer's initial rate) times :func:`_lr_factor` of the step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(config, step, steps))


def train_selector(workspace, config: SelectorConfig, progress: Progress | None = None, should_stop: Callable[[], bool] | None = None):
    """Train the selector and approximator on ``workspace``'s training split (on the engine,
    :func:`cfdebug.training.run_epochs`).

    Adam on both networks' parameters, its learning rate following :func:`lr_schedule` (one
    scheduler step per batch); each step draws the training mask (:func:`training_mask`: the relaxed
    sample ``z*`` of ``config.k`` Gumbel draws at ``config.tau``, by default passed on as its
    hard top-k with ``z*``'s gradient), classifies ``T(x)`` and minimises :func:`selector_loss`. After every epoch the approximator is scored on the validation split
    with the hard top-k mask, and the epoch with the best score is kept (the test split is never
    used to choose anything). The top-k score decides in both selection modes: the training
    objective does not depend on ``config.mode`` (it only changes which map ``T(x)`` uses
    downstream), and the approximator never sees the softmax map while training, so its accuracy
    on ``p(x) ⊙ x`` is reported (``val_acc_softmax``) but would be a poor criterion.

    Args:
        workspace: a :class:`cfdebug.workspace.Workspace` (data, device; the black box for
            ``target="blackbox"``).
        config: a :class:`SelectorConfig`.
        progress: called as ``progress(fraction in [0, 1], message)`` after every epoch.
        should_stop: polled before every batch; when it returns True a
            :class:`cfdebug.runs.RunCancelled` is raised and nothing is kept.

    Returns:
        ``(selector, approximator, history)``: both networks in eval mode on the workspace
        device with the kept epoch's weights, and a :class:`SelectorHistory`.
    """
    data, device = workspace.data, workspace.device
    d = num_patches(data.input_size, data.input_size, config.patch_size)
    check_k(config.k, d)
    generator = seed_everything(config.seed)
    selector = PatchSelector(config.patch_size, 3, config.width).to(device)
    approximator = Approximator(data.num_classes, 3, config.width).to(device)
    optimizer = torch.optim.Adam(list(selector.parameters()) + list(approximator.parameters()), lr=config.lr)
    blackbox = workspace.model if config.target == "blackbox" else None
    if blackbox is not None:
        blackbox.eval()
    train_loader = torch.utils.data.DataLoader(data.torch_split("train"), batch_size=config.batch_size, shuffle=True, generator=generator)
    val_loader = torch.utils.data.DataLoader(data.torch_split("val"), batch_size=256)

    scheduler = lr_schedule(optimizer, config, config.epochs * len(train_loader))

    def step(batch, epoch: int, index: int) -> StepOutput:
        # The rate of batch g (0-based over all epochs) is the schedule's at step g: the scheduler
        # steps once per batch after the first (after the optimizer's step of the batch before).
        while scheduler.last_epoch < (epoch - 1) * len(train_loader) + index:
            scheduler.step()
        x, y = batch[0].to(device), batch[1].to(device)
        if blackbox is not None:
            with torch.no_grad():
                y = blackbox(x).argmax(1)  # VIBI: imitate the black box's decision
        log_p = selector(x)
        z = training_mask(log_p, config)
        logits = approximator(apply_mask(x, z, config.patch_size))
        return StepOutput(selector_loss(logits, y, log_p, config.beta), len(y), int((logits.argmax(1) == y).sum()))

    nets = nn.ModuleDict({"selector": selector, "approximator": approximator})
    stage = Stage(
        name="selector training", model=nets, optimizer=optimizer, batches=lambda epoch: train_loader, step=step,
        evaluate=lambda: _selector_scores(selector, approximator, data, config, device, val_loader),
        generator=generator, term_mean="sample", advice="Lower `lr`.",
    )
    start = time.perf_counter()
    run = run_epochs(stage, config.epochs, progress=scaled_progress(progress, 0.0, 1.0, "selector "), should_stop=should_stop)
    nets.load_state_dict(run.best_state)
    history = SelectorHistory(rows=run.history, best_epoch=run.best_epoch, best_val_acc=run.best_row["val_acc"], seconds=time.perf_counter() - start)
    return selector.eval(), approximator.eval(), history


# --------------------------------------------------------------------------------------------
# Cached entries
# --------------------------------------------------------------------------------------------


def _training_fields(config: SelectorConfig) -> dict:
    """The config fields training depends on: all but ``mode`` (a Topk and a Softmax run share
    one trained selector; ``mode`` only picks the map that :func:`selector_masks` stores)."""
    fields = config_dict(config)
    fields.pop("mode")
    return fields


def selector_key(workspace, config: SelectorConfig) -> str:
    """Cache key of the trained selector: the workspace's inputs and the training fields."""
    return stable_hash(SELECTOR_KIND, FORMAT_VERSION, workspace.key_parts, _training_fields(config))


def masks_key(workspace, config: SelectorConfig, split: str) -> str:
    """Cache key of one split's masks."""
    return stable_hash(MASKS_KIND, FORMAT_VERSION, workspace.key_parts, config_dict(config), split)


def trained_selector(workspace, config: SelectorConfig, progress: Progress | None = None, should_stop: Callable[[], bool] | None = None):
    """The trained ``(selector, approximator, meta)`` for ``config``, from the cache or trained now.

    ``meta`` holds ``config``, ``history``, ``num_classes`` and ``cache_hit``. The weights
    are stored under ``xcr-selector/<selector_key>`` as ``selector.pt`` / ``approximator.pt``
    and read back with ``torch.load(weights_only=True)``.
    """
    store, key = workspace.store, selector_key(workspace, config)
    num_classes = workspace.data.num_classes
    if store.exists(SELECTOR_KIND, key):
        meta = store.load_meta(SELECTOR_KIND, key)
        folder = store.path(SELECTOR_KIND, key)
        selector = PatchSelector(config.patch_size, 3, config.width)
        approximator = Approximator(meta["num_classes"], 3, config.width)
        selector.load_state_dict(torch.load(folder / "selector.pt", map_location="cpu", weights_only=True))
        approximator.load_state_dict(torch.load(folder / "approximator.pt", map_location="cpu", weights_only=True))
        return selector.to(workspace.device).eval(), approximator.to(workspace.device).eval(), dict(meta, cache_hit=True)
    selector, approximator, history = train_selector(workspace, config, progress, should_stop)
    meta = {
        "config": _training_fields(config),
        "key_parts": workspace.key_parts,
        "num_classes": num_classes,
        "history": history.as_dict(),
        "format": FORMAT_VERSION,
    }
    with store.writer(SELECTOR_KIND, key, meta) as tmp:
        torch.save(cpu_state(selector), tmp / "selector.pt")
        torch.save(cpu_state(approximator), tmp / "approximator.pt")
    return selector, approximator, dict(meta, cache_hit=False)


@dataclass(frozen=True, eq=False)
class SelectorMasks:
    """One split's explanation masks.

    Attributes:
        masks: ``[N, d]`` bool, hard top-k (exactly ``k`` True per row), dataset order.
        probs: ``[N, d]`` float32 softmax map ``p(x)`` when ``config.mode == "Softmax"``
            (the mask that mode applies), else ``None``.
        meta: the stored metadata (config, split, selector key and training history).
        cache_hit: whether the masks were read from the cache.
    """

    masks: np.ndarray
    probs: np.ndarray | None
    meta: dict
    cache_hit: bool


def selector_masks(workspace, config: SelectorConfig, split: str, progress: Progress | None = None, should_stop: Callable[[], bool] | None = None) -> SelectorMasks:
    """Masks of ``split`` from the selector trained with ``config``; cached under ``xcr-masks``.

    On a miss the selector is taken from :func:`trained_selector` (trained and cached when
    needed), run over the split in batches on the workspace device, and the masks are stored
    atomically. ``split`` is one of the workspace data's splits (``train``, ``val``, ``test``).
    """
    if split not in workspace.data.splits:
        raise CfdebugError(f"Expected `split` to be one of {', '.join(workspace.data.splits)}, but got {split!r}")
    store, key = workspace.store, masks_key(workspace, config, split)
    hit = store.exists(MASKS_KIND, key)
    if not hit:
        selector, _, sel_meta = trained_selector(workspace, config, progress, should_stop)
        soft = config.mode == "Softmax"
        masks, probs = _selector_maps(selector, workspace.data.torch_split(split), config.k, workspace.device, 256, soft)
        meta = {
            "config": config_dict(config),
            "split": split,
            "key_parts": workspace.key_parts,
            "selector_key": selector_key(workspace, config),
            "history": sel_meta["history"],
            "d": int(masks.shape[1]),
            "format": FORMAT_VERSION,
        }
        arrays = {"masks": masks} if probs is None else {"masks": masks, "probs": probs}
        store.save_arrays(MASKS_KIND, key, arrays, meta)
    arrays, meta = store.load_arrays(MASKS_KIND, key)
    return SelectorMasks(masks=arrays["masks"], probs=arrays.get("probs"), meta=meta, cache_hit=hit)


__all__ = [
    "Approximator",
    "PatchSelector",
    "SelectorConfig",
    "SelectorHistory",
    "SelectorMasks",
    "ResidualBlock",
    "apply_mask",
    "approximator_accuracy",
    "compute_masks",
    "kl_to_uniform",
    "lr_schedule",
    "masked_probabilities",
    "masks_key",
    "random_masks",
    "relaxed_mask",
    "selection_map",
    "selector_key",
    "selector_loss",
    "selector_masks",
    "topk_mask",
    "trained_selector",
    "train_selector",
    "training_mask",
]
