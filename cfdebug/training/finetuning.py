"""The fine-tuning stage: a copy of a workspace's model trained on the engine with a given loss.

Treatment and its cross-entropy control (:mod:`cfdebug.treatment`) and XCR's counterfactual and
vanilla retraining (:mod:`cfdebug.xcr.retrain`) are :func:`finetune` with their own ``loss_fn``
(and, for XCR, a ``batch_transform``). What trains is chosen by :func:`trainable_modules` (the
target block and the head by default); the loss sees the logits and ``g(x)``, the pooled
target-layer output, through :class:`FinetuneBatch`.

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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TRAINABLE_CHOICES, check_schedule, config_dict
from ..distributed import all_gather_object, get_rank, get_world_size, global_batchnorm, is_distributed, is_within, wrap_ddp
from ..errors import CfdebugError
from ..hooks import capture
from ..runtime import Progress, seed_everything
from ..store import stable_hash
from .engine import Stage, StepOutput, run_epochs
from .predictions import SPLITS, evaluate_splits, loader

__all__ = ["FinetuneBatch", "FinetuneResult", "cross_entropy_loss", "weighted_terms", "trainable_modules", "finetune"]


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


def weighted_terms(ce: torch.Tensor, terms: dict[str, tuple[float, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A fine-tuning loss as a dict of terms: ``{"loss", "ce", <term>, "w_<term>", "share_<term>"}``
    from the cross-entropy and ``{name: (λ, raw value)}``: ``loss = ce + Σ λ·value`` (a negative λ
    rewards the term), ``w_<term> = λ·value`` and ``share_<term> = |λ·value| / (|ce| + Σ|λ·value|)``
    (detached: logged, not trained). The engine averages every term over an epoch, so a history row
    says how much of the loss each weighted term was: a term at 0.01% of it cannot move the model."""
    out = {"ce": ce}
    weighted = {name: float(lam) * value for name, (lam, value) in terms.items()}
    total = ce + sum(weighted.values()) if weighted else ce
    scale = ce.detach().abs() + sum(w.detach().abs() for w in weighted.values())
    for name, (_, value) in terms.items():
        out[name] = value
        out[f"w_{name}"] = weighted[name]
        out[f"share_{name}"] = weighted[name].detach().abs() / scale.clamp_min(1e-12)
    out["loss"] = total
    return out


def cross_entropy_loss(batch: FinetuneBatch) -> dict[str, torch.Tensor]:
    """The default ``loss_fn`` of :func:`finetune`: ``{"loss", "ce"}``, the batch-mean
    cross-entropy of ``batch.logits`` [B, K] against ``batch.labels`` [B]."""
    ce = F.cross_entropy(batch.logits, batch.labels)
    return {"loss": ce, "ce": ce}


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
        accuracy={s: run.best_row[f"{s}_acc"] for s in SPLITS},
        resumed_from=run.resumed_from,
        trainable=names,
        trainable_parameters=sum(p.numel() for p in params),
        world_size=get_world_size() if stage.distributed else 1,
    )
