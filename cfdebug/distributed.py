"""Multi-process data parallelism through ``torch.distributed`` (DDP, launched with ``torchrun``).

``torchrun --nproc_per_node=N -m cfdebug treat …`` starts N copies of the same command with
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in the
environment. :func:`init_distributed` reads them once per process, joins the process group
(``nccl`` on CUDA, ``gloo`` on CPU) and picks the process's device (``cuda:{LOCAL_RANK}`` on a
GPU box); without ``WORLD_SIZE`` > 1 it returns a single-process context and starts nothing, so
every caller can use the same code path.

The helpers below are no-ops (or identities) in a single process, so library code calls them
unconditionally. Collectives must be entered by *every* process in the same order; a helper that
only some processes reach hangs the job (until the process group's timeout).

:class:`GlobalBatchNorm` / :func:`global_batchnorm` make the trainable BatchNorm layers use the
statistics of the *global* batch (all processes), as the single-process run does.
``nn.SyncBatchNorm`` does that on CUDA only (it refuses CPU tensors, so it cannot be used with
gloo); this is the same computation written with one all-reduce forward and one backward, which
works with any backend.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .errors import CfdebugError
from .runtime import resolve_device

__all__ = [
    "DistContext",
    "init_distributed",
    "shutdown",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "all_reduce_mean",
    "all_reduce_sum",
    "broadcast_object",
    "all_gather_object",
    "main_first",
    "wrap_ddp",
    "differentiable_all_reduce_sum",
    "GlobalBatchNorm",
    "global_batchnorm",
    "is_within",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job: ``rank`` in ``0..world_size-1``, ``local_rank`` on
    its node, and the ``device`` it computes on. ``is_main`` (rank 0) is the only process that
    writes files, the run registry and progress."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        if default is None:
            raise CfdebugError(
                f"Expected the environment variable {name} (set by torchrun) because WORLD_SIZE is "
                f"{os.environ.get('WORLD_SIZE')!r}, but it is not set. Launch with `torchrun --nproc_per_node=N -m cfdebug …`."
            )
        return default
    try:
        return int(value)
    except ValueError:
        raise CfdebugError(f"Expected the environment variable {name} to be an integer, but got {value!r}.") from None


def init_distributed(device_arg: str = "auto") -> DistContext:
    """Join the ``torchrun`` process group if there is one; choose this process's device.

    Args:
        device_arg: ``auto|cpu|cuda[:N]`` as given to ``--device``. Under torchrun with a CUDA
            device the index is replaced by ``LOCAL_RANK`` (one GPU per process).

    Returns:
        A :class:`DistContext`. With ``WORLD_SIZE`` unset or 1: rank 0 of 1, the device from
        :func:`~cfdebug.runtime.resolve_device`, no process group. Otherwise the process group is
        initialised (``nccl`` for CUDA, ``gloo`` for CPU; idempotent: an existing group is reused)
        and, on CUDA, ``torch.cuda.set_device(cuda:{LOCAL_RANK})`` is called.
    """
    world = _env_int("WORLD_SIZE", 1)
    device = resolve_device(device_arg)
    if world <= 1:
        return DistContext(device=device)
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK", 0)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise CfdebugError(
                f"torchrun started process {local_rank} on this node, but PyTorch sees only {count} CUDA "
                f"GPU(s). Use `--nproc_per_node={count}` (one process per GPU), or `--device cpu`."
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        try:
            dist.init_process_group(backend=backend, **kwargs)
        except (ValueError, RuntimeError) as exc:
            raise CfdebugError(
                f"Could not join the torch.distributed process group (backend {backend}, rank {rank} of "
                f"{world}): {str(exc).splitlines()[0] if str(exc) else exc}. Launch with `torchrun` (it sets "
                "MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE)."
            ) from None
    elif dist.get_world_size() != world:
        raise CfdebugError(
            f"A process group of size {dist.get_world_size()} already exists, but WORLD_SIZE is {world}."
        )
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device, backend=dist.get_backend())


def shutdown() -> None:
    """Leave and destroy the process group (no-op without one). Call once, at the end of the command.

    Every rank waits at a barrier first: rank 0 goes on alone after the collective work (detection
    on the treated model, writing the result), and a rank that destroyed its gloo group while
    rank 0 was still connected aborted (``terminate called without an active exception``).
    """
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            try:
                dist.barrier()
            except RuntimeError:  # a rank already gone: nothing left to wait for
                pass
        dist.destroy_process_group()


def is_distributed() -> bool:
    """Whether a process group with more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait until every process gets here (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def _collective_device() -> torch.device:
    # nccl reduces CUDA tensors only; gloo CPU tensors (it has CUDA support too, but CPU is the norm).
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(tensor: torch.Tensor, op) -> torch.Tensor:
    out = tensor.detach().to(_collective_device(), copy=True)
    dist.all_reduce(out, op=op)
    return out.to(tensor.device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all processes (a new tensor on ``tensor.device``;
    the input is not modified). Identity (a detached copy) in a single process."""
    if not is_distributed():
        return tensor.detach().clone()
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of ``tensor`` (floating point) over all processes; a new tensor."""
    if not is_distributed():
        return tensor.detach().clone()
    return _all_reduce(tensor, dist.ReduceOp.SUM) / dist.get_world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of process ``src`` on every process (pickled; for small control data and state
    that this job's own rank ``src`` produced, never for files from elsewhere)."""
    if not is_distributed():
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, …]`` on every process (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@contextmanager
def main_first() -> Iterator[None]:
    """Run the body on rank 0 first, then on the other ranks (e.g. building a workspace: rank 0
    trains or extracts and fills the cache, the others then read it instead of redoing the work).
    If the body fails on rank 0, the exception propagates there and the other ranks block until
    the process group times out or torchrun stops them."""
    if is_distributed() and get_rank() != 0:
        dist.barrier()
    yield
    if is_distributed() and get_rank() == 0:
        dist.barrier()


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` for this process's ``device`` (``device_ids`` on CUDA,
    none on CPU), ``find_unused_parameters=False``: every parameter that requires a gradient must
    get one in every step (freeze the others first). Construction broadcasts rank 0's parameters
    and buffers. Returns ``model`` itself in a single process."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    kwargs = {}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        kwargs = {"device_ids": [index], "output_device": index}
    return DistributedDataParallel(model, find_unused_parameters=False, **kwargs)


class _AllReduceSum(torch.autograd.Function):
    """``y = Σ_ranks x``; the gradient of ``Σ_ranks L_rank`` w.r.t. each rank's ``x`` is ``Σ_ranks ∂L/∂y``."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = tensor.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = grad.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out


def differentiable_all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes that autograd differentiates (one all-reduce forward, one backward).
    Identity in a single process. The tensor must be on the backend's device (CPU for gloo)."""
    if not is_distributed():
        return tensor
    return _AllReduceSum.apply(tensor)


class GlobalBatchNorm(nn.Module):
    """A BatchNorm layer normalising with the statistics of the *global* batch (all processes).

    Built from an existing ``nn.BatchNorm1d/2d/3d`` and sharing its parameter and buffer tensors
    (so training it trains the original, and ``state_dict`` keys are the same). In training mode,
    per channel: the shifted sums ``Σ(x − s)``, ``Σ(x − s)²`` and the count are summed over the
    processes in one differentiable all-reduce (``s`` = the running mean, identical on every
    process, keeps the variance free of cancellation); ``y = (x − mean)/sqrt(var + eps)·w + b``
    with the biased variance, and the running statistics are updated as ``F.batch_norm`` does
    (unbiased variance, ``momentum`` or the cumulative average when it is ``None``). In eval mode
    it is ``F.batch_norm`` with the running statistics, no communication. With equal shards this
    matches single-process BatchNorm on the whole batch up to float rounding; unlike
    ``nn.SyncBatchNorm`` it runs on CPU (gloo) as well as CUDA.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.num_features, self.eps, self.momentum = bn.num_features, bn.eps, bn.momentum
        self.affine, self.track_running_stats = bn.affine, bn.track_running_stats
        self.register_parameter("weight", bn.weight)
        self.register_parameter("bias", bn.bias)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(bn, name))
        self.train(bn.training)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, C, *]`` → same shape."""
        batch_stats = self.training or self.running_mean is None
        if not batch_stats:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        factor = 0.0
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        if not is_distributed():
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, factor, self.eps)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        shift = self.running_mean.detach().to(acc).clone() if self.running_mean is not None else x.new_zeros(c, dtype=acc)
        xs = x.to(acc) - shift.view(shape)
        count = xs.new_full((1,), float(x.numel() // c))
        stats = differentiable_all_reduce_sum(torch.cat([xs.sum(dims), (xs * xs).sum(dims), count]))  # [2C + 1]
        n = stats[-1].detach()
        m1, m2 = stats[:c] / n, stats[c : 2 * c] / n
        var = (m2 - m1 * m1).clamp_min(0.0)  # [C] biased, over the global batch
        mean = shift + m1
        y = (x.to(acc) - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if factor and self.running_mean is not None:
            with torch.no_grad():
                unbiased = var.detach() * (n / (n - 1)) if n > 1 else var.detach()
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return y.to(x.dtype)


def is_within(name: str, roots: Sequence[str]) -> bool:
    """Whether module ``name`` is one of ``roots`` or inside one (``""`` is the whole model)."""
    return any(r == "" or name == r or name.startswith(r + ".") for r in roots)


@contextmanager
def global_batchnorm(model: nn.Module, within: Sequence[str] = ("",)) -> Iterator[list[str]]:
    """Swap the BatchNorm layers of ``model`` under the module names ``within`` (``""`` = all)
    for :class:`GlobalBatchNorm` sharing their tensors; put the originals back on exit (also on
    an exception). Yields the swapped names. In a single process nothing is swapped."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    names: list[str] = []
    try:
        if is_distributed():
            for name, module in list(model.named_modules()):
                if (
                    name
                    and is_within(name, within)
                    and isinstance(module, nn.modules.batchnorm._BatchNorm)
                    and not isinstance(module, nn.SyncBatchNorm)
                ):
                    parent_name, _, child = name.rpartition(".")
                    parent = model.get_submodule(parent_name) if parent_name else model
                    setattr(parent, child, GlobalBatchNorm(module))
                    swapped.append((parent, child, module))
                    names.append(name)
        yield names
    finally:
        for parent, child, module in reversed(swapped):
            module.train(getattr(parent, child).training)
            setattr(parent, child, module)
