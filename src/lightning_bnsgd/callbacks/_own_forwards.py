"""Forwards the plugin's callbacks run for themselves, kept out of each other's hooks.

A callback that runs extra forwards of the user's model (the dynamics monitor's scale-invariance probe, a
recalibration pass) wraps them in `own_forwards`; every hook the plugin attaches to the user's layers to watch the
training step returns at once while `in_own_forwards` is true, so one callback's forwards never show up in
another's numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

_depth = 0


@contextmanager
def own_forwards() -> Iterator[None]:
    """Mark the forwards run inside this block as the plugin's own (re-entrant).

    Examples:
        >>> in_own_forwards()
        False
        >>> with own_forwards():
        ...     with own_forwards():
        ...         pass
        ...     in_own_forwards()
        True
        >>> in_own_forwards()
        False
    """
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def in_own_forwards() -> bool:
    """Whether a plugin callback is running forwards of its own right now."""
    return _depth > 0


__all__ = ["in_own_forwards", "own_forwards"]
