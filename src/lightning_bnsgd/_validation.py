"""Argument checks shared by every constructor and function (pure Python: usable from ``bn/`` too).

One check per rule, in the style of torchmetrics' ``_arg_validation``. Every check returns the value and raises
``TypeError`` when the value has the wrong type and ``ValueError`` when it has the right type but a value that is
not allowed. Messages name the argument, the value and what is allowed; ``owner`` (the class or function the user
called, e.g. ``"BNRecalibration"``) prefixes the message when given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, TypeGuard, overload


def is_int(value: object) -> TypeGuard[int]:
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


def _fail(kind: type[Exception], owner: str | None, name: str, what: str, value: object) -> Exception:
    prefix = f"{owner}: " if owner else ""
    return kind(f"{prefix}`{name}` must be {what}, got {value!r}.")


def _bounds_text(minimum: float | None, maximum: float | None, min_open: bool, max_open: bool) -> str:
    parts = []
    if minimum is not None:
        parts.append(f"{'>' if min_open else '>='} {minimum}")
    if maximum is not None:
        parts.append(f"{'<' if max_open else '<='} {maximum}")
    return " and ".join(parts)


def check_bool(name: str, value: object, *, owner: str | None = None) -> bool:
    """A ``bool``.

    Examples:
        >>> check_bool("verbose", True)
        True
        >>> check_bool("verbose", 1)
        Traceback (most recent call last):
        ...
        TypeError: `verbose` must be a bool, got 1.
    """
    if not isinstance(value, bool):
        raise _fail(TypeError, owner, name, "a bool", value)
    return value


@overload
def check_int(
    name: str,
    value: object,
    *,
    minimum: int | None,
    maximum: int | None = None,
    allow_none: Literal[False] = False,
    owner: str | None = None,
) -> int: ...
@overload
def check_int(
    name: str,
    value: object,
    *,
    minimum: int | None,
    maximum: int | None = None,
    allow_none: bool,
    owner: str | None = None,
) -> int | None: ...
def check_int(
    name: str,
    value: object,
    *,
    minimum: int | None,
    maximum: int | None = None,
    allow_none: bool = False,
    owner: str | None = None,
) -> int | None:
    """An integer (not a ``bool``) in ``[minimum, maximum]`` (or ``None`` when ``allow_none``).

    Examples:
        >>> check_int("batch_size", 64, minimum=1)
        64
        >>> check_int("batch_size", 0, minimum=1, owner="DigitsDataModule")
        Traceback (most recent call last):
        ...
        ValueError: DigitsDataModule: `batch_size` must be an integer >= 1, got 0.
        >>> check_int("batch_size", 2.0, minimum=1)
        Traceback (most recent call last):
        ...
        TypeError: `batch_size` must be an integer >= 1, got 2.0.
    """
    if value is None and allow_none:
        return None
    bounds = _bounds_text(minimum, maximum, False, False)
    what = f"{'None or ' if allow_none else ''}an integer{' ' + bounds if bounds else ''}"
    if not is_int(value):
        raise _fail(TypeError, owner, name, what, value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise _fail(ValueError, owner, name, what, value)
    return value


@overload
def check_number(
    name: str,
    value: object,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    min_open: bool = False,
    max_open: bool = False,
    allow_none: Literal[False] = False,
    owner: str | None = None,
) -> float: ...
@overload
def check_number(
    name: str,
    value: object,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    min_open: bool = False,
    max_open: bool = False,
    allow_none: bool,
    owner: str | None = None,
) -> float | None: ...
def check_number(
    name: str,
    value: object,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    min_open: bool = False,
    max_open: bool = False,
    allow_none: bool = False,
    owner: str | None = None,
) -> float | None:
    """A finite real number (``int`` or ``float``, not ``bool``) within the bounds; returned as a ``float``.

    ``min_open``/``max_open`` exclude the bound itself.

    Examples:
        >>> check_number("momentum", 0.9, 0.0, 1.0, max_open=True)
        0.9
        >>> check_number("momentum", 1.0, 0.0, 1.0, max_open=True)
        Traceback (most recent call last):
        ...
        ValueError: `momentum` must be a finite number >= 0.0 and < 1.0, got 1.0.
        >>> check_number("lr", "0.1", 0.0, min_open=True)
        Traceback (most recent call last):
        ...
        TypeError: `lr` must be a finite number > 0.0, got '0.1'.
    """
    if value is None and allow_none:
        return None
    bounds = _bounds_text(minimum, maximum, min_open, max_open)
    what = f"{'None or ' if allow_none else ''}a finite number{' ' + bounds if bounds else ''}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(TypeError, owner, name, what, value)
    number = float(value)
    if not math.isfinite(number):
        raise _fail(ValueError, owner, name, what, value)
    if minimum is not None and (number < minimum or (min_open and number == minimum)):
        raise _fail(ValueError, owner, name, what, value)
    if maximum is not None and (number > maximum or (max_open and number == maximum)):
        raise _fail(ValueError, owner, name, what, value)
    return number


def check_choice(name: str, value: object, allowed: Sequence[str], *, owner: str | None = None) -> Any:
    """One of the ``allowed`` strings.

    Examples:
        >>> check_choice("mode", "train", ("train", "sequential"))
        'train'
        >>> check_choice("mode", "fast", ("train", "sequential"))
        Traceback (most recent call last):
        ...
        ValueError: `mode` must be one of ('train', 'sequential'), got 'fast'.
    """
    what = f"one of {tuple(allowed)}"
    if not isinstance(value, str):
        raise _fail(TypeError, owner, name, what, value)
    if value not in allowed:
        raise _fail(ValueError, owner, name, what, value)
    return value


def check_str(name: str, value: object, *, owner: str | None = None) -> str:
    """A non-empty string.

    Examples:
        >>> check_str("log_prefix", "")
        Traceback (most recent call last):
        ...
        ValueError: `log_prefix` must be a non-empty string, got ''.
    """
    if not isinstance(value, str):
        raise _fail(TypeError, owner, name, "a non-empty string", value)
    if not value:
        raise _fail(ValueError, owner, name, "a non-empty string", value)
    return value


def check_callable(
    name: str, value: object, signature: str = "", *, allow_none: bool = True, owner: str | None = None
) -> Any:
    """A callable (or ``None`` when ``allow_none``); ``signature`` says how it is called, e.g. ``"fn(model, batch)"``.

    Examples:
        >>> check_callable("forward_fn", 3, "forward_fn(model, batch)")
        Traceback (most recent call last):
        ...
        TypeError: `forward_fn` must be None or a callable forward_fn(model, batch), got 3.
    """
    if value is None and allow_none:
        return None
    if not callable(value):
        what = f"{'None or ' if allow_none else ''}a callable{' ' + signature if signature else ''}"
        raise _fail(TypeError, owner, name, what, value)
    return value
