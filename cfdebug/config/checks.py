"""The validators every config shares, and :func:`config_dict`, a config's JSON form.

Each validator raises :class:`~cfdebug.errors.CfdebugError` in the torchmetrics form
"Expected `lr` to be a positive number, but got 0.0." or returns the value as a plain
int/float/str; the stage modules use the same functions for their other arguments.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict
from typing import Any, Sequence

from ..errors import CfdebugError
from ..store import jsonable


def check_int(value: Any, name: str, minimum: int = 1) -> int:
    """Validate an integer ``>= minimum`` and below 2^63 (bools are refused) and return it as ``int``.

    2^63 bounds every integer: seeds above it overflow torch's generators and SQLite's INTEGER.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not minimum <= value < 2**63:
        if minimum == 1:
            expected = "a positive integer"
        elif minimum == 0:
            expected = "a non-negative integer"
        else:
            expected = f"an integer >= {minimum}"
        if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 2**63:
            expected += " below 2^63"
        raise CfdebugError(f"Expected `{name}` to be {expected}, but got {value!r}.")
    return int(value)


def check_real(
    value: Any,
    name: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Validate a finite real number within optional bounds (bools are refused); return it as ``float``.

    ``low``/``high`` are inclusive unless ``low_open``/``high_open``. The message names the
    range: "in [0, 1)" with both bounds, "a positive number" for ``low=0, low_open=True``,
    "a non-negative number" for ``low=0``, "a number >= 2" otherwise.
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if low is not None and high is not None:
            expected = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None and low == 0:
            expected = "a positive number" if low_open else "a non-negative number"
        elif low is not None:
            expected = f"a number {'>' if low_open else '>='} {low:g}"
        elif high is not None:
            expected = f"a number {'<' if high_open else '<='} {high:g}"
        else:
            expected = "a finite number"
        raise CfdebugError(f"Expected `{name}` to be {expected}, but got {value!r}.")
    return float(value)


def check_fraction(value: Any, name: str, upper_open: bool = False) -> float:
    """Validate a threshold in ``[0, 1]`` (``[0, 1)`` with ``upper_open``) and return it."""
    return check_real(value, name, 0.0, 1.0, high_open=upper_open)


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """Validate that ``value`` is one of ``choices`` and return it."""
    if value not in choices:
        raise CfdebugError(f"Expected `{name}` to be one of {', '.join(map(str, choices))}, but got {value!r}.")
    return value


def check_sequence(values: Any, name: str, check) -> tuple:
    """Validate a list (not a string) of distinct items, each through ``check``; return a tuple."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise CfdebugError(f"Expected `{name}` to be a list, but got {values!r}.")
    out = tuple(check(v) for v in values)
    if len(set(out)) != len(out):
        raise CfdebugError(f"Expected `{name}` to hold distinct values, but got {list(values)!r}.")
    return out


def check_text(value: Any, name: str, optional: bool = False) -> str | None:
    """Validate a non-empty string (or ``None`` with ``optional``) and return it."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        expected = "None or a non-empty string" if optional else "a non-empty string"
        raise CfdebugError(f"Expected `{name}` to be {expected}, but got {value!r}.")
    return value


def check_section(value: Any, name: str, cls: type) -> None:
    """Validate that a config's section ``value`` is a ``cls`` instance (not a dict)."""
    if not isinstance(value, cls):
        raise CfdebugError(f"Expected `{name}` to be a {cls.__name__}, but got {type(value).__name__}.")


def config_dict(config) -> dict:
    """``asdict`` with tuples as lists, so that it round-trips through JSON unchanged."""
    return jsonable(asdict(config))
