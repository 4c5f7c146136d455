"""Argument checks shared by the public API: one rule for what an integer, a number or a
flag argument may be, and one wording for the error that names it.

Integers may be Python or numpy integers (``np.int64(64)`` is 64) but not ``bool``;
numbers must be real and finite. A value of the wrong kind is a ``TypeError``, one out of
range a ``ValueError``; both name the argument and the value.
"""

from __future__ import annotations

import math
import numbers
import operator

__all__ = ["integer", "number", "flag"]


def integer(name: str, value: object, *, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an ``int``, refused unless it is an integer (not a bool) from ``lo`` to ``hi``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        v = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r:.60}") from None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        span = f"from {lo} to {hi}" if lo is not None and hi is not None else f">= {lo}" if lo is not None else f"<= {hi}"
        raise ValueError(f"{name} must be an integer {span}, got {v}")
    return v


def number(name: str, value: object) -> float:
    """``value`` as a finite ``float``, refused unless it is a real, finite number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r:.60}")
    try:
        v = float(value)
    except OverflowError:  # an int beyond float's range
        raise ValueError(f"{name} must be a finite number, got an integer of {operator.index(value).bit_length()} bits") from None  # type: ignore[arg-type]
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {value!r:.60}")
    return v


def flag(name: str, value: object) -> bool:
    """``value``, refused unless it is True or False."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r:.60}")
    return value
