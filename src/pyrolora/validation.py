"""Checks of numbers that users pass in (configs, guide and prior options, fit arguments), with one wording.

Every check raises :class:`~pyrolora.errors.ConfigError` naming the setting (``where``), the rule and the value,
plus an optional ``hint`` (e.g. what the paper uses). Booleans are never numbers here (``True`` is not 1), and
an integer too large for a float counts as not finite.
"""

from __future__ import annotations

import math
from typing import Any

from pyrolora.errors import ConfigError

__all__ = ["at_least", "finite", "in_range", "positive", "positive_int"]


def _fail(where: str, rule: str, value: Any, hint: str) -> ConfigError:
    return ConfigError(f"{where} must be {rule}, got {value!r}{'; ' + hint if hint else ''}.")


def finite(value: Any, where: str, hint: str = "") -> float:
    """``value`` as a float if it is a finite real number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(where, "a number", value, hint)
    try:
        ok = math.isfinite(value)
    except OverflowError:  # an integer beyond float range: no setting is meant to be that large
        ok = False
    if not ok:
        raise _fail(where, "finite", value, hint)
    return float(value)


def positive(value: Any, where: str, hint: str = "") -> float:
    """``value`` as a float if it is a finite number > 0."""
    if finite(value, where, hint) <= 0:
        raise _fail(where, "positive", value, hint)
    return float(value)


def at_least(value: Any, where: str, minimum: float, hint: str = "") -> float:
    """``value`` as a float if it is a finite number >= ``minimum``."""
    if finite(value, where, hint) < minimum:
        raise _fail(where, f">= {minimum}", value, hint)
    return float(value)


def in_range(
    value: Any, where: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False, hint: str = ""
) -> float:
    """``value`` as a float if it lies in the interval from ``low`` to ``high`` (ends closed unless ``*_open``)."""
    x = finite(value, where, hint)
    if (x <= low if low_open else x < low) or (x >= high if high_open else x > high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise _fail(where, f"in {interval}", value, hint)
    return x


def positive_int(value: Any, where: str, minimum: int = 1, hint: str = "") -> int:
    """``value`` if it is an integer >= ``minimum`` (default 1: a positive integer)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        rule = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise _fail(where, rule, value, hint)
    return value
