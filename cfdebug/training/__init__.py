"""Training: the one engine (:func:`run_epochs` over a :class:`Stage`) and the stages on it.

* :mod:`.engine`: the epoch loop, history rows, divergence check, cancel hook, progress, model
  selection, DDP; :mod:`.checkpoints`: checkpoint files, RNG state, exact resume.
* :mod:`.classifier`: plain classifier training (:func:`train_classifier`, the demo model).
* :mod:`.finetuning`: fine-tuning a workspace's model with a loss (:func:`finetune`: treatment,
  its CE control, XCR retraining), its DDP sharding.
* :mod:`.predictions`: logits over a split and the splits' accuracies, which the stages evaluate with.

The XCR selector (:mod:`cfdebug.xcr.selector`) and the CFE heads (:mod:`cfdebug.cfe.fitting`)
are stages too; they live with what they train.
"""

from .checkpoints import CHECKPOINT_NAME, cpu_state
from .classifier import TrainResult, train_classifier
from .engine import BATCH_REPORT_S, HISTORY_KEYS, UNEVALUATED_HISTORY_KEYS, EngineResult, Stage, StepOutput, run_epochs
from .finetuning import FinetuneBatch, FinetuneResult, cross_entropy_loss, finetune, trainable_modules, weighted_terms
from .predictions import evaluate_splits, loader, predict_logits, split_logits

__all__ = [
    "HISTORY_KEYS",
    "UNEVALUATED_HISTORY_KEYS",
    "BATCH_REPORT_S",
    "CHECKPOINT_NAME",
    "loader",
    "predict_logits",
    "split_logits",
    "evaluate_splits",
    "StepOutput",
    "Stage",
    "EngineResult",
    "run_epochs",
    "cpu_state",
    "TrainResult",
    "train_classifier",
    "FinetuneBatch",
    "FinetuneResult",
    "cross_entropy_loss",
    "weighted_terms",
    "trainable_modules",
    "finetune",
]
