"""Model treatment (paper A §4.3, eq. 4–8) and the resumable fine-tuning loop behind it.

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

:func:`finetune` is the generic loop (XCR's counterfactual retraining reuses it through
``loss_fn`` and ``batch_transform``): partial unfreezing, SGD (or Adam), per-epoch checkpoints
written atomically, exact resume, divergence and cancel handling, progress to the run registry.

Under ``torchrun`` (a ``torch.distributed`` process group of N > 1, see
:func:`cfdebug.distributed.init_distributed`) the same functions train data-parallel with
``DistributedDataParallel``: every process calls them with the same arguments, each trains on
a 1/N share of every global batch (the global batch stays ``batch_size``), and all return the
same result; rank 0 alone writes checkpoints, ``model.pt``, progress and registry rows.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import OPTIMIZER_CHOICES, TRAINABLE_CHOICES, FinetuneConfig, TreatmentConfig, check_schedule, config_dict
from .distributed import (
    all_gather_object,
    all_reduce_sum,
    barrier,
    broadcast_object,
    get_rank,
    get_world_size,
    global_batchnorm,
    is_distributed,
    wrap_ddp,
)
from .errors import CfdebugError
from .cfe import thresholded_relu
from .hooks import capture
from .metrics import confusion_matrix, per_class_recall
from .runtime import Progress, seed_everything
from .store import stable_hash, torch_save_atomic
from .training import loader, predict_logits

__all__ = [
    "TRAINABLE_CHOICES",
    "OPTIMIZER_CHOICES",
    "FinetuneConfig",
    "TreatmentConfig",
    "FinetuneBatch",
    "FinetuneResult",
    "thresholded_relu",
    "treatment_loss",
    "cross_entropy_loss",
    "check_global_sets",
    "control_config",
    "trainable_modules",
    "finetune",
    "run_treatment",
    "treatment_sweep",
    "table3",
]


CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.pt"
_CHECKPOINT_FORMAT = 1
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
) -> dict[str, torch.Tensor]:
    """Eq. 8: ``L = CE − λ1·Σ|f ⊙ G_y| + λ2·Σ|(1 − G_y) ⊙ f|`` with ``f = ReLU_θ(sigmoid(pooled))``.

    Args:
        logits: ``[B, K]`` float, the classifier's logits.
        labels: ``[B]`` int64 true classes in ``0..K-1``.
        pooled: ``[B, C]`` float, ``g(x)`` (global-average-pooled target map, before dropout).
        global_sets_rows: ``[B, C]`` bool or 0/1 float, ``G_y`` of each sample's *true* class.
        lambda1, lambda2: the weights, in ``[0, 1]``.
        theta: the thresholded-ReLU threshold on ``sigmoid(pooled)``.

    Returns:
        ``{"loss", "ce", "mc", "non_mc"}`` 0-d tensors. ``ce`` is the *batch mean*
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
    return {"loss": ce - lambda1 * mc + lambda2 * non_mc, "ce": ce, "mc": mc, "non_mc": non_mc}


def cross_entropy_loss(batch: "FinetuneBatch") -> dict[str, torch.Tensor]:
    """The default ``loss_fn`` of :func:`finetune`: plain batch-mean cross-entropy."""
    ce = F.cross_entropy(batch.logits, batch.labels)
    return {"loss": ce, "ce": ce}


def check_global_sets(global_sets: Any, num_classes: int, channels: int) -> np.ndarray:
    """Validate the global MC sets and binarise them (``> 0``, as METHODS says for ``h_y``).

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
    return arr > 0


# ---------------------------------------------------------------------------------- the loop
@dataclass
class FinetuneBatch:
    """What a ``loss_fn`` sees for one training batch.

    ``images`` [B, 3, S, S], ``labels`` [B] int64, ``indices`` [B] int64 (dataset indices of the
    *original* batch; ``batch_transform`` may make ``images``/``labels`` longer), ``logits``
    [B, K], ``pooled`` ``g(x)`` [B, C] before dropout (with its graph), ``epoch`` (1-based),
    ``step`` (0-based batch index in the epoch).

    Under DDP (:func:`finetune`) the tensors are this process's shard (``rank`` of
    ``world_size``) of the global batch, and the returned terms are averaged over the processes
    (gradients by DDP, logged values by an all-reduce). A term that is a batch *mean* is then
    right as it is; a term that is a batch *sum* must be multiplied by ``world_size`` to equal the
    single-process sum over the global batch. Single process: ``rank = 0``, ``world_size = 1``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    logits: torch.Tensor
    pooled: torch.Tensor
    epoch: int
    step: int
    rank: int = 0
    world_size: int = 1


@dataclass
class FinetuneResult:
    """The kept weights (best validation epoch) and how the run went.

    ``state_dict`` (CPU tensors) and ``model`` (eval mode, on the workspace device) hold the
    best-validation epoch's weights; ``history`` one row per epoch (see :func:`finetune`);
    ``accuracy`` the train/val/test accuracy of ``best_epoch``; ``resumed_from`` the epoch the
    run continued from (0 = fresh start); ``trainable`` the module names that were trained;
    ``world_size`` the number of data-parallel processes that trained it (1 without DDP).
    """

    state_dict: dict[str, torch.Tensor]
    model: nn.Module
    history: list[dict]
    best_epoch: int
    accuracy: dict[str, float]
    resumed_from: int = 0
    trainable: list[str] = field(default_factory=list)
    trainable_parameters: int = 0
    world_size: int = 1


def _registered_names(model: nn.Module, module: nn.Module | None) -> list[str]:
    """Names under which ``module`` or its submodules are registered in ``model``.

    A head may be a wrapper that is not itself part of the model (torchvision VGG's ``map_head``
    is a new ``Sequential`` over the model's own layers); its registered parts are returned.
    """
    if module is None:
        return []
    ids = {id(m) for m in module.modules()}
    names = [n for n, m in model.named_modules() if id(m) in ids]
    # Keep only the outermost names (a registered head covers its children).
    return [n for n in names if not any(n.startswith(p + ".") for p in names if p != n)]


def trainable_modules(model: nn.Module, target, mode: str = "block+head") -> list[str]:
    """Module names of ``model`` to fine-tune for ``mode`` (``TRAINABLE_CHOICES``).

    * target block: the target module itself if it has parameters (ResNet ``layer4``), else
      every leaf module from the last ``Conv2d`` at or before the target through the target
      (demo CNN: ``features.17`` conv, ``features.18`` BN, ``features.19`` ReLU);
    * head: ``target.pooled_head``, else the registered parts of ``target.map_head``.

    ``"all"`` returns ``[""]`` (the root). ``target`` is the workspace's
    :class:`~cfdebug.models.TargetLayer` for this very ``model`` object.
    """
    if mode not in TRAINABLE_CHOICES:
        raise CfdebugError(f"Expected `trainable` to be one of {', '.join(TRAINABLE_CHOICES)}, but got {mode!r}.")
    if mode == "all":
        return [""]
    head = _registered_names(model, target.pooled_head if target.pooled_head is not None else target.map_head)
    if not head:
        raise CfdebugError(
            f"Cannot tell which modules of {type(model).__name__} form the head after {target.name!r}, so "
            "`trainable` = 'head' or 'block+head' is undefined. Use `trainable='all'`."
        )
    if mode == "head":
        return head
    ordered = list(model.named_modules())
    names = [n for n, _ in ordered]
    index = names.index(target.name)
    target_module = ordered[index][1]
    if any(True for _ in target_module.parameters()):
        block = [target.name]
    else:
        convs = [i for i in range(index + 1) if isinstance(ordered[i][1], nn.Conv2d)]
        if not convs:
            raise CfdebugError(
                f"Found no Conv2d at or before the target layer {target.name!r}, so the target block is "
                "undefined. Use `trainable='head'` or `trainable='all'`."
            )
        block = [n for n, m in ordered[convs[-1] : index + 1] if not any(True for _ in m.children())]
    return block + [n for n in head if n not in block]


def _is_within(name: str, roots: Sequence[str]) -> bool:
    return any(r == "" or name == r or name.startswith(r + ".") for r in roots)


def _prepare(model: nn.Module, names: list[str]) -> list[nn.Parameter]:
    """Freeze everything outside ``names``; return the trainable parameters in model order."""
    trainable = []
    for pname, param in model.named_parameters():
        param.requires_grad_(_is_within(pname.rsplit(".", 1)[0] if "." in pname else "", names))
        if param.requires_grad:
            trainable.append(param)
    return trainable


def _set_train_mode(model: nn.Module, names: list[str]) -> None:
    """Train mode inside the trainable modules, eval mode elsewhere (frozen BN keeps its statistics,
    frozen dropout stays off)."""
    model.train()
    if names == [""]:
        return
    for name, module in model.named_modules():
        # Skip the trainable modules and their ancestors (``features`` holds ``features.17``):
        # the ancestors' frozen children are reached by this loop one by one.
        if name and not _is_within(name, names) and not any(_is_within(t, [name]) for t in names):
            module.eval()


def _loader_seed(seed: int, epoch: int) -> int:
    """The data-order seed of ``epoch``: a function of (seed, epoch) only, so resume is exact."""
    return int(stable_hash("finetune-data-order", int(seed), int(epoch)), 16) % (2**63 - 1)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _describe_difference(stored: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _describe_difference(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"`{prefix}{key}` was {a!r}, now {b!r}")
    return out


def _shard_range(n: int, rank: int, world: int) -> np.ndarray:
    """Process ``rank``'s contiguous share of ``0..n-1`` (sizes differ by at most one)."""
    return np.array_split(np.arange(n), world)[rank]


def _split_logits(model: nn.Module, bundle, split: str, device, batch_size: int = 256) -> np.ndarray:
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


def _evaluate(model: nn.Module, bundle, device) -> tuple[dict[str, float], float]:
    """Eval-mode accuracy on train/val/test and the mean validation cross-entropy (sharded over
    the processes under DDP; the same numbers on every process)."""
    logits = {s: _split_logits(model, bundle, s, device) for s in _SPLITS}
    acc = {
        s: float(np.mean(logits[s].argmax(1) == bundle.splits[s].labels)) if len(logits[s]) else float("nan")
        for s in _SPLITS
    }
    val_loss = float(F.cross_entropy(torch.from_numpy(logits["val"]), torch.from_numpy(bundle.splits["val"].labels).long()))
    return acc, val_loss


def _shard_batches(n: int, batch_size: int, generator: torch.Generator, rank: int, world: int) -> list[list[int]]:
    """This process's share of every batch of one epoch: dataset indices, in order.

    The global order is the single-process one: the same ``DataLoader(shuffle=True,
    generator=generator)`` draws (its base seed, then ``randperm``), over indices instead of
    images. Global batch ``[i·B, (i+1)·B)`` is cut into ``world`` equal contiguous slices and
    process ``rank`` takes slice ``rank``. A last batch that does not divide by ``world`` loses
    its final ``< world`` samples (equal shards keep the averaged gradient equal to the
    global-batch gradient); a batch left empty is skipped.
    """
    order = torch.utils.data.DataLoader(range(n), batch_size=batch_size, shuffle=True, generator=generator)
    out = []
    for batch in order:
        per = len(batch) // world
        if per:
            out.append(batch[rank * per : (rank + 1) * per].tolist())
    return out


def _global_dropout(pooled: torch.Tensor, p: float, offset: int, total: int) -> torch.Tensor:
    """Dropout on a shard ``pooled`` [b, C] with rows ``offset..offset+b`` of one mask drawn for
    the whole global batch [total, C] on every process.

    The mask is drawn on the CPU generator as ``nn.Dropout`` does on CPU (``bernoulli_(1 − p)``
    on a [total, C] tensor, then ``/(1 − p)``), so on CPU it is the single-process mask exactly,
    and every process's RNG stream stays identical (what a checkpoint's RNG state assumes).
    """
    if p == 0:
        return pooled
    noise = torch.empty((total, pooled.shape[1]), dtype=pooled.dtype).bernoulli_(1 - p)  # [total, C]
    noise.div_(1 - p)
    return pooled * noise[offset : offset + pooled.shape[0]].to(pooled.device)


def _params_without_grad(model, target, pooled_head, bundle, device, params) -> list[nn.Parameter]:
    """The trainable parameters that get no gradient from ``logits`` and ``g(x)`` (all a
    ``loss_fn`` sees), found with one eval-mode pass on one training image (no RNG drawn).

    A single process never updates them (the optimizer skips a ``None`` gradient); under DDP with
    ``find_unused_parameters=False`` they would stall the gradient reduction, so they are frozen.
    """
    image = bundle.torch_split("train")[0][0].unsqueeze(0).to(device)  # [1, 3, S, S]
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.enable_grad(), capture(model, target.name, detach=False) as cap:
            out = model(image)
            fmap = cap.activations[target.name]
            if target.activation is not None:
                fmap = target.activation(fmap)
            pooled = fmap.mean(dim=(2, 3))  # [1, C]
            logits = pooled_head(pooled) if pooled_head is not None else out
            (logits.float().sum() + pooled.float().sum()).backward()
        unused = [p for p in params if p.grad is None]
    finally:
        for p in params:
            p.grad = None
        for m, mode in was_training.items():
            m.training = mode
    return unused


def _read_resume(run_path: Path, identity: dict) -> dict | None:
    """The state to continue from (model, optimizer, RNG, history, best), or ``None`` without a
    checkpoint; :class:`CfdebugError` when it was made with other inputs."""
    ckpt_path = run_path / CHECKPOINT_NAME
    if not ckpt_path.is_file():
        return None
    ckpt = _load_checkpoint(ckpt_path)
    changed = _describe_difference(ckpt["identity"], identity)
    if changed:
        raise CfdebugError(
            f"Cannot resume the run in {run_path}: its checkpoint was made with different inputs "
            f"({'; '.join(changed)}). Resume with the same config and model, or start a new run "
            "(another run directory, or without resume)."
        )
    return {
        "model": ckpt["model"],
        "optimizer": ckpt["optimizer"],
        "epoch": int(ckpt["epoch"]),
        "history": list(ckpt["history"]),
        "best_epoch": int(ckpt["best_epoch"]),
        "best_val_acc": float(ckpt["best_val_acc"]),
        "best_val_loss": float(ckpt["best_val_loss"]),
        "best_state": _load_checkpoint(run_path / ckpt["best_file"]),
        "rng": ckpt["rng"],
    }


def _any_flag(flags: list[bool]) -> list[bool]:
    """Element-wise OR of ``flags`` over the processes (one small all-reduce)."""
    total = all_reduce_sum(torch.tensor([float(f) for f in flags], dtype=torch.float64))
    return [bool(v > 0) for v in total.tolist()]


def finetune(
    workspace,
    config,
    *,
    loss_fn: Callable[[FinetuneBatch], dict[str, torch.Tensor]] | None = None,
    batch_transform: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    fingerprint: dict | None = None,
    registry=None,
    run_id: str | None = None,
    progress: Progress | None = None,
    tag: dict | None = None,
) -> FinetuneResult:
    """Fine-tune a copy of ``workspace.model``; keep the epoch with the best validation accuracy.

    Model selection: highest validation accuracy; ties go to the lower validation loss, then to
    the earlier epoch. The test split is evaluated and logged every epoch, never used to choose.

    ``workspace`` is a :class:`~cfdebug.workspace.Workspace` or any object with ``model``,
    ``data`` (a :class:`~cfdebug.data.DataBundle` with train/val/test), ``device``, ``target``
    and ``model_digest``. ``workspace.model`` is never modified (it is deep-copied).

    ``config``: :class:`FinetuneConfig`, :class:`TreatmentConfig` or any frozen dataclass with
    the same schedule fields; ``asdict(config)`` is stored in every checkpoint.

    Per batch: ``images, labels = batch_transform(images, labels, indices)`` (XCR doubles the
    batch here; it must be deterministic or draw from its own seeded generator for resume to be
    exact), then a forward pass capturing the target map with its graph; ``g = GAP(activation(map))``
    [B, C]; with a pooled head ``logits = pooled_head(dropout(g))``, else ``logits =
    model(images)``; then ``loss_fn(FinetuneBatch)`` returns a dict with ``"loss"`` (what is
    back-propagated) and any further named terms (default: :func:`cross_entropy_loss`).

    Per epoch a history row ``{"epoch", "<term>" (mean over the epoch's batches, one per loss
    term), "train_acc", "val_acc", "test_acc" (eval mode, whole splits), "val_loss" (mean
    validation cross-entropy), "best_epoch",
    "best_val_acc", "train_seconds", "eval_seconds"}`` (plus ``tag``) goes to ``progress(fraction,
    message)`` and ``registry.log_progress(run_id, row)``.

    Checkpoints (with ``run_dir``): after every epoch ``run_dir/checkpoint.pt`` (model and
    optimizer state, RNG states of torch/NumPy/Python (and CUDA), epoch, history, config,
    base-model digest, ``fingerprint``) and ``run_dir/best-epoch<N>.pt`` for the best weights,
    each written atomically (temporary file + ``os.replace``). The data order of epoch ``e`` is
    drawn from a generator seeded with a hash of ``(config.seed, e)``, so there is no loader
    state to restore and ``resume=True`` ends with exactly the same weights and metrics as an
    uninterrupted run. Resuming is refused (:class:`CfdebugError`) if the stored config, base
    model or ``fingerprint`` differ; with no checkpoint it starts fresh.

    Failure: a non-finite loss term stops the run before the optimizer step with a
    :class:`CfdebugError` naming the epoch, batch and term (the last good checkpoint stays); with a
    registry the run is also marked ``failed``. Between batches ``registry.cancel_requested``
    is polled and :class:`~cfdebug.runs.RunCancelled` raised (wrap the call in
    :func:`~cfdebug.runs.run_context` for the status bookkeeping).

    **Data parallel** (``torch.distributed`` initialised with more than one process, e.g. by
    :func:`~cfdebug.distributed.init_distributed` under ``torchrun``): every process calls
    ``finetune`` with the same arguments and gets the same :class:`FinetuneResult`. The trainable
    model is wrapped in ``DistributedDataParallel`` (gradients averaged over processes). Each
    epoch's global batch order is the single-process one; global batch ``i`` is cut into
    ``world_size`` equal slices of ``batch_size // world_size`` images, one per process
    (``batch_size`` must divide by the number of processes; a last batch that does not loses its
    final ``< world_size`` images). So that the optimisation matches the single-process run:
    BatchNorm layers in the trainable part normalise with global-batch statistics
    (:class:`~cfdebug.distributed.GlobalBatchNorm`), the dropout on ``g(x)`` uses the rows of one
    global-batch mask, and a ``loss_fn`` must return each term so that its *mean over processes*
    is the single-process value on the global batch (``FinetuneBatch.world_size`` says by how
    much to scale a batch *sum*; a batch mean needs nothing). Evaluation is sharded and gathered;
    the model-selection decision is rank 0's, broadcast. Only rank 0 writes ``run_dir``, the
    registry and ``progress``; rank 0 polls for a cancel and every process stops together, as it
    does on a non-finite term. On resume, rank 0 reads the checkpoint and sends it to all.
    Trainable parameters that get no gradient from ``logits``/``g(x)`` are frozen (a single
    process never updates them either), so DDP runs with ``find_unused_parameters=False``.
    """
    check_schedule(config)
    loss_fn = loss_fn or cross_entropy_loss
    device = torch.device(workspace.device)
    bundle, target = workspace.data, workspace.target
    for split in ("train", "val"):
        if len(bundle.splits[split]) == 0:
            raise CfdebugError(
                f"Expected a non-empty `{split}` split for fine-tuning, but it has no images. "
                "Model selection needs a validation split carved from the training set (`val_fraction` > 0)."
            )
    if (registry is None) != (run_id is None):
        raise CfdebugError("Expected both `registry` and `run_id`, or neither.")
    ddp = is_distributed()
    rank, world = (get_rank(), get_world_size()) if ddp else (0, 1)
    is_main = rank == 0
    if ddp and config.batch_size % world:
        raise CfdebugError(
            f"Expected `batch_size` to be divisible by the number of processes ({world}) so that each gets "
            f"an equal share of every batch, but got {config.batch_size}. Use a multiple of {world} "
            f"(e.g. {-(-config.batch_size // world) * world}), or a number of processes that divides it."
        )
    if not is_main:
        registry, progress = None, None  # rank 0 alone reports; it also decides on cancels

    names = trainable_modules(workspace.model, target, config.trainable)
    model = copy.deepcopy(workspace.model).to(device)
    modules = dict(model.named_modules())
    params = _prepare(model, names)
    if not params:
        raise CfdebugError(f"The modules {names} have no parameters to fine-tune; choose another `trainable`.")
    pooled_head = None
    if target.pooled_head is not None:
        head_names = [n for n, m in workspace.model.named_modules() if m is target.pooled_head]
        pooled_head = modules[head_names[0]] if head_names else None
    dropout = nn.Dropout(config.dropout)
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)

    identity = {
        "kind": type(config).__name__,
        "config": config_dict(config),
        "base_model": workspace.model_digest,
        "target": target.name,
        "data": getattr(bundle, "fingerprint", None),
        "fingerprint": fingerprint or {},
    }
    run_path = Path(run_dir) if run_dir is not None else None
    history: list[dict] = []
    start_epoch, best_epoch, best_val, best_val_loss, best_state = 0, 0, -1.0, math.inf, None
    rng = None
    state, error = None, None
    if run_path is not None and is_main:
        run_path.mkdir(parents=True, exist_ok=True)
        if resume:
            try:
                state = _read_resume(run_path, identity)
            except CfdebugError as exc:
                if not ddp:
                    raise
                error = str(exc)
    if ddp and run_path is not None and resume:
        # The checkpoint comes from this job's own rank 0 (read with weights_only=True there).
        error, state = broadcast_object((error, state))
    if error is not None:
        raise CfdebugError(error)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"], state["history"]
        best_epoch, best_val, best_val_loss = state["best_epoch"], state["best_val_acc"], state["best_val_loss"]
        best_state, rng = state["best_state"], state["rng"]
        state = None

    train_model: nn.Module = model
    if ddp:
        for p in _params_without_grad(model, target, pooled_head, bundle, device, params):
            p.requires_grad_(False)

    if rng is None:
        seed_everything(config.seed)
    else:
        _set_rng_state(rng)  # last, so nothing above draws from the restored streams

    def report(row: dict) -> None:
        if registry is not None:
            registry.log_progress(run_id, row)
        if progress is not None:
            progress(
                row["epoch"] / config.epochs,
                f"epoch {row['epoch']}/{config.epochs}: loss {row.get('loss', float('nan')):.4f}, "
                f"train acc {row['train_acc']:.3f}, val acc {row['val_acc']:.3f}, test acc {row['test_acc']:.3f}",
            )

    with global_batchnorm(model, names if ddp else ()):
        if ddp:
            train_model = wrap_ddp(model, device)  # broadcasts rank 0's parameters and buffers
        for epoch in range(start_epoch + 1, config.epochs + 1):
            t0 = time.perf_counter()
            generator = torch.Generator().manual_seed(_loader_seed(config.seed, epoch))
            if ddp:
                shares = _shard_batches(len(bundle.splits["train"]), config.batch_size, generator, rank, world)
                # A private generator: the loader's base seed must not come from the global RNG.
                data = torch.utils.data.DataLoader(
                    bundle.torch_split("train"), batch_sampler=shares, generator=torch.Generator().manual_seed(0)
                )
            else:
                data = loader(bundle, "train", config.batch_size, shuffle=True, generator=generator)
            _set_train_mode(model, names)
            dropout.train()
            sums: dict[str, float] = {}
            batches = 0
            with capture(model, target.name, detach=False) as cap:
                for step, (images, labels, indices) in enumerate(data):
                    cancel = registry is not None and registry.cancel_requested(run_id)
                    if cancel and not ddp:
                        from .runs import RunCancelled

                        raise RunCancelled(f"run {run_id!r} was cancelled during epoch {epoch}")
                    if batch_transform is not None:
                        images, labels = batch_transform(images, labels, indices)
                    images, labels = images.to(device), labels.to(device)
                    out_logits = train_model(images)
                    fmap = cap.activations[target.name]
                    if fmap.dim() != 4:
                        raise CfdebugError(
                            f"The target layer {target.name!r} outputs shape {tuple(fmap.shape)}; expected a feature "
                            "map [B, C, H, W]."
                        )
                    if target.activation is not None:
                        fmap = target.activation(fmap)
                    pooled = fmap.mean(dim=(2, 3))  # [B, C]
                    if pooled_head is None:
                        logits = out_logits
                    elif ddp:
                        rows = [len(pooled)] * world
                        if batch_transform is not None:  # it may change the shard sizes
                            rows = [int(r) for r in all_gather_object(len(pooled))]
                        logits = pooled_head(_global_dropout(pooled, config.dropout, sum(rows[:rank]), sum(rows)))
                    else:
                        logits = pooled_head(dropout(pooled))
                    terms = loss_fn(FinetuneBatch(images, labels, indices, logits, pooled, epoch, step, rank=rank, world_size=world))
                    last_good = history[-1]["epoch"] if history else 0
                    if ddp:
                        _check_finite_together(terms, cancel, epoch, step, run_path, last_good, registry, run_id)
                    else:
                        _check_finite(terms, epoch, step, run_path, last_good, registry, run_id)
                    optimizer.zero_grad(set_to_none=True)
                    terms["loss"].backward()
                    optimizer.step()
                    for key, value in terms.items():
                        sums[key] = sums.get(key, 0.0) + float(value.detach())
                    batches += 1
            if ddp and sums:  # the mean over processes of each term's epoch sum
                keys = sorted(sums)
                reduced = all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64)) / world
                sums = dict(zip(keys, reduced.tolist()))
            train_seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            acc, val_loss = _evaluate(model, bundle, device)
            # Best validation accuracy; a tie (common on a small validation split) goes to the lower
            # validation loss, then to the earlier epoch. The test split never enters this choice.
            improved = acc["val"] > best_val or (acc["val"] == best_val and val_loss < best_val_loss)
            if ddp:  # every process computed the same numbers; rank 0's decision is the one kept
                improved = broadcast_object(improved)
            if improved:
                best_val, best_val_loss, best_epoch, best_state = acc["val"], val_loss, epoch, _cpu_state(model)
            row = {"epoch": epoch, **{k: v / max(batches, 1) for k, v in sums.items()}}
            row.update(
                train_acc=acc["train"], val_acc=acc["val"], test_acc=acc["test"], val_loss=val_loss, best_epoch=best_epoch,
                best_val_acc=best_val, train_seconds=train_seconds, eval_seconds=time.perf_counter() - t1,
            )
            row.update(tag or {})
            history.append(row)
            if run_path is not None and is_main:
                _write_checkpoint(run_path, model, optimizer, epoch, history, best_epoch, best_val, best_val_loss, best_state, identity)
            report(row)
        del train_model
    if ddp:
        barrier()  # no process returns before rank 0's last checkpoint is on disk

    if best_state is None:  # every epoch was already done before a resume with nothing left
        raise CfdebugError(f"The checkpoint in {run_path} has no best state; start the run again without resume.")
    if ddp:
        # A fresh copy: nothing of the DDP wrapper (its gradient hooks) stays on the returned model.
        model = copy.deepcopy(workspace.model).to(device)
    model.load_state_dict(best_state)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    best_row = next(r for r in history if r["epoch"] == best_epoch)
    return FinetuneResult(
        state_dict=best_state,
        model=model,
        history=history,
        best_epoch=best_epoch,
        accuracy={s: best_row[f"{s}_acc"] for s in _SPLITS},
        resumed_from=start_epoch,
        trainable=names,
        trainable_parameters=sum(p.numel() for p in params),
        world_size=world,
    )


def _diverged(term, value, epoch, step, run_path, last_good, registry, run_id) -> None:
    """Stop a run whose loss term went NaN/inf: mark it failed and say which term, where."""
    kept = (
        f"The last good checkpoint (epoch {last_good}) is kept in {run_path}."
        if run_path is not None and last_good
        else "No checkpoint was written before it."
    )
    message = (
        f"Training diverged at epoch {epoch}, batch {step}: the `{term}` term is {value}. {kept} "
        "Lower `lr` (or the λ weights) and start a new run."
    )
    if registry is not None:
        registry.set_status(run_id, "failed", error=message)
    raise CfdebugError(message)


def _check_finite_together(terms, cancel, epoch, step, run_path, last_good, registry, run_id) -> None:
    """DDP form of :func:`_check_finite` and the cancel check: one all-reduce of the flags, so
    every process stops at the same batch (one process stopping alone would hang the others)."""
    if "loss" not in terms:
        raise TypeError("A finetune loss_fn must return a dict with a 'loss' entry.")
    keys = sorted(k for k in terms if k != "loss") + ["loss"]
    local = [not bool(torch.isfinite(terms[k].detach()).all()) for k in keys]
    flags = _any_flag([cancel, *local])
    if flags[0]:
        from .runs import RunCancelled

        raise RunCancelled(f"run {run_id!r} was cancelled during epoch {epoch}")
    bad = [k for k, f in zip(keys, flags[1:]) if f]
    if not bad:
        return
    term = bad[0]
    if local[keys.index(term)]:
        value = str(float(terms[term].detach().float().reshape(-1)[0]))
    else:
        value = "not finite on another process"
    _diverged(term, value, epoch, step, run_path, last_good, registry, run_id)


def _check_finite(terms, epoch, step, run_path, last_good, registry, run_id) -> None:
    if "loss" not in terms:
        raise TypeError("A finetune loss_fn must return a dict with a 'loss' entry.")
    bad = [k for k, v in terms.items() if k != "loss" and not torch.isfinite(v.detach()).all()]
    if not bad and torch.isfinite(terms["loss"].detach()).all():
        return
    term = bad[0] if bad else "loss"
    value = float(terms[term].detach().float().reshape(-1)[0])
    _diverged(term, value, epoch, step, run_path, last_good, registry, run_id)


def _write_checkpoint(run_path: Path, model, optimizer, epoch, history, best_epoch, best_val, best_val_loss, best_state, identity) -> None:
    best_file = f"best-epoch{best_epoch}.pt"
    if not (run_path / best_file).is_file() or best_epoch == epoch:
        torch_save_atomic(best_state, run_path / best_file)
    payload = {
        "format": _CHECKPOINT_FORMAT,
        "identity": identity,
        "epoch": epoch,
        "model": _cpu_state(model),
        "optimizer": optimizer.state_dict(),
        "rng": _rng_state(),
        "history": history,
        "best_epoch": best_epoch,
        "best_val_acc": best_val,
        "best_val_loss": best_val_loss,
        "best_file": best_file,
    }
    torch_save_atomic(payload, run_path / CHECKPOINT_NAME)
    # Only after the checkpoint that names the new best file: older best files are now unused.
    for old in run_path.glob("best-epoch*.pt"):
        if old.name != best_file:
            old.unlink(missing_ok=True)


def _load_checkpoint(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CfdebugError(
            f"Cannot read the checkpoint {path}: {str(exc).splitlines()[0] if str(exc) else exc}. "
            "Delete the run directory and start the run again."
        ) from None


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
    return {s: _split_logits(workspace.model, workspace.data, s, torch.device(workspace.device)).argmax(1) for s in _SPLITS}


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
        workspace: see :func:`finetune`.
        config: :class:`TreatmentConfig` (defaults from METHODS.md). The control is
            ``control_config(config)`` (λ1 = λ2 = 0).
        global_sets: ``[K, C]`` bool global MC sets (or the histogram ``h``; binarised ``> 0``);
            row ``y`` is ``G_y`` of true class ``y``.
        run_dir: checkpoints go here, and the treated weights as ``model.pt`` (atomic; rank 0 only
            under DDP).
        resume, registry, run_id, progress: as in :func:`finetune` (under DDP every process calls
            this with the same arguments and gets the same result; see :func:`finetune`).
        base: precomputed base predictions ``{"train"|"val"|"test": [N] int}`` (saves a pass).

    Returns:
        A dict: ``config``; ``base_accuracy`` / ``accuracy`` ``{"train","val","test"}`` (before /
        the selected epoch); ``best_epoch``; ``history`` (per-epoch rows, see :func:`finetune`);
        ``per_class_recall_before`` / ``_after`` [K] on test (NaN for a class without test images);
        ``table3`` (:func:`table3`); ``confusion_delta`` [K, K] int64 (after − before, test, rows
        true class); ``churn`` on test ``{"fixed", "broken"}`` (wrong→right, right→wrong counts);
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
        terms = treatment_loss(batch.logits, batch.labels, batch.pooled, rows, config.lambda1, config.lambda2, config.theta)
        if batch.world_size > 1:
            # mc and non_mc are sums over the batch: a shard's sum × world_size averages (over
            # the processes, as DDP averages gradients) to the global batch's sum.
            w = batch.world_size
            mc, non_mc = terms["mc"] * w, terms["non_mc"] * w
            terms = {"loss": terms["ce"] - config.lambda1 * mc + config.lambda2 * non_mc, "ce": terms["ce"], "mc": mc, "non_mc": non_mc}
        return terms

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
    after_test = _split_logits(result.model, bundle, "test", device).argmax(1)
    y_test, k = bundle.splits["test"].labels, bundle.num_classes
    base_acc = {s: float(np.mean(before[s] == bundle.splits[s].labels)) for s in _SPLITS}
    recall_before = per_class_recall(before["test"], y_test, k)
    recall_after = per_class_recall(after_test, y_test, k)
    out = {
        "config": config_dict(config),
        "base_accuracy": base_acc,
        "accuracy": dict(result.accuracy),
        "best_epoch": result.best_epoch,
        "history": result.history,
        "per_class_recall_before": recall_before,
        "per_class_recall_after": recall_after,
        "table3": table3(recall_before, recall_after, bundle.classes),
        "confusion_delta": confusion_matrix(after_test, y_test, k) - confusion_matrix(before["test"], y_test, k),
        "churn": {
            "fixed": int(np.sum((before["test"] != y_test) & (after_test == y_test))),
            "broken": int(np.sum((before["test"] == y_test) & (after_test != y_test))),
        },
        "empty_global_sets": [int(i) for i in np.nonzero(~sets.any(axis=1))[0]],
        "trainable": result.trainable,
        "trainable_parameters": result.trainable_parameters,
        "resumed_from": result.resumed_from,
        "seconds_per_epoch": float(np.mean([r["train_seconds"] for r in result.history])),
        "world_size": result.world_size,
        "state_dict": result.state_dict,
    }
    if run_dir is not None and get_rank() == 0:
        torch_save_atomic(result.state_dict, Path(run_dir) / MODEL_NAME)
    barrier()  # under DDP: model.pt is on disk before any process returns
    return out


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
    epochs: int,
    global_sets: Any,
    progress: Progress | None = None,
    *,
    config: TreatmentConfig | None = None,
    run_dir: str | Path | None = None,
    registry=None,
    run_id: str | None = None,
) -> dict:
    """Table 2: every (λ1, λ2) in ``lambdas1 × lambdas2`` and the control, for each seed.

    ``config`` gives the other fields (default :class:`TreatmentConfig`); ``epochs`` and the
    seeds override it. With ``run_dir`` each run checkpoints in its own sub-folder and the sweep
    resumes where it stopped (finished runs are read back from their checkpoints). Under DDP
    every process calls it with the same arguments (see :func:`finetune`).

    Returns:
        ``{"base": {"train_acc","val_acc","test_acc","per_class_recall"}, "control": [per seed
        run], "runs": [per (λ1, λ2, seed) run], "table2": rows, "table3": …, "best": {"lambda1",
        "lambda2"}}``. A run is ``{"lambda1","lambda2","seed","train_acc","val_acc","test_acc",
        "best_epoch","per_class_recall","history"}``. ``table2`` rows are ``{"model": "base" |
        "fine-tuned" | "treatment", "lambda1", "lambda2", "n_seeds", "<split>_acc_mean",
        "<split>_acc_std"}`` (sample std, ddof = 1; 0 for one seed). ``table3`` compares the base
        per-class test recall with the *mean over seeds* of the best pair's (best = highest mean
        validation accuracy; never test).
    """
    base_config = config or TreatmentConfig()
    lambdas1, lambdas2, seeds = list(lambdas1), list(lambdas2), list(seeds)
    for name, values in (("lambdas1", lambdas1), ("lambdas2", lambdas2), ("seeds", seeds)):
        if not values:
            raise CfdebugError(f"Expected `{name}` to hold at least one value, but it is empty.")
    configs = []
    for seed in seeds:
        configs.append(("fine-tuned", replace(base_config, lambda1=0.0, lambda2=0.0, seed=seed, epochs=epochs)))
        for l1, l2 in itertools.product(lambdas1, lambdas2):
            configs.append(("treatment", replace(base_config, lambda1=l1, lambda2=l2, seed=seed, epochs=epochs)))
    bundle, k = workspace.data, workspace.data.num_classes
    check_global_sets(global_sets, k, workspace.target.channels)
    before = _base_predictions(workspace)
    y_test = bundle.splits["test"].labels
    base = {f"{s}_acc": float(np.mean(before[s] == bundle.splits[s].labels)) for s in _SPLITS}
    base["per_class_recall"] = per_class_recall(before["test"], y_test, k)

    control, runs = [], []
    for i, (kind, cfg) in enumerate(configs):
        sub = None
        if run_dir is not None:
            sub = sweep_run_dir(run_dir, kind, cfg.lambda1, cfg.lambda2, cfg.seed)

        def inner(frac: float, message: str, i=i, cfg=cfg, kind=kind) -> None:
            if progress is not None:
                progress(
                    (i + frac) / len(configs),
                    f"run {i + 1}/{len(configs)} ({kind}, λ1={cfg.lambda1:g}, λ2={cfg.lambda2:g}, seed {cfg.seed}): {message}",
                )

        out = run_treatment(
            workspace, cfg, global_sets, run_dir=sub, resume=sub is not None, registry=registry, run_id=run_id,
            progress=inner, base=before,
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
            "history": out["history"],
        }
        (control if kind == "fine-tuned" else runs).append(record)

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
        "base": base,
        "control": control,
        "runs": runs,
        "table2": table2,
        "best": {"lambda1": best_row["lambda1"], "lambda2": best_row["lambda2"]},
        "table3": table3(base["per_class_recall"], mean_recall, bundle.classes),
    }


def flagged_churn(before: dict, after: dict) -> dict:
    """How treatment changed the flagged set: two :func:`cfdebug.detect.run_detection` results
    on the same split, for the base model (``before``) and the treated one (``after``, detection
    recomputed on it: its own CFE heads and global filters).

    Returns counts: ``flagged_errors_before`` (flagged predictions that were wrong),
    ``flagged_errors_fixed`` (of those, now correct), ``new_errors`` (correct before, wrong after),
    ``new_errors_flagged`` (of those, flagged by the treated model's detection),
    ``flagged_before``/``flagged_after``, and the ids of the fixed and newly wrong images.
    """
    b, a = before["images"], after["images"]
    if [r["id"] for r in b] != [r["id"] for r in a]:
        raise CfdebugError("Expected two detection results on the same images, but their image ids differ.")
    fixed = [x["id"] for x, y in zip(b, a) if x["flagged"] and x["error"] and not y["error"]]
    broken = [(x["id"], y["flagged"]) for x, y in zip(b, a) if not x["error"] and y["error"]]
    return {
        "flagged_errors_before": sum(1 for x in b if x["flagged"] and x["error"]),
        "flagged_errors_fixed": len(fixed),
        "new_errors": len(broken),
        "new_errors_flagged": sum(1 for _, flagged in broken if flagged),
        "flagged_before": sum(1 for x in b if x["flagged"]),
        "flagged_after": sum(1 for y in a if y["flagged"]),
        "fixed_ids": fixed,
        "new_error_ids": [i for i, _ in broken],
    }
