"""Model treatment (paper A §4.3, eq. 4–8): the losses, the global sets, the runs and Table 2–3.

Treatment fine-tunes the classifier so that, for an image of true class ``y``, the filters of
the class's global MC set ``G_y`` fire and the others stay quiet::

    f = ReLU_θ(sigmoid(g(x)))                      # eq. 5, θ = 0.5, g(x) = GAP of the target map
    L = CE − λ1·Σ|f ⊙ G_y| + λ2·Σ|(1 − G_y) ⊙ f|   # eq. 8 with eq. 4 and 6 (sums over batch, filters)

Eq. 4 defines ``L_MC`` with a leading minus and eq. 8 subtracts ``λ1·L_MC`` again; read
literally that would *discourage* MC filters, against the text ("encourage MC filters
activation"). We follow METHODS.md: the MC term is rewarded (``−λ1·mc``).

The **control** is the identical run with ``λ1 = λ2 = 0`` (the "fine-tuned" row of Table 2):
same seed, same data order, same dropout masks, so any difference is the two extra terms.
Model selection picks the epoch with the best *validation* accuracy (a split carved from the
training set); the test split is evaluated every epoch and reported, never used to choose.

The runs train on the engine's :func:`cfdebug.training.finetune` (partial unfreezing,
checkpoints, exact resume, divergence and cancel handling, progress to the run registry, and
data parallelism under ``torchrun``): this module supplies the loss.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import OPTIMIZER_CHOICES, TRAINABLE_CHOICES, FinetuneConfig, TreatmentConfig, TreatmentSchedule, check_sweep_schedule, config_dict
from .distributed import barrier, get_rank
from .errors import CfdebugError
from .cfe import thresholded_relu
from .mcfilters import global_mc_filters, treatment_sets
from .metrics import per_class_recall, prediction_churn
from .runtime import Progress, scaled_progress
from .store import stable_hash, torch_save_atomic
from .training import FinetuneBatch, finetune, split_logits, weighted_terms

__all__ = [
    "TRAINABLE_CHOICES",
    "OPTIMIZER_CHOICES",
    "FinetuneConfig",
    "TreatmentConfig",
    "TreatmentSchedule",
    "MODEL_NAME",
    "thresholded_relu",
    "treatment_loss",
    "check_global_sets",
    "training_sets",
    "control_config",
    "run_treatment",
    "treatment_sweep",
    "table3",
    "flagged_churn",
    "sweep_run_dir",
]


MODEL_NAME = "model.pt"
_SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------------------------- configs
def control_config(config: TreatmentConfig) -> TreatmentConfig:
    """The control run of ``config``: identical, with ``lambda1 = lambda2 = 0``."""
    return replace(config, lambda1=0.0, lambda2=0.0)


# ---------------------------------------------------------------------------------- the loss
def treatment_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    pooled: torch.Tensor,
    global_sets_rows: torch.Tensor,
    lambda1: float,
    lambda2: float,
    theta: float = 0.5,
    world_size: int = 1,
) -> dict[str, torch.Tensor]:
    """Eq. 8: ``L = CE − λ1·Σ|f ⊙ G_y| + λ2·Σ|(1 − G_y) ⊙ f|`` with ``f = ReLU_θ(sigmoid(pooled))``.

    Args:
        logits: ``[B, K]`` float, the classifier's logits.
        labels: ``[B]`` int64 true classes in ``0..K-1``.
        pooled: ``[B, C]`` float, ``g(x)`` (global-average-pooled target map, before dropout).
        global_sets_rows: ``[B, C]`` bool or 0/1 float, ``G_y`` of each sample's *true* class.
        lambda1, lambda2: the weights, in ``[0, 1]``.
        theta: the thresholded-ReLU threshold on ``sigmoid(pooled)``.
        world_size: under DDP, the number of processes when the inputs are one process's shard
            of the global batch: ``mc`` and ``non_mc`` (batch sums) are multiplied by it, so their
            mean over the processes (as DDP averages gradients) is the global batch's sum.

    Returns:
        ``{"loss", "ce", "mc", "non_mc", "w_mc", "w_non_mc", "share_mc", "share_non_mc"}`` 0-d tensors
        (:func:`~cfdebug.training.weighted_terms`: the weighted terms and their shares of the loss). ``ce`` is the *batch mean*
        cross-entropy (as usual); ``mc = Σ_b Σ_k |f ⊙ G_y|`` and ``non_mc = Σ_b Σ_k |(1 − G_y) ⊙
        f|`` are *sums* over the batch and the filters, unweighted (so they grow with the batch
        size; the λs are relative to that). ``loss = ce − lambda1·mc + lambda2·non_mc``.
    """
    if logits.dim() != 2 or labels.shape != (logits.shape[0],):
        raise CfdebugError(
            f"Expected `logits` [B, K] and `labels` [B], but got {tuple(logits.shape)} and {tuple(labels.shape)}."
        )
    if pooled.dim() != 2 or pooled.shape[0] != logits.shape[0] or global_sets_rows.shape != pooled.shape:
        raise CfdebugError(
            f"Expected `pooled` and `global_sets_rows` of shape [B, C] with B = {logits.shape[0]}, but got "
            f"{tuple(pooled.shape)} and {tuple(global_sets_rows.shape)}."
        )
    ce = F.cross_entropy(logits, labels)
    f = thresholded_relu(torch.sigmoid(pooled), theta)  # [B, C] in {0} ∪ (θ, 1)
    g_y = global_sets_rows.to(f.dtype)
    mc = (f * g_y).abs().sum()
    non_mc = ((1.0 - g_y) * f).abs().sum()
    if world_size != 1:
        mc, non_mc = mc * world_size, non_mc * world_size
    return weighted_terms(ce, {"mc": (-lambda1, mc), "non_mc": (lambda2, non_mc)})


def training_sets(workspace, progress: Progress | None = None) -> np.ndarray:
    """The global MC sets treatment trains with: ``[K, C]`` bool, ``G_y = h_y > 0``
    (:func:`~cfdebug.mcfilters.treatment_sets`), from the workspace's global MC filters (default
    :class:`~cfdebug.config.MCFilterConfig`)."""
    return treatment_sets(global_mc_filters(workspace, progress=progress).histogram)


def check_global_sets(global_sets: Any, num_classes: int, channels: int) -> np.ndarray:
    """Validate the global MC sets and binarise a histogram as treatment does
    (:func:`~cfdebug.mcfilters.treatment_sets`: ``h_y > 0``).

    Args:
        global_sets: ``[K, C]`` bool sets, or the histogram ``h`` [K, C] (non-negative numbers).

    Returns:
        ``[K, C]`` bool.
    """
    try:
        arr = np.asarray(global_sets)
    except Exception as exc:  # ragged lists and the like
        raise CfdebugError(f"Expected `global_sets` to be a [K, C] array, but could not read it: {exc}.") from None
    if arr.shape != (num_classes, channels):
        raise CfdebugError(
            f"Expected `global_sets` to have shape [K, C] = [{num_classes}, {channels}] (classes × target "
            f"filters), but got {list(arr.shape)}. Compute the global MC filters for this model, dataset "
            "and target layer."
        )
    if arr.dtype != bool:
        if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise CfdebugError(
                "Expected `global_sets` to be bool, or a non-negative finite histogram, but got "
                f"dtype {arr.dtype} with negative or non-finite values."
            )
    return treatment_sets(arr)


# ---------------------------------------------------------------------------------- treatment
def table3(recall_before: np.ndarray, recall_after: np.ndarray, classes: Sequence[str], n: int = 3) -> dict:
    """Paper A Table 3: the ``n`` classes whose recall improved most and the ``n`` that worsened most.

    Only classes with a strictly positive (negative) change are listed, so fewer than ``n``
    rows appear when fewer classes changed; classes without test images (NaN recall) are skipped.
    Rows: ``{"class", "class_index", "original_recall", "treated_recall", "change"}``.
    """
    before, after = np.asarray(recall_before, float), np.asarray(recall_after, float)
    change = after - before
    valid = np.nonzero(np.isfinite(change))[0]
    # Stable sort on the change, ties by class index.
    up = [i for i in valid[np.argsort(-change[valid], kind="stable")] if change[i] > 0][:n]
    down = [i for i in valid[np.argsort(change[valid], kind="stable")] if change[i] < 0][:n]

    def row(i):
        return {
            "class": classes[i],
            "class_index": int(i),
            "original_recall": float(before[i]),
            "treated_recall": float(after[i]),
            "change": float(change[i]),
        }

    return {"improved": [row(i) for i in up], "worsened": [row(i) for i in down]}


def _base_predictions(workspace) -> dict[str, np.ndarray]:
    """Base-model predictions [N] per split (sharded over the processes under DDP)."""
    return {s: split_logits(workspace.model, workspace.data, s, torch.device(workspace.device)).argmax(1) for s in _SPLITS}


def run_treatment(
    workspace,
    config: TreatmentConfig,
    global_sets: Any,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    registry=None,
    run_id: str | None = None,
    progress: Progress | None = None,
    base: dict | None = None,
) -> dict:
    """Treat ``workspace.model`` (a copy) with eq. 8 and report the paper's Tables 2–3 inputs.

    Args:
        workspace: see :func:`cfdebug.training.finetune`.
        config: :class:`TreatmentConfig` (defaults from METHODS.md). The control is
            ``control_config(config)`` (λ1 = λ2 = 0).
        global_sets: ``[K, C]`` bool global MC sets (or the histogram ``h``; binarised ``> 0``);
            row ``y`` is ``G_y`` of true class ``y``.
        run_dir: checkpoints go here, and the treated weights as ``model.pt`` (atomic; rank 0 only
            under DDP).
        resume, registry, run_id, progress: as in :func:`cfdebug.training.finetune` (under DDP
            every process calls this with the same arguments and gets the same result).
        base: precomputed base predictions ``{"train"|"val"|"test": [N] int}`` (saves a pass).

    Returns:
        A dict: ``config``; ``base_accuracy`` / ``accuracy`` ``{"train","val","test"}`` (before /
        the selected epoch); ``best_epoch``; ``history`` (per-epoch rows, see
        :func:`cfdebug.training.run_epochs`);
        ``per_class_recall_before`` / ``_after`` [K] on test (NaN for a class without test images);
        ``table3`` (:func:`table3`); ``confusion_delta`` [K, K] int64 (after − before, test, rows
        true class); ``churn`` on test ``{"fixed", "broken"}`` (wrong→right, right→wrong counts);
        ``test_predictions`` / ``base_test_predictions`` (the selected / the base model's test
        predictions, [N] int as lists, so a view needs no prediction pass of its own);
        ``empty_global_sets`` (classes whose ``G_y`` is empty: only the λ2 term acts on them);
        ``trainable``; ``resumed_from``; ``seconds_per_epoch`` (mean training time);
        ``world_size`` (data-parallel processes, 1 without DDP);
        ``state_dict`` (CPU tensors; drop it before JSON). Everything but ``state_dict`` is
        JSON-serialisable via the run registry's encoder (NumPy arrays become lists).
    """
    if not isinstance(config, TreatmentConfig):
        raise CfdebugError(f"Expected a TreatmentConfig, but got {type(config).__name__}.")
    bundle, target = workspace.data, workspace.target
    sets = check_global_sets(global_sets, bundle.num_classes, target.channels)
    device = torch.device(workspace.device)
    sets_t = torch.from_numpy(sets).to(device)  # [K, C] bool

    def loss_fn(batch: FinetuneBatch) -> dict[str, torch.Tensor]:
        rows = sets_t[batch.labels]  # [B, C] G_y of each true class
        return treatment_loss(
            batch.logits, batch.labels, batch.pooled, rows, config.lambda1, config.lambda2, config.theta, world_size=batch.world_size
        )

    result = finetune(
        workspace,
        config,
        loss_fn=loss_fn,
        run_dir=run_dir,
        resume=resume,
        fingerprint={"global_sets": stable_hash(np.packbits(sets).tolist(), list(sets.shape))},
        registry=registry,
        run_id=run_id,
        progress=progress,
        tag={"lambda1": config.lambda1, "lambda2": config.lambda2, "seed": config.seed},
    )
    before = base or _base_predictions(workspace)
    after_test = split_logits(result.model, bundle, "test", device).argmax(1)
    out = {"config": config_dict(config), **_treatment_report(bundle, sets, result, before, after_test)}
    if run_dir is not None and get_rank() == 0:
        torch_save_atomic(result.state_dict, Path(run_dir) / MODEL_NAME)
    barrier()  # under DDP: model.pt is on disk before any process returns
    return out


def _treatment_report(bundle, sets: np.ndarray, result, before: dict, after_test: np.ndarray) -> dict:
    """:func:`run_treatment`'s result (all but ``config``) from the fine-tuning ``result``, the
    base predictions ``before`` and the selected model's test predictions ``after_test`` [N]."""
    y_test, k = bundle.splits["test"].labels, bundle.num_classes
    recall_before = per_class_recall(before["test"], y_test, k)
    recall_after = per_class_recall(after_test, y_test, k)
    churn = prediction_churn(before["test"], after_test, y_test, k)
    return {
        "base_accuracy": {s: float(np.mean(before[s] == bundle.splits[s].labels)) for s in _SPLITS},
        "accuracy": dict(result.accuracy),
        "best_epoch": result.best_epoch,
        "history": result.history,
        "per_class_recall_before": recall_before,
        "per_class_recall_after": recall_after,
        "table3": table3(recall_before, recall_after, bundle.classes),
        "confusion_delta": churn["confusion_delta"],
        "churn": {"fixed": int(churn["fixed"].size), "broken": int(churn["broken"].size)},
        "test_predictions": [int(v) for v in after_test],
        "base_test_predictions": [int(v) for v in before["test"]],
        "empty_global_sets": [int(i) for i in np.nonzero(~sets.any(axis=1))[0]],
        "trainable": result.trainable,
        "trainable_parameters": result.trainable_parameters,
        "resumed_from": result.resumed_from,
        "seconds_per_epoch": float(np.mean([r["train_seconds"] for r in result.history])),
        "world_size": result.world_size,
        "state_dict": result.state_dict,
    }


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def sweep_run_dir(run_dir: str | Path, kind: str, lambda1: float, lambda2: float, seed: int) -> Path:
    """The folder of one run of :func:`treatment_sweep` (``kind`` is "treatment" or
    "fine-tuned"): its checkpoints and, when finished, ``model.pt``."""
    return Path(run_dir) / f"{kind}-l1_{lambda1:g}-l2_{lambda2:g}-seed_{seed}"


def treatment_sweep(
    workspace,
    lambdas1: Sequence[float],
    lambdas2: Sequence[float],
    seeds: Sequence[int],
    global_sets: Any,
    progress: Progress | None = None,
    *,
    schedule: TreatmentSchedule | None = None,
    run_dir: str | Path | None = None,
    registry=None,
    run_id: str | None = None,
) -> dict:
    """Table 2: every (λ1, λ2) in ``lambdas1 × lambdas2`` and the control, for each seed.

    ``schedule`` is what every run shares (default :class:`TreatmentSchedule`; its ``seed`` is
    replaced by each of ``seeds``); the grids alone hold the loss weights, and each run's
    :class:`TreatmentConfig` is ``schedule.with_lambdas(λ1, λ2, seed)``. With ``run_dir`` each run
    checkpoints in its own sub-folder and the sweep resumes where it stopped (finished runs are
    read back from their checkpoints). Under DDP every process calls it with the same arguments
    (see :func:`cfdebug.training.finetune`).

    Returns:
        ``{"base": {"train_acc","val_acc","test_acc","per_class_recall"}, "control": [per seed
        run], "runs": [per (λ1, λ2, seed) run], "table2": rows, "table3": …, "best": {"lambda1",
        "lambda2"}}``. A run is ``{"lambda1","lambda2","seed","train_acc","val_acc","test_acc",
        "best_epoch","per_class_recall","test_predictions","history"}`` (``test_predictions``: [N]
        int, the selected epoch's, so verdicts pair the runs over test images). ``table2`` rows are ``{"model": "base" |
        "fine-tuned" | "treatment", "lambda1", "lambda2", "n_seeds", "<split>_acc_mean",
        "<split>_acc_std"}`` (sample std, ddof = 1; 0 for one seed). ``table3`` compares the base
        per-class test recall with the *mean over seeds* of the best pair's (best = highest mean
        validation accuracy; never test).
    """
    configs = _sweep_configs(check_sweep_schedule(schedule or TreatmentSchedule()), list(lambdas1), list(lambdas2), list(seeds))
    bundle, k = workspace.data, workspace.data.num_classes
    check_global_sets(global_sets, k, workspace.target.channels)
    before = _base_predictions(workspace)
    base = {f"{s}_acc": float(np.mean(before[s] == bundle.splits[s].labels)) for s in _SPLITS}
    base["per_class_recall"] = per_class_recall(before["test"], bundle.splits["test"].labels, k)

    control, runs = [], []
    for i, (kind, cfg) in enumerate(configs):
        sub = sweep_run_dir(run_dir, kind, cfg.lambda1, cfg.lambda2, cfg.seed) if run_dir is not None else None
        label = f"run {i + 1}/{len(configs)} ({kind}, λ1={cfg.lambda1:g}, λ2={cfg.lambda2:g}, seed {cfg.seed}): "
        out = run_treatment(
            workspace, cfg, global_sets, run_dir=sub, resume=sub is not None, registry=registry, run_id=run_id,
            progress=scaled_progress(progress, i / len(configs), (i + 1) / len(configs), label), base=before,
        )
        record = {
            "lambda1": cfg.lambda1,
            "lambda2": cfg.lambda2,
            "seed": cfg.seed,
            "train_acc": out["accuracy"]["train"],
            "val_acc": out["accuracy"]["val"],
            "test_acc": out["accuracy"]["test"],
            "best_epoch": out["best_epoch"],
            "per_class_recall": out["per_class_recall_after"],
            "test_predictions": out["test_predictions"],
            "history": out["history"],
        }
        (control if kind == "fine-tuned" else runs).append(record)
    return {"base": base, "control": control, "runs": runs, **_sweep_tables(base, control, runs, bundle.classes)}


def _sweep_configs(schedule: TreatmentSchedule, lambdas1: list, lambdas2: list, seeds: list) -> list[tuple[str, TreatmentConfig]]:
    """``(kind, config)`` of every run of a sweep, per seed the control first."""
    for name, values in (("lambdas1", lambdas1), ("lambdas2", lambdas2), ("seeds", seeds)):
        if not values:
            raise CfdebugError(f"Expected `{name}` to hold at least one value, but it is empty.")
    configs = []
    for seed in seeds:
        configs.append(("fine-tuned", schedule.with_lambdas(0.0, 0.0, seed)))
        for l1, l2 in itertools.product(lambdas1, lambdas2):
            configs.append(("treatment", schedule.with_lambdas(l1, l2, seed)))
    return configs


def _sweep_tables(base: dict, control: list[dict], runs: list[dict], classes: Sequence[str]) -> dict:
    """Table 2 (mean ± std over seeds), the best (λ1, λ2) by mean validation accuracy, Table 3."""

    def summary(model: str, items: list[dict], l1, l2) -> dict:
        row = {"model": model, "lambda1": l1, "lambda2": l2, "n_seeds": len(items)}
        for s in _SPLITS:
            row[f"{s}_acc_mean"], row[f"{s}_acc_std"] = _mean_std([r[f"{s}_acc"] for r in items])
        return row

    table2 = [summary("base", [base], None, None), summary("fine-tuned", control, 0.0, 0.0)]
    groups = {}
    for r in runs:
        groups.setdefault((r["lambda1"], r["lambda2"]), []).append(r)
    for (l1, l2), items in groups.items():
        table2.append(summary("treatment", items, l1, l2))
    treat_rows = [r for r in table2 if r["model"] == "treatment"]
    best_row = max(treat_rows, key=lambda r: r["val_acc_mean"])  # first on ties: max() keeps the first
    best_items = groups[(best_row["lambda1"], best_row["lambda2"])]
    mean_recall = np.mean([r["per_class_recall"] for r in best_items], axis=0)
    return {
        "table2": table2,
        "best": {"lambda1": best_row["lambda1"], "lambda2": best_row["lambda2"]},
        "table3": table3(base["per_class_recall"], mean_recall, classes),
    }


def flagged_churn(before: dict, after: dict) -> dict:
    """How treatment changed the flagged set: two :func:`cfdebug.detect.run_detection` results
    on the same split, for the base model (``before``) and the treated one (``after``, detection
    recomputed on it: its own CFE heads and global filters).

    The images' ``true``/``predicted`` classes give the fixed and the new errors
    (:func:`~cfdebug.metrics.prediction_churn`), their ``flagged`` columns which were flagged.
    Returns counts: ``flagged_errors_before`` (flagged predictions that were wrong),
    ``flagged_errors_fixed`` (of those, now correct), ``new_errors`` (correct before, wrong after),
    ``new_errors_flagged`` (of those, flagged by the treated model's detection),
    ``flagged_before``/``flagged_after``, and the ids of the fixed and newly wrong images.
    """
    b, a = before["images"], after["images"]
    if [r["id"] for r in b] != [r["id"] for r in a]:
        raise CfdebugError("Expected two detection results on the same images, but their image ids differ.")
    labels = np.asarray([r["true"] for r in b], dtype=np.int64)  # [N]
    pred_b, pred_a = (np.asarray([r["predicted"] for r in rows], dtype=np.int64) for rows in (b, a))  # [N] each
    flagged_b, flagged_a = (np.asarray([r["flagged"] for r in rows], dtype=bool) for rows in (b, a))  # [N] each
    n_classes = 1 + int(np.concatenate([labels, pred_b, pred_a, [0]]).max())  # any K that holds them: only fixed/broken are used
    churn = prediction_churn(pred_b, pred_a, labels, n_classes)
    fixed = churn["fixed"][flagged_b[churn["fixed"]]]  # flagged errors that are now right
    return {
        "flagged_errors_before": int(np.sum(flagged_b & (pred_b != labels))),
        "flagged_errors_fixed": int(fixed.size),
        "new_errors": int(churn["broken"].size),
        "new_errors_flagged": int(np.sum(flagged_a[churn["broken"]])),
        "flagged_before": int(flagged_b.sum()),
        "flagged_after": int(flagged_a.sum()),
        "fixed_ids": [b[i]["id"] for i in fixed],
        "new_error_ids": [b[i]["id"] for i in churn["broken"]],
    }
