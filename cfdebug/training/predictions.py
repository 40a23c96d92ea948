"""A model's logits over a dataset split, and the eval-mode accuracies of every split.

The stages evaluate through these (the classifier and fine-tuning stages, treatment, XCR); under
``torchrun`` :func:`split_logits` and :func:`evaluate_splits` shard the split over the processes
and gather the result, so every process gets the same numbers.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import DataBundle
from ..distributed import all_gather_object, get_rank, get_world_size, is_distributed

__all__ = ["SPLITS", "loader", "predict_logits", "split_logits", "evaluate_splits"]

#: The splits every stage evaluates, in this order.
SPLITS = ("train", "val", "test")


def loader(bundle: DataBundle, split: str, batch_size: int, *, shuffle: bool = False, generator=None, num_workers: int = 0):
    """A DataLoader over ``bundle``'s ``split`` yielding ``(images, labels, indices)``."""
    return torch.utils.data.DataLoader(
        bundle.torch_split(split), batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers
    )


@torch.no_grad()
def predict_logits(
    model: nn.Module, bundle: DataBundle, split: str, device: torch.device, batch_size: int = 256, *, generator: torch.Generator | None = None
) -> np.ndarray:
    """Logits ``[N, K]`` float32 of ``model`` on ``split`` in dataset order.

    Without ``generator`` the loader draws its base seed from the global torch RNG (one draw);
    with one it draws from it instead, leaving the global streams as they were.
    """
    model.eval()
    out = [model(x.to(device)).float().cpu() for x, _, _ in loader(bundle, split, batch_size, generator=generator)]
    return torch.cat(out).numpy() if out else np.zeros((0, bundle.num_classes), np.float32)


def _shard_range(n: int, rank: int, world: int) -> np.ndarray:
    """Process ``rank``'s contiguous share of ``0..n-1`` (sizes differ by at most one)."""
    return np.array_split(np.arange(n), world)[rank]


def split_logits(model: nn.Module, bundle, split: str, device, batch_size: int = 256) -> np.ndarray:
    """Logits ``[N, K]`` float32 of ``split`` in dataset order; under DDP each process predicts a
    contiguous share and the shares are gathered, so every process gets the same array."""
    if not is_distributed():
        return predict_logits(model, bundle, split, device, batch_size)
    share = _shard_range(len(bundle.splits[split]), get_rank(), get_world_size())
    model.eval()
    # One loader without a generator per split, exactly like predict_logits: its base seed is
    # drawn from the global RNG, so the RNG streams stay those of the single-process run.
    data = torch.utils.data.DataLoader(torch.utils.data.Subset(bundle.torch_split(split), share.tolist()), batch_size=batch_size)
    with torch.no_grad():
        parts = [model(x.to(device)).float().cpu() for x, _, _ in data]
    local = torch.cat(parts).numpy() if parts else None
    gathered = [p for p in all_gather_object(local) if p is not None]
    return np.concatenate(gathered) if gathered else np.zeros((0, 0), np.float32)


def evaluate_splits(model: nn.Module, bundle, device) -> dict[str, float]:
    """Eval-mode ``{"train_acc", "val_acc", "test_acc", "val_loss"}`` (accuracies on the whole
    splits, NaN for an empty one; ``val_loss`` the mean validation cross-entropy). Sharded over
    the processes under DDP; the same numbers on every process."""
    logits = {s: split_logits(model, bundle, s, device) for s in SPLITS}
    out = {
        f"{s}_acc": float(np.mean(logits[s].argmax(1) == bundle.splits[s].labels)) if len(logits[s]) else float("nan")
        for s in SPLITS
    }
    out["val_loss"] = float(F.cross_entropy(torch.from_numpy(logits["val"]), torch.from_numpy(bundle.splits["val"].labels).long()))
    return out

