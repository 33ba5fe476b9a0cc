"""Warnings given once per (layer, kind) and remembered across checkpoints: the monitors share this."""

from __future__ import annotations

from lightning_utilities.core.rank_zero import rank_zero_warn


class WarnOnce:
    """Which ``(layer, kind)`` warnings a callback already gave.

    Examples:
        >>> seen = WarnOnce()
        >>> seen.first("bn1", "frozen"), seen.first("bn1", "frozen")
        (True, False)
        >>> WarnOnce.load(seen.state()).state()
        [['bn1', 'frozen']]
    """

    def __init__(self) -> None:
        self._keys: set[tuple[str, str]] = set()

    def first(self, name: str, kind: str) -> bool:
        """Whether this is the first time for ``(name, kind)`` (it is remembered from now on)."""
        if (name, kind) in self._keys:
            return False
        self._keys.add((name, kind))
        return True

    def warn(self, name: str, kind: str, message: str) -> None:
        """``rank_zero_warn(message)`` the first time for ``(name, kind)``."""
        if self.first(name, kind):
            rank_zero_warn(message)

    def state(self) -> list[list[str]]:
        """The checkpoint form: sorted ``[name, kind]`` pairs."""
        return sorted([list(key) for key in self._keys])

    @classmethod
    def load(cls, rows: list[list[str]]) -> WarnOnce:
        """From the checkpoint form."""
        seen = cls()
        seen._keys = {(str(a), str(b)) for a, b in rows}
        return seen


__all__ = ["WarnOnce"]
