"""Plain cross-entropy training and evaluation of a classifier.

Used to train the demo CNN (and a user model from scratch with ``cfdebug train``). The epoch
with the best validation accuracy is kept; the test split is only ever evaluated, never used
to choose anything.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .data import DataBundle
from .errors import CfdebugError
from .runtime import Progress, seed_everything



def loader(bundle: DataBundle, split: str, batch_size: int, *, shuffle: bool = False, generator=None, num_workers: int = 0):
    """A DataLoader over ``bundle``'s ``split`` yielding ``(images, labels, indices)``."""
    return torch.utils.data.DataLoader(
        bundle.torch_split(split), batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers
    )


@torch.no_grad()
def predict_logits(model: nn.Module, bundle: DataBundle, split: str, device: torch.device, batch_size: int = 256) -> np.ndarray:
    """Logits ``[N, K]`` float32 of ``model`` on ``split`` in dataset order."""
    model.eval()
    out = [model(x.to(device)).float().cpu() for x, _, _ in loader(bundle, split, batch_size)]
    return torch.cat(out).numpy()


@dataclass
class TrainResult:
    """The kept weights (best validation epoch), per-epoch history and final accuracies."""

    state_dict: dict
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    accuracy: dict[str, float] = field(default_factory=dict)


def train_classifier(model: nn.Module, bundle: DataBundle, config: TrainConfig, device: torch.device, progress: Progress | None = None) -> TrainResult:
    """Train ``model`` with Adam on cross-entropy; keep the epoch with the best val accuracy."""
    if config.epochs <= 0:
        raise CfdebugError(f"Expected `--epochs` to be a positive integer, but got {config.epochs}.")
    if not config.lr > 0:
        raise CfdebugError(f"Expected `--lr` to be positive, but got {config.lr}.")
    generator = seed_everything(config.seed)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    labels = {s: bundle.splits[s].labels for s in ("val",)}
    best_acc, best_state, best_epoch, history = -1.0, None, 0, []
    train_loader = loader(bundle, "train", config.batch_size, shuffle=True, generator=generator)
    for epoch in range(1, config.epochs + 1):
        model.train()
        total, correct, loss_sum = 0, 0, 0.0
        for x, y, _ in train_loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if not math.isfinite(loss.item()):
                raise CfdebugError(f"Training diverged at epoch {epoch}: the loss is {loss.item()}. Lower `--lr`.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            total += len(y)
        val_acc = float((predict_logits(model, bundle, "val", device).argmax(1) == labels["val"]).mean())
        row = {"epoch": epoch, "train_loss": loss_sum / total, "train_acc": correct / total, "val_acc": val_acc}
        history.append(row)
        if val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        if progress:
            progress(epoch / config.epochs, f"epoch {epoch}/{config.epochs}: loss {row['train_loss']:.3f}, train acc {row['train_acc']:.3f}, val acc {val_acc:.3f}")
    model.load_state_dict(best_state)
    model.eval()
    accuracy = {
        split: float((predict_logits(model, bundle, split, device).argmax(1) == bundle.splits[split].labels).mean())
        for split in ("train", "val", "test")
    }
    return TrainResult(state_dict=best_state, history=history, best_epoch=best_epoch, accuracy=accuracy)
