"""Plain classifier training on the engine: the demo model, trained from scratch on a dataset.

Adam on cross-entropy; one seeded generator draws the batch order, continuing across epochs;
the epoch with the best validation accuracy is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig
from ..data import DataBundle
from ..runtime import Progress, seed_everything
from .engine import Stage, StepOutput, run_epochs
from .predictions import SPLITS, loader, predict_logits

__all__ = ["TrainResult", "train_classifier"]


@dataclass
class TrainResult:
    """The kept weights (best validation epoch), per-epoch history and final accuracies."""

    state_dict: dict
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    accuracy: dict[str, float] = field(default_factory=dict)


def _classifier_scores(model: nn.Module, bundle: DataBundle, device) -> dict[str, float]:
    """Validation accuracy and loss, test accuracy (eval mode). The validation loader draws its
    base seed from the global RNG (the demo model's weights depend on that stream); the test
    pass draws from a private generator, so logging it changes nothing."""
    val = predict_logits(model, bundle, "val", device)
    test = predict_logits(model, bundle, "test", device, generator=torch.Generator())
    y_val = bundle.splits["val"].labels
    return {
        "val_acc": float((val.argmax(1) == y_val).mean()),
        "test_acc": float((test.argmax(1) == bundle.splits["test"].labels).mean()) if len(test) else float("nan"),
        "val_loss": float(F.cross_entropy(torch.from_numpy(val), torch.from_numpy(y_val).long())),
    }


def train_classifier(model: nn.Module, bundle: DataBundle, config: TrainConfig, device: torch.device, progress: Progress | None = None) -> TrainResult:
    """Train ``model`` with Adam on cross-entropy; keep the epoch with the best val accuracy.

    One seeded generator draws the batch order, continuing across epochs; ``train_acc`` in the
    history is the running accuracy over the epoch's batches (train mode). Ties in validation
    accuracy go to the earlier epoch.
    """
    config = config.for_dataset(bundle.name)  # a bare TrainConfig; a WorkspaceConfig has resolved it already
    generator = seed_everything(config.seed)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    train_loader = loader(bundle, "train", config.batch_size, shuffle=True, generator=generator)

    def step(batch, epoch: int, index: int) -> StepOutput:
        x, y = batch[0].to(device), batch[1].to(device)
        logits = model(x)
        ce = F.cross_entropy(logits, y)
        return StepOutput({"loss": ce, "ce": ce}, len(y), (logits.argmax(1) == y).sum().item())

    stage = Stage(
        name="training", model=model, optimizer=optimizer, batches=lambda epoch: train_loader, step=step,
        evaluate=lambda: _classifier_scores(model, bundle, device), generator=generator, term_mean="sample",
        advice="Lower `--lr` and train again.",
    )
    run = run_epochs(stage, config.epochs, progress=progress)
    model.load_state_dict(run.best_state)
    model.eval()
    accuracy = {
        split: float((predict_logits(model, bundle, split, device).argmax(1) == bundle.splits[split].labels).mean())
        for split in SPLITS
    }
    return TrainResult(state_dict=run.best_state, history=run.history, best_epoch=run.best_epoch, accuracy=accuracy)

