"""Device and seed, chosen once per process (``--device auto|cpu|cuda``)."""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch

from .config import DEVICE_CHOICES
from .errors import CfdebugError

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


@contextmanager
def fixed_threads(threads: int = 1, deterministic: bool = True) -> Iterator[None]:
    """Run the body with ``threads`` intra-op CPU threads and, if ``deterministic``, with
    ``torch.use_deterministic_algorithms(True)``; both settings are restored afterwards.

    The order of a parallel reduction (conv backward, matmul) depends on the thread count, so
    the same seed gives different weights on a 1-core and a 2-core machine unless it is fixed.
    Both settings are process-wide: another thread of the process (a second dashboard session)
    runs with them too while the body runs. Deterministic algorithms need a cuBLAS workspace
    setting on CUDA, so callers ask for them on CPU only.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise CfdebugError(f"Expected `threads` to be a positive integer, but got {threads!r}.")
    old_threads = torch.get_num_threads()
    old_deterministic = torch.are_deterministic_algorithms_enabled()
    old_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    try:
        if deterministic:
            torch.use_deterministic_algorithms(True)
        yield
    finally:
        torch.use_deterministic_algorithms(old_deterministic, warn_only=old_warn_only)
        torch.set_num_threads(old_threads)
