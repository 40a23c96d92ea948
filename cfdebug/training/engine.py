"""The training engine: one epoch loop for every stage that trains weights.

Five things train in cfdebug: the demo model (:func:`~cfdebug.training.classifier.train_classifier`),
a treatment run and its cross-entropy control (:func:`~cfdebug.training.finetuning.finetune`,
called by :mod:`cfdebug.treatment`), XCR's counterfactual and vanilla retraining (``finetune``
again, through :mod:`cfdebug.xcr.retrain`), the XCR selector
(:func:`cfdebug.xcr.selector.train_selector`) and the CFE heads (:mod:`cfdebug.cfe.fitting`).
All of them run on :func:`run_epochs`, which owns what they share:

* the epoch loop (per batch: cancel poll, the stage's step, the non-finite check, backward,
  optimizer step), resumable from a checkpoint after any epoch
  (:mod:`~cfdebug.training.checkpoints`);
* one history row per epoch with the same keys for every stage (:data:`HISTORY_KEYS`, plus one
  mean per loss term, plus a stage's extras);
* one divergence check naming epoch, batch and term; one cancel hook (the run registry's flag
  and a ``should_stop`` callable, polled between batches);
* progress per epoch, and per batch within an epoch longer than :data:`BATCH_REPORT_S`;
* checkpoints (model, optimizer, RNG streams, history, best epoch; written atomically) with an
  exact resume, and model selection on the validation split (the test split is evaluated and
  logged, never used to choose);
* data parallelism under ``torchrun`` for a stage that asks for it (``finetune`` does).

A stage (:class:`Stage`) supplies only what differs: what trains (the module and its
optimizer), how an epoch's batches are drawn, the step (forward pass and the loss, a dict of
terms), how an epoch is evaluated and how epochs are compared.

**Stages without a validation split.** The CFE heads are fitted on the training features alone:
there is nothing to evaluate and no epoch to choose. Such a stage says so with ``evaluate=None``
and ``score=None``: its rows hold :data:`UNEVALUATED_HISTORY_KEYS` (no accuracy, no validation
loss: nothing was measured, so nothing is reported) and the last epoch is kept. Its loss terms
may be batch *sums* (``term_mean="sum"``: the row holds the per-sample mean over the epoch), and
its step may back-propagate itself, block by block, when one batch's graph would not fit in
memory at once (``accumulates_gradients=True``: the engine zeroes the gradients before the step,
checks the terms after it and then steps the optimizer; the non-finite check still comes before
the optimizer step, so a diverged batch never reaches the weights).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable

import torch
from torch import nn

from ..distributed import all_reduce_sum, barrier, broadcast_object, get_rank, get_world_size, is_distributed
from ..errors import CfdebugError
from ..runs import RunCancelled
from ..runtime import Progress
from .checkpoints import cpu_state, resume_state, set_rng_state, write_checkpoint

__all__ = [
    "HISTORY_KEYS",
    "UNEVALUATED_HISTORY_KEYS",
    "BATCH_REPORT_S",
    "StepOutput",
    "Stage",
    "EngineResult",
    "run_epochs",
]

#: The keys of every history row of a stage that evaluates, whatever the stage. Besides them a
#: row holds the epoch mean of each loss term the stage's step returns (``"loss"`` always;
#: ``"ce"``, ``"mc"``, ``"kl"`` …), a caller's ``tag`` and a stage's extra scores (the selector's
#: ``val_acc_softmax``).
HISTORY_KEYS = (
    "epoch", "loss", "train_acc", "val_acc", "test_acc", "val_loss",
    "best_epoch", "best_val_acc", "train_seconds", "eval_seconds",
)  # fmt: skip

#: The keys of every history row of a stage with ``evaluate=None`` (the CFE heads' fit), besides
#: its loss terms (and ``train_acc`` when its step counts correct predictions).
UNEVALUATED_HISTORY_KEYS = ("epoch", "loss", "best_epoch", "train_seconds")

_EVALUATED = ("val_acc", "test_acc", "val_loss")  # what an evaluating stage must report
_TERM_MEANS = ("batch", "sample", "sum")

#: Seconds between two within-epoch progress reports (an epoch shorter than this reports only at
#: its end, as before; a long one, e.g. a torchvision model on CPU, shows its batches moving so a
#: time left can be measured before the first epoch ends).
BATCH_REPORT_S = 5.0


@dataclass
class StepOutput:
    """What a stage's step returns for one batch.

    ``terms``: ``{"loss": …, <term>: …}`` 0-d tensors (``loss`` is back-propagated unless the
    stage ``accumulates_gradients``, every term is logged); ``size``: the batch's sample count;
    ``correct``: how many of its predictions were right, for a running training accuracy
    (``None`` when the stage's ``evaluate`` reports ``train_acc`` itself, or nothing does).
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
            epoch, in eval mode; it must not use the test split to choose anything. ``None``: the
            stage has nothing to evaluate on (its rows hold :data:`UNEVALUATED_HISTORY_KEYS`).
        score: ``row → tuple``; the epoch with the highest score is kept, the earlier one on ties
            (default: validation accuracy alone). ``None``: keep the last epoch (required when
            ``evaluate`` is ``None``).
        train_mode: puts the trainable modules in train mode before an epoch (default
            ``model.train()``).
        generator: the torch generator ``batches`` draws from, if it continues across epochs;
            its state is checkpointed so a resume draws the same batches.
        term_mean: how a row averages each term over the epoch's batches: ``"batch"`` (terms are
            batch means; mean over the batches), ``"sample"`` (batch means weighted by ``size``)
            or ``"sum"`` (terms are batch sums; their total over the epoch's sample count).
        accumulates_gradients: the step back-propagates itself (several backward passes whose
            gradients add up, e.g. over blocks of one batch) and returns detached terms; the
            engine zeroes the gradients before the step and does not call ``backward``.
        scope: entered around all epochs (DDP wrapping); ``epoch_scope`` around each epoch's
            batches (the capture hooks).
        distributed: train data-parallel when a ``torch.distributed`` group of N > 1 is active
            (the step must then shard the batch; see :func:`~cfdebug.training.finetuning.finetune`).
        advice: the end of the divergence message: what to change.
    """

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: Callable[[int], Iterable]
    step: Callable[[Any, int, int], StepOutput]
    evaluate: Callable[[], dict[str, float]] | None
    score: Callable[[dict], tuple] | None = _val_acc
    train_mode: Callable[[], None] | None = None
    generator: torch.Generator | None = None
    term_mean: str = "batch"
    accumulates_gradients: bool = False
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


def _check_stage(stage: Stage) -> None:
    """Programming errors in a stage's definition (not a user's mistake: ``TypeError``)."""
    if stage.term_mean not in _TERM_MEANS:
        raise TypeError(f"Expected `term_mean` to be one of {', '.join(_TERM_MEANS)}, but got {stage.term_mean!r}.")
    if stage.evaluate is None and stage.score is not None:
        raise TypeError(f"The {stage.name} stage evaluates nothing, so it has no score to choose an epoch by: pass `score=None` (keep the last epoch).")


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
    the checkpoint's RNG states replace them. Per epoch a row (:data:`HISTORY_KEYS`, or
    :data:`UNEVALUATED_HISTORY_KEYS`, the loss terms, ``tag``) goes to ``history``,
    ``registry.log_progress(run_id, row)`` and ``progress(epoch / epochs, message)``.

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
    _check_stage(stage)
    ddp = stage.distributed and is_distributed()
    is_main = not ddp or get_rank() == 0
    if not is_main:
        registry, progress = None, None  # rank 0 alone reports; it also decides on cancels
    run = _Run(stage, epochs, ddp, Path(run_dir) if run_dir is not None else None, registry, run_id, should_stop, progress)
    state = resume_state(run.run_path, identity or {}, resume, is_main=is_main, ddp=ddp)
    best_epoch, best_state, start = 0, None, 0
    if state is not None:
        stage.model.load_state_dict(state["model"])
        stage.optimizer.load_state_dict(state["optimizer"])
        if stage.generator is not None:
            stage.generator.set_state(state["generator"])
        start, run.history, best_epoch, best_state = state["epoch"], state["history"], state["best_epoch"], state["best_state"]
        set_rng_state(state["rng"])  # last, so nothing above draws from the restored streams
    with stage.scope():
        for epoch in range(start + 1, epochs + 1):
            row, seconds = _epoch(run, epoch)
            best_epoch, best_state, best_row = _select(run, epoch, row, best_epoch, best_state)
            row["best_epoch"] = best_epoch
            if stage.evaluate is not None:
                row["best_val_acc"] = best_row["val_acc"]
            row.update(**seconds, **(tag or {}))
            run.history.append(row)
            if run.run_path is not None and is_main:
                write_checkpoint(
                    run.run_path, epoch=epoch, model=stage.model, optimizer=stage.optimizer, generator=stage.generator,
                    history=run.history, best_epoch=best_epoch, best_state=best_state, identity=identity or {},
                )
            _report(run, row, registry, run_id, progress)
    if ddp:
        barrier()  # no process returns before rank 0's last checkpoint is on disk
    if best_state is None:  # every epoch was already done before a resume with nothing left
        raise CfdebugError(f"The checkpoint in {run.run_path} has no best state; start the run again without resume.")
    return EngineResult(history=run.history, best_epoch=best_epoch, best_state=best_state, resumed_from=start)


def _select(run: _Run, epoch: int, row: dict, best_epoch: int, best_state: dict | None) -> tuple[int, dict | None, dict]:
    """Model selection after ``epoch``: ``(kept epoch, its CPU weights, its row)``.

    With a score, the higher score wins and a tie keeps the earlier epoch (under DDP every
    process computed the same numbers and rank 0's decision is the one kept). Without one the
    last epoch is kept; its weights are copied only when a checkpoint needs them or the run ends
    (a CFE fit's heads are large, and a copy per epoch would serve nothing).
    """
    stage = run.stage
    best_row = next((r for r in run.history if r["epoch"] == best_epoch), None)
    if stage.score is not None:
        improved = best_row is None or stage.score(row) > stage.score(best_row)
        if run.ddp:
            improved = broadcast_object(improved)
        if not improved:
            return best_epoch, best_state, best_row
        return epoch, cpu_state(stage.model), row
    needed = run.run_path is not None or epoch == run.epochs
    return epoch, cpu_state(stage.model) if needed else None, row


def _epoch(run: _Run, epoch: int) -> tuple[dict, dict[str, float]]:
    """Train one epoch and evaluate it: the row so far (epoch, terms, scores) and the seconds."""
    t0 = time.perf_counter()
    means, train_acc = _train_epoch(run, epoch)
    seconds = {"train_seconds": time.perf_counter() - t0}
    row = {"epoch": epoch, **means}
    if train_acc is not None:
        row["train_acc"] = train_acc
    if run.stage.evaluate is None:
        return row, seconds
    t1 = time.perf_counter()
    row.update(run.stage.evaluate())
    missing = [k for k in ("loss", "train_acc", *_EVALUATED) if k not in row]
    if missing:
        raise TypeError(f"The {run.stage.name} stage reports no {', '.join(missing)} (see HISTORY_KEYS).")
    return row, {**seconds, "eval_seconds": time.perf_counter() - t1}


def _train_epoch(run: _Run, epoch: int) -> tuple[dict[str, float], float | None]:
    """One pass over the epoch's batches: ``(mean of each loss term, running accuracy or None)``."""
    stage = run.stage
    (stage.train_mode or stage.model.train)()
    sums: dict[str, float] = {}
    batches = samples = correct = seen = 0
    batch_iter = stage.batches(epoch)
    reporter = _BatchReporter(run, epoch, len(batch_iter) if hasattr(batch_iter, "__len__") else None)
    with stage.epoch_scope():
        for index, batch in enumerate(batch_iter):
            cancel = run.stop_requested()
            if cancel and not run.ddp:
                raise run.cancelled(epoch)
            stage.optimizer.zero_grad(set_to_none=True)
            out = stage.step(batch, epoch, index)
            _check_terms(run, out.terms, cancel, epoch, index)
            if not stage.accumulates_gradients:
                out.terms["loss"].backward()
            stage.optimizer.step()
            w = out.size if stage.term_mean == "sample" else 1
            for key, value in out.terms.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach()) * w
            batches, samples = batches + 1, samples + out.size
            if out.correct is not None:
                correct, seen = correct + out.correct, seen + out.size
            reporter(index)
    if run.ddp and sums:  # the mean over processes of each term's epoch sum
        keys = sorted(sums)
        reduced = all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64)) / get_world_size()
        sums = dict(zip(keys, reduced.tolist()))
        if seen:
            correct, seen = (int(v) for v in all_reduce_sum(torch.tensor([correct, seen], dtype=torch.float64)).tolist())
    denominator = max(batches, 1) if stage.term_mean == "batch" else samples
    return {k: v / denominator for k, v in sums.items()}, (correct / seen if seen else None)


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
        scores = [f"{label} {row[key]:.3f}" for key, label in (("train_acc", "train acc"), ("val_acc", "val acc"), ("test_acc", "test acc")) if key in row]
        progress(row["epoch"] / run.epochs, ", ".join([f"epoch {row['epoch']}/{run.epochs}: loss {row['loss']:.4f}", *scores]))
