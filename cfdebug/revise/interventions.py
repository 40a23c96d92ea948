"""What each revise method changes in training, and the validation that goes with it.

Training side (a ``batch_transform`` or a ``loss_fn`` for :func:`cfdebug.training.finetune`):

* region counterfactual: the region refilled in every training batch (:func:`region_batches`);
* appearance: per-image colour jitter and random greyscale (:func:`appearance_batches`,
  torchvision transforms v2 on the de-normalised images);
* region RRR: the loss adds ``λ · mean_i Σ_{p ∈ R} (∂ Σ_k log p_k(x_i) / ∂x_p)²`` (Ross et al.
  2017; :func:`rrr_loss`);
* filters: paper A's losses with the user's filters ``S`` out of every class's MC set and
  penalised for every class (:func:`filter_loss`).

Every loss returns its terms (``ce``, the raw extra terms) and, for each weighted term, its
weighted value ``w_<term>`` and its share of the loss ``share_<term>`` (``|λ·term| / (|ce| + Σ|λ·term|)``,
per batch), so a history row tells whether a λ can change anything
(:func:`cfdebug.training.weighted_terms`).

Validation side (**counterfactual validation**, METHODS.md): once the user has declared something
not evidence, model selection scores the validation split *with the same intervention applied*
(:func:`counterfactual_validation`), never the plain validation split (which still carries the
shortcut, so it prefers a model that keeps it) and never the test split.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CfdebugError
from ..training import weighted_terms
from .region import Region, fill_region, wrong_class_region

__all__ = [
    "region_batches",
    "appearance_batches",
    "jitter_images",
    "rrr_loss",
    "filter_loss",
    "zeroed_channels",
    "counterfactual_validation",
    "split_tensors",
    "VALIDATION_SEED",
]

#: The seed of every counterfactual validation set (the same images and draws for every epoch,
#: method and control, so their validation scores compare).
VALIDATION_SEED = 12345


# ---------------------------------------------------------------------------------- training batches
def region_batches(region: Region, fill: str, mean, std) -> Callable:
    """A ``batch_transform`` refilling ``region`` with ``fill`` in every training batch."""

    def transform(images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor):
        return fill_region(images, labels, region, fill, mean, std), labels

    return transform


def jitter_images(images: torch.Tensor, mean, std, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image colour jitter (brightness/contrast ±0.4·s, saturation ±0.8·s, hue ±0.5·s) and
    greyscale with probability ``s/2`` on normalised ``images`` ``[B, 3, S, S]``; returns normalised.

    torchvision's v2 transforms draw one set of parameters per call, so each image is its own call
    (a batch call would jitter every image alike). With ``generator`` the draws are reproducible
    (the counterfactual validation set); without, they come from the global RNG (training).
    """
    from torchvision.transforms import v2

    if strength <= 0:
        return images
    mean_t, std_t = torch.as_tensor(mean).view(3, 1, 1).to(images.device), torch.as_tensor(std).view(3, 1, 1).to(images.device)
    rgb = (images * std_t + mean_t).clamp(0, 1)
    jitter = v2.Compose([
        v2.ColorJitter(brightness=0.4 * strength, contrast=0.4 * strength, saturation=0.8 * strength, hue=0.5 * strength),
        v2.RandomGrayscale(p=0.5 * strength),
    ])
    if generator is not None:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = torch.stack([jitter(img) for img in rgb])
    else:
        out = torch.stack([jitter(img) for img in rgb])
    return (out - mean_t) / std_t


def appearance_batches(strength: float, mean, std) -> Callable:
    """A ``batch_transform`` jittering every training image's colours (appearance is not evidence)."""

    def transform(images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor):
        return jitter_images(images, mean, std, strength), labels

    return transform


# ---------------------------------------------------------------------------------- losses
def rrr_loss(region: Region, lam: float) -> tuple[Callable, Callable]:
    """``(batch_transform, loss_fn)`` of region RRR: the images require grad, and the loss adds
    ``λ · mean_i Σ_{c, p ∈ R} (∂ Σ_k log p_k(x_i) / ∂x_{c,p})²`` to the batch-mean cross-entropy.

    The input gradient is taken with ``create_graph=True``, so its square is trained through
    (double back-propagation, as in Ross et al. and R2R's RRR).
    """

    def transform(images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor):
        return images.clone().requires_grad_(True), labels

    def loss_fn(batch) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(batch.logits, batch.labels)
        log_p = F.log_softmax(batch.logits, dim=1).sum()
        (grad,) = torch.autograd.grad(log_p, batch.images, create_graph=True)  # [B, 3, S, S]
        inside = grad[:, :, region.rows, region.cols].pow(2).flatten(1).sum(1).mean()
        return weighted_terms(ce, {"rrr": (lam, inside)})

    return transform, loss_fn


def filter_loss(filters: Sequence[int], global_sets: np.ndarray, lam: float, lambda1: float, theta: float, device) -> Callable:
    """Paper A's treatment losses with the user's filters ``S`` not evidence:
    ``L = CE − λ1·Σ|f ⊙ (G_y ∖ S)| + λ_S·Σ|f ⊙ 1_S|`` with ``f = ReLU_θ(sigmoid(g(x)))``, sums over
    the batch and the filters (as paper A's ``L_MC`` / ``L_nonMC``); ``global_sets`` ``[K, C]`` bool."""
    from ..cfe import thresholded_relu

    sets = np.asarray(global_sets, bool).copy()
    chosen = np.zeros(sets.shape[1], bool)
    chosen[list(filters)] = True
    sets[:, chosen] = False  # S leaves every class's MC set
    sets_t = torch.from_numpy(sets).to(device)
    chosen_t = torch.from_numpy(chosen).to(device)

    def loss_fn(batch) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(batch.logits, batch.labels)
        f = thresholded_relu(torch.sigmoid(batch.pooled), theta)  # [B, C]
        mc = (f * sets_t[batch.labels].to(f.dtype)).abs().sum() * batch.world_size
        suppressed = (f * chosen_t.to(f.dtype)).abs().sum() * batch.world_size
        return weighted_terms(ce, {"mc": (-lambda1, mc), "filters": (lam, suppressed)})

    return loss_fn


def zeroed_channels(model: torch.nn.Module, layer: str, filters: Sequence[int]):
    """A context (:func:`cfdebug.hooks.capture` with an ``edit``) in which the output channels
    ``filters`` of ``model``'s module ``layer`` are zero in every forward pass."""
    from ..hooks import capture

    chosen = list(filters)

    def edit(_name: str, output: torch.Tensor) -> torch.Tensor:
        out = output.clone()
        out[:, chosen] = 0
        return out

    return capture(model, layer, edit=edit)


# ---------------------------------------------------------------------------------- validation
def counterfactual_validation(ws, method: str, region: Region | None, filters: Sequence[int], jitter: float) -> Callable:
    """``evaluate(model)`` for :func:`~cfdebug.training.finetune`: test accuracy (logged), and
    ``val_acc``/``val_loss`` (what model selection reads) on the validation split with the declared
    intervention applied (no pass over the training split: its row shows the running accuracy):

    * a region: it shows a wrong class's content (another validation image's rectangle);
    * filters: they are zeroed at the target layer;
    * appearance: every image colour-jittered (seeded draws).

    The plain validation accuracy is kept as ``plain_val_acc`` (logged, never chosen on).
    """
    from ..training import split_logits

    device = torch.device(ws.device)
    images, labels, _ = split_tensors(ws, "val")
    ts = ws.data.torch_split("val")
    if method in ("region-counterfactual", "region-rrr"):
        cf_images = wrong_class_region(images, labels, images, labels, region, VALIDATION_SEED)
    elif method == "appearance":
        cf_images = jitter_images(images, ts.mean, ts.std, jitter, torch.Generator().manual_seed(VALIDATION_SEED))
    else:
        cf_images = images

    y_val, y_test = ws.data.splits["val"].labels, ws.data.splits["test"].labels

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        scores = {"plain_val_acc": float(np.mean(split_logits(model, ws.data, "val", device).argmax(1) == y_val)),
                  "test_acc": float(np.mean(split_logits(model, ws.data, "test", device).argmax(1) == y_test)) if len(y_test) else float("nan")}
        guard = zeroed_channels(model, ws.target.name, filters) if method in ("filters", "filters-zero") else nullcontext()
        model.eval()
        with torch.inference_mode(), guard:
            logits = torch.cat([model(cf_images[i : i + 256].to(device)).float().cpu() for i in range(0, len(cf_images), 256)])
        scores["val_acc"] = float((logits.argmax(1) == labels).float().mean())
        scores["val_loss"] = float(F.cross_entropy(logits, labels))
        return scores

    return evaluate


def split_tensors(ws, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A whole split as tensors: images ``[N, 3, S, S]`` (normalised), labels ``[N]``, indices ``[N]``."""
    ts = ws.data.torch_split(split)
    loader = torch.utils.data.DataLoader(ts, batch_size=512, shuffle=False)
    images, labels, index = [], [], []
    for x, y, i in loader:
        images.append(x)
        labels.append(y)
        index.append(i)
    if not images:
        raise CfdebugError(f"Expected images in the `{split}` split for counterfactual validation, but it is empty.")
    return torch.cat(images), torch.cat(labels).long(), torch.cat(index)
