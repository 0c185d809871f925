"""Checking options before any work: every bad value is a ``ValueError`` that names the option.

One set of helpers for the caches, the architecture configs, the strategies and the CLI. Each returns the value
(normalised: an ``int`` for integers, a ``float`` for reals) so that a constructor can write
``self.budget = check_int("budget", budget, low=1)``. ``bool`` is never accepted as a number (``True`` is an ``int``
in Python, but ``budget=True`` is a mistake), and comparisons never meet a string or ``None`` (which would be a
``TypeError`` from deep inside the method).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["check_choice", "check_int", "check_optional_int", "check_ratio", "check_real"]


def _bounds(low, high, strict_low: bool, strict_high: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if strict_low else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if strict_high else '<='} {high}")
    return " and ".join(parts)


def _why(hint: str | None) -> str:
    return f" ({hint})" if hint else ""


def check_int(
    name: str, value: Any, *, low: int | None = None, high: int | None = None, hint: str | None = None
) -> int:
    """An integer in ``[low, high]`` (``low``/``high`` optional); ``ValueError`` naming ``name`` otherwise (``hint``:
    why the bound, e.g. ``"larger than window_size=32"``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            raise ValueError(f"`{name}` must be an integer{_why(hint)}, got the float {value!r}")
        bounds = _bounds(low, high, False, False)
        raise ValueError(f"`{name}` must be an integer{' ' + bounds if bounds else ''}{_why(hint)}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"`{name}` must be {_bounds(low, high, False, False)}{_why(hint)}, got {value!r}")
    return int(value)


def check_optional_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int | None:
    """``None`` or :func:`check_int`."""
    return None if value is None else check_int(name, value, low=low, high=high)


def check_real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    strict_low: bool = False,
    strict_high: bool = False,
    finite: bool = True,
    hint: str | None = None,
) -> float:
    """A real number in the given bounds (``strict_*``: the bound itself is excluded); finite unless ``finite=False``
    (then only NaN is refused), ``hint``: what the value means."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"`{name}` must be a {'finite ' if finite else ''}number{_why(hint)}, got {value!r}")
    if finite and not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number{_why(hint)}, got {value!r}")
    too_low = low is not None and (value < low or (strict_low and value == low))
    too_high = high is not None and (value > high or (strict_high and value == high))
    if too_low or too_high:
        raise ValueError(f"`{name}` must be {_bounds(low, high, strict_low, strict_high)}{_why(hint)}, got {value!r}")
    return float(value)


def check_ratio(name: str, value: Any, *, include_zero: bool = False, include_one: bool = False) -> float:
    """A number in ``(0, 1)``; ``include_zero``/``include_one`` close the interval at that end."""
    return check_real(name, value, low=0.0, high=1.0, strict_low=not include_zero, strict_high=not include_one)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """One of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value
