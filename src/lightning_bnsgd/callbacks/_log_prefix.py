"""One metric-name prefix per monitor of a Trainer: the monitors of one kind share this rule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_utilities.core.rank_zero import rank_zero_warn


def unique_prefixes(wanted: Sequence[str]) -> list[str]:
    """The prefix each monitor logs under, in callback order.

    The one it asks for, or ``<it>_2``, ``<it>_3``, ... when an earlier monitor (or any monitor asking for that name)
    has it.

    Examples:
        >>> unique_prefixes(["bn", "bn", "bn_stage2", "bn"])
        ['bn', 'bn_2', 'bn_stage2', 'bn_3']
        >>> unique_prefixes(["bn", "bn_2", "bn"])
        ['bn', 'bn_2', 'bn_3']
    """
    taken: set[str] = set()
    asked = set(wanted)
    resolved = []
    for prefix in wanted:
        name, k = prefix, 2
        while name in taken or (name != prefix and name in asked):
            name, k = f"{prefix}_{k}", k + 1
        taken.add(name)
        resolved.append(name)
    return resolved


def resolve_prefixes(monitors: Sequence[Any], owner: str, current: Any) -> None:
    """Give every monitor of one kind in a Trainer its own prefix (``monitor._prefix``).

    Warn when ``current`` (the monitor whose ``setup`` runs) does not get the one it asked for.

    Two monitors under one prefix would write their whole-model summaries under the same names, and at a step both
    log, one value would overwrite the other in the logger.
    """
    for monitor, prefix in zip(monitors, unique_prefixes([m.log_prefix for m in monitors]), strict=True):
        monitor._prefix = prefix
        if monitor is current and prefix != monitor.log_prefix:
            rank_zero_warn(
                f"{owner}: another {owner} of this Trainer logs under `{monitor.log_prefix}/`, so this one "
                f"({monitor.state_key}) logs under `{prefix}/`; set `log_prefix` to choose the name."
            )


__all__ = ["resolve_prefixes", "unique_prefixes"]
