"""Argument conversion and validation shared by the metrics (package-private).

Every metric accepts ``torch.Tensor`` (any device; detached and copied to the CPU) or ``numpy``
arrays (or nested lists) and computes in float64 numpy; a user mistake raises
:class:`cfdebug.errors.CfdebugError` in torchmetrics' form.
"""

from __future__ import annotations

import numbers
import sys
from typing import Any

import numpy as np

from ..errors import CfdebugError

# Rows of a float16/float32 softmax sum to 1 only up to rounding; this is generous enough for
# those and still catches logits or unnormalised scores passed by mistake.
ROW_SUM_ATOL = 1e-3


# --------------------------------------------------------------------------------------------
# Conversion and validation
# --------------------------------------------------------------------------------------------


def to_numpy(x: Any, name: str) -> np.ndarray:
    """Return ``x`` as a numpy array without modifying it (may share memory: never write)."""
    torch = sys.modules.get("torch")  # a tensor can only exist if torch is already imported
    if torch is not None and isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):  # numpy has no bfloat16
            t = t.float()
        return t.numpy()
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (str, bytes, dict, set)) or x is None:
        raise CfdebugError(
            f"Expected `{name}` to be a torch.Tensor or numpy array, but got {type(x).__name__}"
        )
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise CfdebugError(
            f"Expected `{name}` to be a torch.Tensor or numpy array, but got {type(x).__name__} "
            f"that numpy cannot convert ({exc})"
        ) from None
    if arr.dtype == object:
        raise CfdebugError(
            f"Expected `{name}` to be a torch.Tensor or numpy array, but got {type(x).__name__} "
            "of ragged or non-numeric values"
        )
    return arr


def is_real_numeric(arr: np.ndarray) -> bool:
    return arr.dtype != np.bool_ and (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    )


def fmt(v: float) -> str:
    return f"{v:.6g}"


def check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise CfdebugError(f"Expected `{name}` to be a positive integer, but got {value!r}")
    return int(value)


def check_probs(x: Any, name: str = "probs") -> np.ndarray:
    """Validate ``[N, K]`` probabilities and return them as a float64 copy."""
    arr = to_numpy(x, name)
    expected = f"Expected `{name}` to have shape [N, K] with rows summing to 1"
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise CfdebugError(f"{expected}, but got shape {tuple(arr.shape)}")
    if not is_real_numeric(arr):
        raise CfdebugError(f"{expected}, but got dtype {arr.dtype}")
    p = arr.astype(np.float64)  # copy: callers' arrays are never touched
    if not np.all(np.isfinite(p)):
        raise CfdebugError(f"{expected}, but got NaN or infinite values")
    lo, hi = float(p.min()), float(p.max())
    if lo < 0.0 or hi > 1.0 + ROW_SUM_ATOL:
        raise CfdebugError(
            f"Expected `{name}` to hold probabilities in [0, 1], but got values in "
            f"[{fmt(lo)}, {fmt(hi)}] (pass softmax outputs, not logits)"
        )
    sums = p.sum(axis=1)
    if np.any(np.abs(sums - 1.0) > ROW_SUM_ATOL):
        raise CfdebugError(
            f"{expected}, but got row sums in [{fmt(float(sums.min()))}, "
            f"{fmt(float(sums.max()))}] (pass softmax outputs, not logits)"
        )
    return p


def check_logits(x: Any, name: str = "logits") -> np.ndarray:
    """Validate ``[N, K]`` finite logits and return them as a float64 copy."""
    arr = to_numpy(x, name)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise CfdebugError(
            f"Expected `{name}` to have shape [N, K] with N, K >= 1, but got shape "
            f"{tuple(arr.shape)}"
        )
    if not is_real_numeric(arr):
        raise CfdebugError(f"Expected `{name}` to be a float array, but got dtype {arr.dtype}")
    z = arr.astype(np.float64)
    if not np.all(np.isfinite(z)):
        raise CfdebugError(f"Expected `{name}` to be finite, but got NaN or infinite values")
    return z


def check_labels(
    x: Any,
    name: str,
    n: int | None = None,
    k: int | None = None,
    allow_empty: bool = False,
) -> np.ndarray:
    """Validate ``[N]`` integer class indices (in ``0..k-1`` when ``k`` is given)."""
    arr = to_numpy(x, name)
    n_part = "N" if n is None else f"N={n}"
    if k is not None:
        expected = f"Expected `{name}` to have {n_part} entries in 0..K-1"
    else:
        expected = f"Expected `{name}` to have {n_part} integer entries"
    if arr.ndim != 1:
        raise CfdebugError(f"{expected}, but got shape {tuple(arr.shape)}")
    if n is not None and arr.shape[0] != n:
        raise CfdebugError(f"{expected}, but got {arr.shape[0]} entries")
    if arr.shape[0] == 0:
        if not allow_empty:
            raise CfdebugError(f"{expected}, but got 0 entries")
        return np.zeros(0, dtype=np.int64)  # `[]` converts to float64; emptiness has no dtype
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise CfdebugError(
            f"{expected}, but got dtype {arr.dtype} (class indices must be integers)"
        )
    out = arr.astype(np.int64)
    if k is not None and out.size and (out.min() < 0 or out.max() >= k):
        raise CfdebugError(
            f"{expected}, but got values in [{int(out.min())}, {int(out.max())}] (K={k})"
        )
    if k is None and out.size and out.min() < 0:
        raise CfdebugError(f"{expected}, but got a negative value {int(out.min())}")
    return out


def check_binary(x: Any, name: str, shape_desc: str) -> np.ndarray:
    """Validate a boolean (or 0/1) array and return it as bool; shape is checked by callers."""
    arr = to_numpy(x, name)
    if arr.dtype == np.bool_:
        return arr.astype(bool)  # copy
    if not is_real_numeric(arr):
        raise CfdebugError(
            f"Expected `{name}` to be a boolean array of shape {shape_desc}, but got dtype "
            f"{arr.dtype}"
        )
    if arr.size and not np.all((arr == 0) | (arr == 1)):
        raise CfdebugError(
            f"Expected `{name}` to be a boolean array of shape {shape_desc}, but got values "
            "other than 0 and 1"
        )
    return arr.astype(bool)
