"""The training engine: one epoch loop for every stage that trains weights.

Four things train in cfdebug: the demo model (:func:`train_classifier`), a treatment run and its
cross-entropy control (:func:`finetune`, called by :mod:`cfdebug.treatment`), XCR's
counterfactual and vanilla retraining (:func:`finetune` again, through :mod:`cfdebug.xcr.retrain`)
and the XCR selector (:func:`cfdebug.xcr.selector.train_selector`). All of them run on
:func:`run_epochs`, which owns what they share:

* the epoch loop (per batch: cancel poll, the stage's step, the non-finite check, backward,
  optimizer step), resumable from a checkpoint after any epoch;
* one history row per epoch with the same keys for every stage (:data:`HISTORY_KEYS`, plus one
  mean per loss term, plus a stage's extras);
* one divergence check naming epoch, batch and term; one cancel hook (the run registry's flag
  and a ``should_stop`` callable, polled between batches);
* checkpoints (model, optimizer, RNG streams, history, best epoch; written atomically) with an
  exact resume, and model selection on the validation split (the test split is evaluated and
  logged, never used to choose);
* data parallelism under ``torchrun`` for a stage that asks for it (:func:`finetune` does).

A stage (:class:`Stage`) supplies only what differs: what trains (the module and its
optimizer), how an epoch's batches are drawn, the step (forward pass and the loss, a dict of
terms), how an epoch is evaluated and how epochs are compared.

**Data-parallel fine-tuning.** Under ``torchrun`` (a ``torch.distributed`` group of N > 1, see
:func:`cfdebug.distributed.init_distributed`) :func:`finetune` trains with
``DistributedDataParallel``. Each epoch's global batch order is the single-process one; global
batch ``i`` is cut into N equal slices of ``batch_size // N`` images (``batch_size`` must divide
by N; a last batch that does not loses its final ``< N`` images). So that the optimisation
matches the single-process run: BatchNorm layers in the trainable part normalise with
global-batch statistics (:class:`~cfdebug.distributed.GlobalBatchNorm`), the dropout on ``g(x)``
uses the rows of one global-batch mask, and a ``loss_fn`` returns each term so that its *mean
over processes* is the single-process value on the global batch (``FinetuneBatch.world_size``
says by how much to scale a batch *sum*; a batch mean needs nothing). Evaluation is sharded and
gathered; rank 0's model-selection decision is kept; only rank 0 writes checkpoints, the
registry and progress, and it alone polls for a cancel, which stops every process at the same
batch (as a non-finite term on any process does). On resume rank 0 reads the checkpoint and
sends it to all. Trainable parameters that get no gradient from ``logits``/``g(x)`` are frozen
(a single process never updates them either), so DDP runs with ``find_unused_parameters=False``.
"""

from __future__ import annotations

import copy
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import TRAINABLE_CHOICES, TrainConfig, check_schedule, config_dict
from .data import DataBundle
from .distributed import (
    all_gather_object,
    all_reduce_sum,
    barrier,
    broadcast_object,
    get_rank,
    get_world_size,
    global_batchnorm,
    is_distributed,
    is_within,
    wrap_ddp,
)
from .errors import CfdebugError
from .hooks import capture
from .runs import RunCancelled
from .runtime import Progress, seed_everything
from .store import stable_hash, torch_save_atomic

__all__ = [
    "HISTORY_KEYS",
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
    "trainable_modules",
    "finetune",
]

CHECKPOINT_NAME = "checkpoint.pt"
_CHECKPOINT_FORMAT = 1
_SPLITS = ("train", "val", "test")

#: The keys of every history row, whatever the stage. Besides them a row holds the epoch mean of
#: each loss term the stage's step returns (``"loss"`` always; ``"ce"``, ``"mc"``, ``"kl"`` …),
#: a caller's ``tag`` and a stage's extra scores (the selector's ``val_acc_softmax``).
HISTORY_KEYS = (
    "epoch", "loss", "train_acc", "val_acc", "test_acc", "val_loss",
    "best_epoch", "best_val_acc", "train_seconds", "eval_seconds",
)  # fmt: skip


# ---------------------------------------------------------------------------------- prediction
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
    logits = {s: split_logits(model, bundle, s, device) for s in _SPLITS}
    out = {
        f"{s}_acc": float(np.mean(logits[s].argmax(1) == bundle.splits[s].labels)) if len(logits[s]) else float("nan")
        for s in _SPLITS
    }
    out["val_loss"] = float(F.cross_entropy(torch.from_numpy(logits["val"]), torch.from_numpy(bundle.splits["val"].labels).long()))
    return out


# ---------------------------------------------------------------------------------- the engine
@dataclass
class StepOutput:
    """What a stage's step returns for one batch.

    ``terms``: ``{"loss": …, <term>: …}`` 0-d tensors (``loss`` is back-propagated, every term is
    logged); ``size``: the batch's sample count; ``correct``: how many of its predictions were
    right, for a running training accuracy (``None`` when the stage's ``evaluate`` reports
    ``train_acc`` itself).
    """

    terms: dict[str, torch.Tensor]
    size: int
    correct: int | None = None


def _val_acc(row: dict) -> tuple:
    return (row["val_acc"],)


@dataclass
class Stage:
    """What one kind of training supplies to :func:`run_epochs` (the rest is the engine's).

    Attributes:
        name: for messages ("training", "fine-tuning", "selector training").
        model: everything that trains, one module (checkpointed, and the kept epoch's weights are
            its ``state_dict``); the optimizer's parameters belong to it.
        optimizer: steps after every batch.
        batches: ``epoch (1-based) → iterable of batches`` (a loader with one seeded generator
            continuing across epochs, or a new one seeded per epoch).
        step: ``(batch, epoch, index) → StepOutput``: the forward pass and the loss terms.
        evaluate: ``() → {"val_acc", "test_acc", "val_loss", ["train_acc"], extras…}`` after an
            epoch, in eval mode; it must not use the test split to choose anything.
        score: ``row → tuple``; the epoch with the highest score is kept, the earlier one on ties
            (default: validation accuracy alone).
        train_mode: puts the trainable modules in train mode before an epoch (default
            ``model.train()``).
        generator: the torch generator ``batches`` draws from, if it continues across epochs;
            its state is checkpointed so a resume draws the same batches.
        term_mean: ``"batch"`` (mean of the batches' terms) or ``"sample"`` (weighted by ``size``).
        scope: entered around all epochs (DDP wrapping); ``epoch_scope`` around each epoch's
            batches (the capture hooks).
        distributed: train data-parallel when a ``torch.distributed`` group of N > 1 is active
            (the step must then shard the batch; see :func:`finetune`).
        advice: the end of the divergence message: what to change.
    """

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: Callable[[int], Iterable]
    step: Callable[[Any, int, int], StepOutput]
    evaluate: Callable[[], dict[str, float]]
    score: Callable[[dict], tuple] = _val_acc
    train_mode: Callable[[], None] | None = None
    generator: torch.Generator | None = None
    term_mean: str = "batch"
    scope: Callable[[], ContextManager] = nullcontext
    epoch_scope: Callable[[], ContextManager] = nullcontext
    distributed: bool = False
    advice: str = "Lower `lr` and start a new run."


@dataclass
class EngineResult:
    """What :func:`run_epochs` returns: the history (one row per epoch, including the epochs
    before a resume), the kept epoch and its weights (CPU tensors) and the epoch the run continued
    from (0 = fresh start)."""

    history: list[dict]
    best_epoch: int
    best_state: dict[str, torch.Tensor]
    resumed_from: int = 0

    @property
    def best_row(self) -> dict:
        return next(r for r in self.history if r["epoch"] == self.best_epoch)


@dataclass
class _Run:
    """Per-run bookkeeping the loop's helpers share."""

    stage: Stage
    epochs: int
    ddp: bool
    run_path: Path | None
    registry: Any
    run_id: str | None
    should_stop: Callable[[], bool] | None
    progress: Progress | None = None
    history: list[dict] = field(default_factory=list)

    def stop_requested(self) -> bool:
        return bool(
            (self.registry is not None and self.registry.cancel_requested(self.run_id))
            or (self.should_stop is not None and self.should_stop())
        )

    def cancelled(self, epoch: int) -> RunCancelled:
        which = f" (run {self.run_id!r})" if self.run_id is not None else ""
        return RunCancelled(f"{self.stage.name}{which} was cancelled during epoch {epoch}")


def run_epochs(
    stage: Stage,
    epochs: int,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    identity: dict | None = None,
    registry=None,
    run_id: str | None = None,
    progress: Progress | None = None,
    tag: dict | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> EngineResult:
    """Train ``stage`` for epochs ``1..epochs`` (those after a resumed checkpoint); keep the best.

    Seed the global RNGs before calling (the stage's construction may draw from them); on resume
    the checkpoint's RNG states replace them. Per epoch a row (:data:`HISTORY_KEYS`, the loss
    terms, ``tag``) goes to ``history``, ``registry.log_progress(run_id, row)`` and
    ``progress(epoch / epochs, message)``.

    Args:
        run_dir: with it, after every epoch ``run_dir/checkpoint.pt`` (model and optimizer state,
            RNG states of torch/NumPy/Python (and CUDA) and of ``stage.generator``, history, best
            epoch, ``identity``) and ``run_dir/best-epoch<N>.pt``, each written atomically.
        resume: continue from ``run_dir``'s checkpoint if there is one (exactly: the same weights
            and history as an uninterrupted run); refused with :class:`CfdebugError` when its
            ``identity`` differs from this one (what changed is named).
        registry, run_id: log rows, poll the cancel flag between batches, mark a diverged run
            ``failed``. ``should_stop``: polled too (in-process callers). Either raises
            :class:`~cfdebug.runs.RunCancelled`.

    A non-finite loss term stops the run before the optimizer step with a :class:`CfdebugError`
    naming the epoch, batch and term (the last good checkpoint stays). Under DDP
    (``stage.distributed``) every process calls this; rank 0 alone writes, reports and polls for
    a cancel, every process stops together, and rank 0's model-selection decision is kept.
    """
    if (registry is None) != (run_id is None):
        raise CfdebugError("Expected both `registry` and `run_id`, or neither.")
    ddp = stage.distributed and is_distributed()
    is_main = not ddp or get_rank() == 0
    if not is_main:
        registry, progress = None, None  # rank 0 alone reports; it also decides on cancels
    run = _Run(stage, epochs, ddp, Path(run_dir) if run_dir is not None else None, registry, run_id, should_stop, progress)
    state = _resume_state(run, identity or {}, resume, is_main)
    best_epoch, best_state, start = 0, None, 0
    if state is not None:
        stage.model.load_state_dict(state["model"])
        stage.optimizer.load_state_dict(state["optimizer"])
        if stage.generator is not None:
            stage.generator.set_state(state["generator"])
        start, run.history, best_epoch, best_state = state["epoch"], state["history"], state["best_epoch"], state["best_state"]
        _set_rng_state(state["rng"])  # last, so nothing above draws from the restored streams
    with stage.scope():
        for epoch in range(start + 1, epochs + 1):
            row, seconds = _epoch(run, epoch)
            best_row = next((r for r in run.history if r["epoch"] == best_epoch), None)
            improved = best_row is None or stage.score(row) > stage.score(best_row)
            if ddp:  # every process computed the same numbers; rank 0's decision is the one kept
                improved = broadcast_object(improved)
            if improved:
                best_epoch, best_state, best_row = epoch, cpu_state(stage.model), row
            row.update(best_epoch=best_epoch, best_val_acc=best_row["val_acc"], **seconds, **(tag or {}))
            run.history.append(row)
            if run.run_path is not None and is_main:
                _write_checkpoint(run, epoch, best_epoch, best_state, identity or {})
            _report(run, row, registry, run_id, progress)
    if ddp:
        barrier()  # no process returns before rank 0's last checkpoint is on disk
    if best_state is None:  # every epoch was already done before a resume with nothing left
        raise CfdebugError(f"The checkpoint in {run.run_path} has no best state; start the run again without resume.")
    return EngineResult(history=run.history, best_epoch=best_epoch, best_state=best_state, resumed_from=start)


def _epoch(run: _Run, epoch: int) -> tuple[dict, dict[str, float]]:
    """Train one epoch and evaluate it: the row so far (epoch, terms, scores) and the seconds."""
    t0 = time.perf_counter()
    means, train_acc = _train_epoch(run, epoch)
    train_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    scores = run.stage.evaluate()
    row = {"epoch": epoch, **means}
    if train_acc is not None:
        row["train_acc"] = train_acc
    row.update(scores)
    missing = [k for k in ("loss", "train_acc", "val_acc", "test_acc", "val_loss") if k not in row]
    if missing:
        raise TypeError(f"The {run.stage.name} stage reports no {', '.join(missing)} (see HISTORY_KEYS).")
    return row, {"train_seconds": train_seconds, "eval_seconds": time.perf_counter() - t1}


def _train_epoch(run: _Run, epoch: int) -> tuple[dict[str, float], float | None]:
    """One pass over the epoch's batches: ``(mean of each loss term, running accuracy or None)``."""
    stage = run.stage
    (stage.train_mode or stage.model.train)()
    sums: dict[str, float] = {}
    batches = weight = correct = seen = 0
    batch_iter = stage.batches(epoch)
    reporter = _BatchReporter(run, epoch, len(batch_iter) if hasattr(batch_iter, "__len__") else None)
    with stage.epoch_scope():
        for index, batch in enumerate(batch_iter):
            cancel = run.stop_requested()
            if cancel and not run.ddp:
                raise run.cancelled(epoch)
            out = stage.step(batch, epoch, index)
            _check_terms(run, out.terms, cancel, epoch, index)
            stage.optimizer.zero_grad(set_to_none=True)
            out.terms["loss"].backward()
            stage.optimizer.step()
            w = out.size if stage.term_mean == "sample" else 1
            for key, value in out.terms.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach()) * w
            batches, weight = batches + 1, weight + w
            if out.correct is not None:
                correct, seen = correct + out.correct, seen + out.size
            reporter(index)
    if run.ddp and sums:  # the mean over processes of each term's epoch sum
        keys = sorted(sums)
        reduced = all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64)) / get_world_size()
        sums = dict(zip(keys, reduced.tolist()))
        if seen:
            correct, seen = (int(v) for v in all_reduce_sum(torch.tensor([correct, seen], dtype=torch.float64)).tolist())
    denominator = weight if stage.term_mean == "sample" else max(batches, 1)
    return {k: v / denominator for k, v in sums.items()}, (correct / seen if seen else None)


#: Seconds between two within-epoch progress reports (an epoch shorter than this reports only at
#: its end, as before; a long one, e.g. a torchvision model on CPU, shows its batches moving so a
#: time left can be measured before the first epoch ends).
BATCH_REPORT_S = 5.0


class _BatchReporter:
    """Calls ``run.progress`` with the fraction of the run done after batch ``index`` of ``epoch``,
    at most every :data:`BATCH_REPORT_S` seconds. Progress only: nothing goes to the registry or
    the history (their rows stay one per epoch)."""

    def __init__(self, run: _Run, epoch: int, n_batches: int | None):
        self.run, self.epoch, self.n = run, epoch, n_batches
        self.last = time.perf_counter()

    def __call__(self, index: int) -> None:
        if self.run.progress is None or not self.n:
            return
        now = time.perf_counter()
        if now - self.last < BATCH_REPORT_S:
            return
        self.last = now
        done = (self.epoch - 1 + (index + 1) / self.n) / self.run.epochs
        self.run.progress(done, f"epoch {self.epoch}/{self.run.epochs}: batch {index + 1}/{self.n}")


def _check_terms(run: _Run, terms: dict, cancel: bool, epoch: int, step: int) -> None:
    """The one divergence check (and, under DDP, the cancel check): every process stops at the
    same batch, with one small all-reduce of the flags (one process stopping alone would hang
    the others)."""
    if "loss" not in terms:
        raise TypeError(f"A {run.stage.name} step must return a dict of terms with a 'loss' entry.")
    keys = [k for k in terms if k != "loss"] + ["loss"]
    local = [not bool(torch.isfinite(terms[k].detach()).all()) for k in keys]
    flags = local
    if run.ddp:
        total = all_reduce_sum(torch.tensor([float(f) for f in [cancel, *local]], dtype=torch.float64))
        reduced = [bool(v > 0) for v in total.tolist()]
        if reduced[0]:
            raise run.cancelled(epoch)
        flags = reduced[1:]
    bad = [k for k, f in zip(keys, flags) if f]
    if not bad:
        return
    term = bad[0]
    value = str(float(terms[term].detach().float().reshape(-1)[0])) if local[keys.index(term)] else "not finite on another process"
    last_good = run.history[-1]["epoch"] if run.history else 0
    kept = (
        f"The last good checkpoint (epoch {last_good}) is kept in {run.run_path}."
        if run.run_path is not None and last_good
        else "No checkpoint was written before it."
    )
    name = run.stage.name[0].upper() + run.stage.name[1:]
    message = f"{name} diverged at epoch {epoch}, batch {step}: the `{term}` term is {value}. {kept} {run.stage.advice}"
    if run.registry is not None:
        run.registry.set_status(run.run_id, "failed", error=message)
    raise CfdebugError(message)


def _report(run: _Run, row: dict, registry, run_id, progress) -> None:
    if registry is not None:
        registry.log_progress(run_id, row)
    if progress is not None:
        progress(
            row["epoch"] / run.epochs,
            f"epoch {row['epoch']}/{run.epochs}: loss {row['loss']:.4f}, "
            f"train acc {row['train_acc']:.3f}, val acc {row['val_acc']:.3f}, test acc {row['test_acc']:.3f}",
        )


# ---------------------------------------------------------------------------------- checkpoints
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


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s ``state_dict`` on the CPU (detached; never aliasing the live weights)."""
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


def _load_checkpoint(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CfdebugError(
            f"Cannot read the checkpoint {path}: {str(exc).splitlines()[0] if str(exc) else exc}. "
            "Delete the run directory and start the run again."
        ) from None


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
        "generator": ckpt.get("generator"),
        "epoch": int(ckpt["epoch"]),
        "history": list(ckpt["history"]),
        "best_epoch": int(ckpt["best_epoch"]),
        "best_state": _load_checkpoint(run_path / ckpt["best_file"]),
        "rng": ckpt["rng"],
    }


def _resume_state(run: _Run, identity: dict, resume: bool, is_main: bool) -> dict | None:
    """Rank 0 reads the checkpoint (``weights_only=True``) and sends it to the other processes."""
    state, error = None, None
    if run.run_path is not None and is_main:
        run.run_path.mkdir(parents=True, exist_ok=True)
        if resume:
            try:
                state = _read_resume(run.run_path, identity)
            except CfdebugError as exc:
                if not run.ddp:
                    raise
                error = str(exc)
    if run.ddp and run.run_path is not None and resume:
        error, state = broadcast_object((error, state))
    if error is not None:
        raise CfdebugError(error)
    return state


def _write_checkpoint(run: _Run, epoch: int, best_epoch: int, best_state: dict, identity: dict) -> None:
    run_path, stage = run.run_path, run.stage
    best_file = f"best-epoch{best_epoch}.pt"
    if not (run_path / best_file).is_file() or best_epoch == epoch:
        torch_save_atomic(best_state, run_path / best_file)
    best_row = next(r for r in run.history if r["epoch"] == best_epoch)
    payload = {
        "format": _CHECKPOINT_FORMAT,
        "identity": identity,
        "epoch": epoch,
        "model": cpu_state(stage.model),
        "optimizer": stage.optimizer.state_dict(),
        "rng": _rng_state(),
        "history": run.history,
        "best_epoch": best_epoch,
        "best_val_acc": best_row["val_acc"],
        "best_val_loss": best_row["val_loss"],
        "best_file": best_file,
    }
    if stage.generator is not None:
        payload["generator"] = stage.generator.get_state()
    torch_save_atomic(payload, run_path / CHECKPOINT_NAME)
    # Only after the checkpoint that names the new best file: older best files are now unused.
    for old in run_path.glob("best-epoch*.pt"):
        if old.name != best_file:
            old.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------- stage: plain training
@dataclass
class TrainResult:
    """The kept weights (best validation epoch), per-epoch history and final accuracies."""

    state_dict: dict
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    accuracy: dict[str, float] = field(default_factory=dict)


def _ce_terms(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"loss", "ce"}``: the batch-mean cross-entropy of ``logits`` [B, K] against ``labels`` [B]."""
    ce = F.cross_entropy(logits, labels)
    return {"loss": ce, "ce": ce}


def cross_entropy_loss(batch: "FinetuneBatch") -> dict[str, torch.Tensor]:
    """The default ``loss_fn`` of :func:`finetune`: plain batch-mean cross-entropy."""
    return _ce_terms(batch.logits, batch.labels)


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
        return StepOutput(_ce_terms(logits, y), len(y), (logits.argmax(1) == y).sum().item())

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
        for split in _SPLITS
    }
    return TrainResult(state_dict=run.best_state, history=run.history, best_epoch=run.best_epoch, accuracy=accuracy)


# ---------------------------------------------------------------------------------- stage: fine-tuning
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
    best-validation epoch's weights; ``history`` one row per epoch (see :func:`run_epochs`);
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


def _prepare(model: nn.Module, names: list[str]) -> list[nn.Parameter]:
    """Freeze everything outside ``names``; return the trainable parameters in model order."""
    trainable = []
    for pname, param in model.named_parameters():
        param.requires_grad_(is_within(pname.rsplit(".", 1)[0] if "." in pname else "", names))
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
        if name and not is_within(name, names) and not any(is_within(t, [name]) for t in names):
            module.eval()


def _loader_seed(seed: int, epoch: int) -> int:
    """The data-order seed of ``epoch``: a function of (seed, epoch) only, so resume is exact."""
    return int(stable_hash("finetune-data-order", int(seed), int(epoch)), 16) % (2**63 - 1)


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
            pooled = _pooled(cap.activations[target.name], target)  # [1, C]
            logits = pooled_head(pooled) if pooled_head is not None else out
            (logits.float().sum() + pooled.float().sum()).backward()
        unused = [p for p in params if p.grad is None]
    finally:
        for p in params:
            p.grad = None
        for m, mode in was_training.items():
            m.training = mode
    return unused


def _pooled(fmap: torch.Tensor, target) -> torch.Tensor:
    """``g(x)`` [B, C]: the global average of the (activated) target map [B, C, H, W]."""
    if fmap.dim() != 4:
        raise CfdebugError(f"The target layer {target.name!r} outputs shape {tuple(fmap.shape)}; expected a feature map [B, C, H, W].")
    if target.activation is not None:
        fmap = target.activation(fmap)
    return fmap.mean(dim=(2, 3))  # [B, C]


def _check_finetune_inputs(bundle, config, registry, run_id) -> None:
    for split in ("train", "val"):
        if len(bundle.splits[split]) == 0:
            raise CfdebugError(
                f"Expected a non-empty `{split}` split for fine-tuning, but it has no images. "
                "Model selection needs a validation split carved from the training set (`val_fraction` > 0)."
            )
    if (registry is None) != (run_id is None):
        raise CfdebugError("Expected both `registry` and `run_id`, or neither.")
    world = get_world_size() if is_distributed() else 1
    if config.batch_size % world:
        raise CfdebugError(
            f"Expected `batch_size` to be divisible by the number of processes ({world}) so that each gets "
            f"an equal share of every batch, but got {config.batch_size}. Use a multiple of {world} "
            f"(e.g. {-(-config.batch_size // world) * world}), or a number of processes that divides it."
        )


def _finetune_batches(bundle, config, ddp: bool) -> Callable[[int], Iterable]:
    """Epoch ``e``'s batches, drawn from a generator seeded with a hash of ``(config.seed, e)``
    (no loader state to restore on resume); under DDP this process's share of each."""

    def batches(epoch: int):
        generator = torch.Generator().manual_seed(_loader_seed(config.seed, epoch))
        if not ddp:
            return loader(bundle, "train", config.batch_size, shuffle=True, generator=generator)
        shares = _shard_batches(len(bundle.splits["train"]), config.batch_size, generator, get_rank(), get_world_size())
        # A private generator: the loader's base seed must not come from the global RNG.
        return torch.utils.data.DataLoader(bundle.torch_split("train"), batch_sampler=shares, generator=torch.Generator().manual_seed(0))

    return batches


def _finetune_stage(workspace, config, model: nn.Module, names: list[str], params: list, loss_fn, batch_transform, evaluate=None) -> Stage:
    """The fine-tuning stage: forward with the target map captured, ``g(x)``, dropout, pooled head,
    ``loss_fn``; under DDP the global-batch BatchNorm, dropout mask and the DDP wrapper."""
    device, bundle, target = torch.device(workspace.device), workspace.data, workspace.target
    ddp = is_distributed()
    rank, world = (get_rank(), get_world_size()) if ddp else (0, 1)
    head_names = [n for n, m in workspace.model.named_modules() if m is target.pooled_head] if target.pooled_head is not None else []
    pooled_head = dict(model.named_modules())[head_names[0]] if head_names else None
    dropout = nn.Dropout(config.dropout)
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if ddp:
        for p in _params_without_grad(model, target, pooled_head, bundle, device, params):
            p.requires_grad_(False)
    live: dict[str, Any] = {}  # the forward model (DDP-wrapped under torchrun) and the captured maps

    @contextmanager
    def scope():
        with global_batchnorm(model, names if ddp else ()):
            live["forward"] = wrap_ddp(model, device)  # broadcasts rank 0's parameters and buffers
            try:
                yield
            finally:
                live.clear()

    @contextmanager
    def epoch_scope():
        with capture(model, target.name, detach=False) as cap:
            live["cap"] = cap
            yield

    def step(batch, epoch: int, index: int) -> StepOutput:
        images, labels, indices = batch
        if batch_transform is not None:
            images, labels = batch_transform(images, labels, indices)
        images, labels = images.to(device), labels.to(device)
        out_logits = live["forward"](images)
        pooled = _pooled(live["cap"].activations[target.name], target)  # [B, C]
        if pooled_head is None:
            logits = out_logits
        elif ddp:
            rows = [len(pooled)] * world
            if batch_transform is not None:  # it may change the shard sizes
                rows = [int(r) for r in all_gather_object(len(pooled))]
            logits = pooled_head(_global_dropout(pooled, config.dropout, sum(rows[:rank]), sum(rows)))
        else:
            logits = pooled_head(dropout(pooled))
        terms = loss_fn(FinetuneBatch(images, labels, indices, logits, pooled, epoch, index, rank=rank, world_size=world))
        # The running training accuracy (train mode): the row's train_acc when `evaluate` reports none.
        return StepOutput(terms, len(labels), int((logits.detach().argmax(1) == labels).sum()))

    def train_mode() -> None:
        _set_train_mode(model, names)
        dropout.train()

    return Stage(
        name="fine-tuning", model=model, optimizer=optimizer, batches=_finetune_batches(bundle, config, ddp), step=step,
        evaluate=(lambda: evaluate(model)) if evaluate is not None else (lambda: evaluate_splits(model, bundle, device)),
        # Best validation accuracy; a tie (common on a small validation split) goes to the lower
        # validation loss, then to the earlier epoch. The test split never enters this choice.
        score=lambda row: (row["val_acc"], -row["val_loss"]),
        train_mode=train_mode, scope=scope, epoch_scope=epoch_scope, distributed=ddp,
        advice="Lower `lr` (or the λ weights) and start a new run.",
    )


def finetune(
    workspace,
    config,
    *,
    loss_fn: Callable[[FinetuneBatch], dict[str, torch.Tensor]] | None = None,
    batch_transform: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    fingerprint: dict | None = None,
    registry=None,
    run_id: str | None = None,
    progress: Progress | None = None,
    tag: dict | None = None,
) -> FinetuneResult:
    """Fine-tune a copy of ``workspace.model`` on the engine; keep the best validation epoch.

    Model selection: highest validation accuracy; ties go to the lower validation loss, then to
    the earlier epoch. The test split is evaluated and logged every epoch, never used to choose.

    ``workspace`` is a :class:`~cfdebug.workspace.Workspace` or any object with ``model``,
    ``data`` (a :class:`~cfdebug.data.DataBundle` with train/val/test), ``device``, ``target``
    and ``model_digest``. ``workspace.model`` is never modified (it is deep-copied).
    ``config``: :class:`~cfdebug.config.FinetuneConfig`, :class:`~cfdebug.config.TreatmentConfig`
    or any frozen dataclass with the same schedule fields; it is stored in every checkpoint.

    Per batch: ``images, labels = batch_transform(images, labels, indices)`` (XCR doubles the
    batch here; it must be deterministic or draw from its own seeded generator for resume to be
    exact), then a forward pass capturing the target map with its graph; ``g = GAP(activation(map))``
    [B, C]; with a pooled head ``logits = pooled_head(dropout(g))``, else ``logits =
    model(images)``; then ``loss_fn(FinetuneBatch)`` returns a dict with ``"loss"`` (what is
    back-propagated) and any further named terms (default: :func:`cross_entropy_loss`).
    The history rows (:func:`run_epochs`) hold the mean of each term over the epoch's batches,
    eval-mode accuracies on the whole splits and ``tag``.

    ``evaluate(model)`` replaces the epoch's evaluation (default :func:`evaluate_splits`): it returns
    ``val_acc``, ``val_loss`` and ``test_acc`` (the test split logged, never chosen on), optionally
    ``train_acc`` (else the running accuracy over the epoch's batches is logged) and any extras;
    the revise methods score ``val_acc`` on the validation split with the user's intervention
    applied (counterfactual validation).

    Checkpoints, resume, divergence, cancel: as in :func:`run_epochs`; resuming is refused if the
    stored config, base model, target, data or ``fingerprint`` differ. The data order of epoch
    ``e`` comes from a hash of ``(config.seed, e)``.

    **Data parallel** under ``torchrun`` (a process group of N > 1): every process calls
    ``finetune`` with the same arguments and gets the same :class:`FinetuneResult`; see the
    module docstring for how the run then matches the single-process one.
    """
    check_schedule(config)
    bundle, target = workspace.data, workspace.target
    _check_finetune_inputs(bundle, config, registry, run_id)
    names = trainable_modules(workspace.model, target, config.trainable)
    model = copy.deepcopy(workspace.model).to(workspace.device)
    params = _prepare(model, names)
    if not params:
        raise CfdebugError(f"The modules {names} have no parameters to fine-tune; choose another `trainable`.")
    stage = _finetune_stage(workspace, config, model, names, params, loss_fn or cross_entropy_loss, batch_transform, evaluate)
    identity = {
        "kind": type(config).__name__,
        "config": config_dict(config),
        "base_model": workspace.model_digest,
        "target": target.name,
        "data": getattr(bundle, "fingerprint", None),
        "fingerprint": fingerprint or {},
    }
    seed_everything(config.seed)
    run = run_epochs(
        stage, config.epochs, run_dir=run_dir, resume=resume, identity=identity, registry=registry, run_id=run_id,
        progress=progress, tag=tag,
    )
    if stage.distributed:
        # A fresh copy: nothing of the DDP wrapper (its gradient hooks) stays on the returned model.
        model = copy.deepcopy(workspace.model).to(workspace.device)
    model.load_state_dict(run.best_state)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return FinetuneResult(
        state_dict=run.best_state,
        model=model,
        history=run.history,
        best_epoch=run.best_epoch,
        accuracy={s: run.best_row[f"{s}_acc"] for s in _SPLITS},
        resumed_from=run.resumed_from,
        trainable=names,
        trainable_parameters=sum(p.numel() for p in params),
        world_size=get_world_size() if stage.distributed else 1,
    )
