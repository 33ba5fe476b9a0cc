"""The values of one monitored step of ``BNStatsMonitor`` on the host, read from the tensors `to_host` moved there.

The device side computes named per-layer tensors; `to_host` moves them in one transfer, keeping each one's shape;
`StepValues.from_host` turns them into rows of floats.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from lightning_bnsgd.bn.inspect import ANOMALIES, BUFFER_STATS, GAP_STATS

#: Cross-rank statistics, per layer (multi-device runs only).
RANK_STATS: tuple[str, ...] = ("rank_diff_running_mean_max", "rank_diff_running_var_max")


@dataclass(frozen=True)
class StepValues:
    """The host-side values of one monitored step, one row per monitored layer."""

    summary: list[list[float]]
    """Values named by `BUFFER_STATS`."""
    gaps: list[list[float]]
    """Values named by `GAP_STATS` (NaN where the layer's input was not captured)."""
    rank_diff: list[list[float]] | None
    """Values named by `RANK_STATS`, or None on one device."""
    flags: list[list[float]]
    """Anomaly flags named by `ANOMALIES` (1.0 or 0.0)."""
    frozen_changed: list[float]
    """1.0 where a layer meant to be frozen changed its running statistics (0.0 otherwise)."""
    histograms: list[tuple[str, str, Tensor]]
    """``(layer name, tensor name, values)`` for each histogram."""

    @classmethod
    def from_host(
        cls,
        summary: Tensor,
        gaps: Tensor,
        rank_diff: Tensor | None,
        flags: Tensor,
        frozen_changed: Tensor,
        histograms: Sequence[tuple[str, str, Tensor]] = (),
    ) -> StepValues:
        """Rows of floats from the host tensors of one step (``histograms``: ``(layer, tensor name, values)``).

        Raises:
            ValueError: the parts do not hold one row of the expected width per layer.

        Examples:
            >>> import torch
            >>> values = StepValues.from_host(
            ...     summary=torch.zeros(1, len(BUFFER_STATS)),
            ...     gaps=torch.ones(1, len(GAP_STATS)),
            ...     rank_diff=None,
            ...     flags=torch.zeros(1, len(ANOMALIES)),
            ...     frozen_changed=torch.ones(1),
            ...     histograms=[("bn", "weight", torch.arange(3.0))],
            ... )
            >>> values.gaps, values.frozen_changed, values.histograms[0][2].tolist()
            ([[1.0, 1.0, 1.0, 1.0]], [1.0], [0.0, 1.0, 2.0])
        """
        n = summary.shape[0] if summary.dim() else -1
        parts = [(summary, BUFFER_STATS), (gaps, GAP_STATS), (flags, ANOMALIES)]
        if rank_diff is not None:
            parts.append((rank_diff, RANK_STATS))
        shapes = [tuple(t.shape) for t, _ in parts] + [tuple(frozen_changed.shape)]
        if shapes != [(n, len(names)) for _, names in parts] + [(n,)]:
            raise ValueError(f"StepValues.from_host: the parts do not match: shapes {shapes} for {n} layers.")
        return cls(
            summary=summary.tolist(),
            gaps=gaps.tolist(),
            rank_diff=rank_diff.tolist() if rank_diff is not None else None,
            flags=flags.tolist(),
            frozen_changed=frozen_changed.tolist(),
            histograms=list(histograms),
        )
