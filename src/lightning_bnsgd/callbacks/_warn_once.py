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
    def load(cls, rows: list[list[str]], owner: str | None = None) -> WarnOnce:
        """From the checkpoint form.

        Raises:
            ValueError: ``rows`` is not a list of ``[name, kind]`` string pairs; the message names ``owner`` (the
                callback whose state it is), the key ``warned`` and the offending value.

        Examples:
            >>> WarnOnce.load([["bn1", "frozen"]]).first("bn1", "frozen")
            False
            >>> WarnOnce.load([["bn1"]], owner="BNStatsMonitor")
            Traceback (most recent call last):
            ...
            ValueError: BNStatsMonitor: `warned` must be a list of [layer, kind] string pairs; got the entry ['bn1'].
        """
        prefix = f"{owner}: " if owner else ""
        what = f"{prefix}`warned` must be a list of [layer, kind] string pairs"
        if not isinstance(rows, (list, tuple)):
            raise ValueError(f"{what}; got {rows!r}.")
        keys: set[tuple[str, str]] = set()
        for row in rows:
            if not isinstance(row, (list, tuple)) or len(row) != 2 or not all(isinstance(x, str) for x in row):
                raise ValueError(f"{what}; got the entry {row!r}.")
            keys.add((row[0], row[1]))
        seen = cls()
        seen._keys = keys
        return seen


__all__ = ["WarnOnce"]
