"""Device and seed, chosen once per process (``--device auto|cpu|cuda``)."""

from __future__ import annotations

import random
from typing import Callable

import numpy as np
import torch

from .errors import CfdebugError

DEVICE_CHOICES = ("auto", "cpu", "cuda")

Progress = Callable[[float, str], None]
"""The one progress type: ``progress(fraction in [0, 1], message)``."""


def scaled_progress(progress: Progress | None, lo: float, hi: float, prefix: str = "") -> Progress | None:
    """Map a stage's progress in [0, 1] onto [lo, hi] of the caller's bar (``None`` stays ``None``)."""
    if progress is None:
        return None

    def inner(fraction: float, message: str) -> None:
        progress(lo + (hi - lo) * min(max(fraction, 0.0), 1.0), prefix + message)

    return inner


def resolve_device(name: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda[:N]`` into a ``torch.device``; ``auto`` takes CUDA when there is one."""
    kind = name.split(":", 1)[0]
    if kind not in DEVICE_CHOICES:
        raise CfdebugError(
            f"Expected `--device` to be one of {', '.join(DEVICE_CHOICES)}, but got {name!r}."
        )
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise CfdebugError(
            "You asked for `--device cuda`, but PyTorch sees no CUDA GPU on this machine. "
            "Use `--device auto` or `--device cpu`."
        )
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator for data loaders."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator
