"""Paper A's configs: the CFE heads, the global MC filters and misclassification detection."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

from ..errors import CfdebugError
from .checks import check_choice, check_fraction, check_int, check_real

# Detection (cfdebug.detect): the Table-1 rows and the agreement metrics a score can use.
DETECT_ROWS = ("avg_recall", "avg_f1", "recall_cut")
DETECT_METRICS = ("recall", "precision", "f1")


@dataclass(frozen=True)
class CFEConfig:
    """Training of the MC/MI heads (paper A; constants from METHODS.md).

    ``epochs`` and ``batch_size`` are ours (the papers do not give them): 20 epochs of 128 images
    (180 SGD steps) give a keep rate of 100% on the demo and fit in well under one extraction
    pass (the `bench cfe` target); 80 epochs kept the same rate at 4× the time. The loss is a *sum* over the batch, so a larger batch is also a
    larger step. ``lr``/``momentum`` are the reference SGD
    settings; ``sparsity_lambda·sparsity_scale`` weighs ``Σ|m|`` and ``logits_weight`` weighs
    ``−Σ z'_c`` (the paper's "sparsity loss λ = 2" and "logits loss"). ``mask_threshold`` is θ
    of the thresholded ReLU. ``mi_sparsity`` weighs ``Σ|m|`` of the MI heads.
    ``standardise_inputs`` feeds the Dense layers ``g`` standardised with the training mean/std
    (an affine reparametrisation of the same layer; see :class:`~cfdebug.cfe.MCHeads`): without
    it the demo's masks were nearly constant per class and their agreement did not separate
    errors (AUROC ≈ 0.4–0.6 vs ≈ 0.8). ``seed`` fixes the initial weights and the batch order.
    """

    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    momentum: float = 0.9
    sparsity_lambda: float = 2.0
    sparsity_scale: float = 1e-3
    logits_weight: float = 1e-3
    mask_threshold: float = 0.5
    mi_sparsity: float = 1e-3
    standardise_inputs: bool = True
    seed: int = 0

    def __post_init__(self):
        check_int(self.epochs, "epochs")
        check_int(self.batch_size, "batch_size")
        check_real(self.lr, "lr", low=0.0, low_open=True)
        for name in ("sparsity_lambda", "sparsity_scale", "logits_weight", "mi_sparsity"):
            check_real(getattr(self, name), name, low=0.0)
        check_real(self.momentum, "momentum", 0.0, 1.0, high_open=True)
        check_real(self.mask_threshold, "mask_threshold", 0.0, 1.0, high_open=True)


@dataclass(frozen=True)
class MCFilterConfig:
    """Which training images vote for the global MC filters: ``tau`` is the confidence floor
    (``p ≥ tau``); ``cfe`` trains the MC heads that produce ``MC_x``."""

    tau: float = 0.9
    cfe: CFEConfig = field(default_factory=CFEConfig)

    def __post_init__(self):
        check_fraction(self.tau, "tau")


@dataclass(frozen=True)
class DetectConfig:
    """Misclassification detection (defaults: METHODS.md and the paper's Table 1).

    ``skip_threshold``/``freq_threshold`` apply to the "Avg. Recall" and "Avg. F1" rows;
    ``recall_cut`` with ``recall_cut_skip_threshold``/``recall_cut_freq_threshold`` define the
    "Recall < 0.3" row (0 and 0 in the paper). ``fallback_threshold`` replaces a class's mean
    training metric when it has none. ``flag_row`` picks the row whose flags fill the per-image
    ``flagged`` column and drive re-ranking; ``score_metric`` the continuous agreement score.
    ``ablation_class`` ``None`` averages the ablation over every class with a global set.
    """

    skip_threshold: float = 0.9
    freq_threshold: float = 0.15
    recall_cut: float = 0.3
    recall_cut_skip_threshold: float = 0.0
    recall_cut_freq_threshold: float = 0.0
    fallback_threshold: float = 0.3
    flag_row: str = "avg_f1"
    score_metric: str = "f1"
    rerank_top_k: int = 5
    ablation_class: int | None = None
    ablation_top_n: int = 5
    ablation_draws: int = 20
    seed: int = 0
    split: str = "test"
    filters: MCFilterConfig = field(default_factory=MCFilterConfig)

    def __post_init__(self):
        check_fraction(self.skip_threshold, "skip_threshold")
        check_fraction(self.freq_threshold, "freq_threshold", upper_open=True)
        check_fraction(self.recall_cut, "recall_cut")
        check_fraction(self.recall_cut_skip_threshold, "recall_cut_skip_threshold")
        check_fraction(self.recall_cut_freq_threshold, "recall_cut_freq_threshold", upper_open=True)
        check_fraction(self.fallback_threshold, "fallback_threshold")
        check_choice(self.flag_row, "flag_row", DETECT_ROWS)
        check_choice(self.score_metric, "score_metric", DETECT_METRICS)
        for name in ("rerank_top_k", "ablation_top_n", "ablation_draws"):
            check_int(getattr(self, name), name)
        if self.ablation_class is not None and (
            isinstance(self.ablation_class, bool) or not isinstance(self.ablation_class, numbers.Integral) or self.ablation_class < 0
        ):
            raise CfdebugError(f"Expected `ablation_class` to be None or a class index >= 0, but got {self.ablation_class!r}.")
