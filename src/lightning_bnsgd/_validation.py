"""Argument checks shared by every constructor (pure Python: usable from ``bn/`` too).

Each check raises ``ValueError`` naming the argument, the value and what is allowed, and returns the value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def is_int(value: object) -> bool:
    """True for an ``int`` that is not a ``bool``.

    Examples:
        >>> is_int(3), is_int(True), is_int(3.0)
        (True, False, False)
    """
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """True for a finite ``int`` or ``float`` that is not a ``bool``.

    Examples:
        >>> is_number(0.5), is_number(float("nan")), is_number(False)
        (True, False, False)
    """
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(name: str, value: object, minimum: int = 1, allow_none: bool = False) -> int | None:
    """An integer ``>= minimum`` (or ``None`` when ``allow_none``).

    Examples:
        >>> check_int("batch_size", 64)
        64
        >>> check_int("batch_size", 0)
        Traceback (most recent call last):
        ...
        ValueError: `batch_size` must be an integer >= 1, got 0.
    """
    if value is None and allow_none:
        return None
    if not is_int(value) or value < minimum:  # type: ignore[operator]
        what = f"{'None or ' if allow_none else ''}an integer >= {minimum}"
        raise ValueError(f"`{name}` must be {what}, got {value!r}.")
    return value  # type: ignore[return-value]


def check_choice(name: str, value: object, allowed: Sequence[str]) -> str:
    """One of the ``allowed`` names.

    Examples:
        >>> check_choice("mode", "train", ("train", "sequential"))
        'train'
    """
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"`{name}` must be one of {tuple(allowed)}, got {value!r}.")
    return value
