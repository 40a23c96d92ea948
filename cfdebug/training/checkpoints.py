"""A run's checkpoint files: written atomically after every epoch, read back for an exact resume.

``run_dir/checkpoint.pt`` holds the model and optimizer state, the RNG states of torch, NumPy
and Python (and CUDA) and of a stage's batch generator, the history, the kept epoch and the
run's ``identity`` (what it was made from; a resume with another identity is refused, naming
what changed). The kept epoch's weights are ``run_dir/best-epoch<N>.pt``. Everything is read
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..distributed import broadcast_object
from ..errors import CfdebugError
from ..store import torch_save_atomic

__all__ = ["CHECKPOINT_NAME", "cpu_state", "set_rng_state", "resume_state", "write_checkpoint"]

CHECKPOINT_NAME = "checkpoint.pt"
_CHECKPOINT_FORMAT = 1


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


def set_rng_state(state: dict) -> None:
    """Restore the global RNG streams a checkpoint saved (torch, NumPy, Python, CUDA if present)."""
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


def resume_state(run_path: Path | None, identity: dict, resume: bool, *, is_main: bool, ddp: bool) -> dict | None:
    """The state to continue from, or ``None`` (no ``run_dir``, no ``resume``, no checkpoint yet).

    Creates ``run_path``. Rank 0 reads the checkpoint (``weights_only=True``) and, under DDP,
    sends it (or its error) to the other processes, so every process raises or resumes together.
    """
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
        error, state = broadcast_object((error, state))
    if error is not None:
        raise CfdebugError(error)
    return state


def write_checkpoint(
    run_path: Path,
    *,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator | None,
    history: list[dict],
    best_epoch: int,
    best_state: dict[str, torch.Tensor],
    identity: dict,
) -> None:
    """Write ``best-epoch<best_epoch>.pt`` (when new) and then ``checkpoint.pt`` after ``epoch``,
    each atomically; the best files of earlier epochs go once the checkpoint names the new one."""
    best_file = f"best-epoch{best_epoch}.pt"
    if not (run_path / best_file).is_file() or best_epoch == epoch:
        torch_save_atomic(best_state, run_path / best_file)
    best_row = next(r for r in history if r["epoch"] == best_epoch)
    payload = {
        "format": _CHECKPOINT_FORMAT,
        "identity": identity,
        "epoch": epoch,
        "model": cpu_state(model),
        "optimizer": optimizer.state_dict(),
        "rng": _rng_state(),
        "history": history,
        "best_epoch": best_epoch,
        "best_val_acc": best_row.get("val_acc"),  # None for a stage that does not evaluate
        "best_val_loss": best_row.get("val_loss"),
        "best_file": best_file,
    }
    if generator is not None:
        payload["generator"] = generator.get_state()
    torch_save_atomic(payload, run_path / CHECKPOINT_NAME)
    # Only after the checkpoint that names the new best file: older best files are now unused.
    for old in run_path.glob("best-epoch*.pt"):
        if old.name != best_file:
            old.unlink(missing_ok=True)
