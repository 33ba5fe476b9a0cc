"""The one tensor a monitored step of ``BNStatsMonitor`` moves from the device to the host, and how to read it back.

`StepLayout.pack` concatenates the step's per-layer results in a fixed order; `StepLayout.unpack` splits the host
copy with the same sizes into named rows. Both sit side by side so the order is written once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
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


@dataclass(frozen=True)
class StepLayout:
    """Order and sizes of the flat tensor of one monitored step.

    Args:
        layers: number of monitored layers.
        has_rank: whether the cross-rank differences are part of the step.
        histograms: ``(layer name, tensor name, number of values)`` of each histogram, in order.

    Examples:
        >>> layout = StepLayout(layers=1, has_rank=False, histograms=(("bn", "weight", 3),))
        >>> flat = layout.pack(
        ...     summary=torch.zeros(1, len(BUFFER_STATS)),
        ...     gaps=torch.ones(1, len(GAP_STATS)),
        ...     rank_diff=None,
        ...     flags=torch.zeros(1, len(ANOMALIES)),
        ...     frozen_changed=torch.ones(1),
        ...     histograms=[torch.arange(3.0)],
        ... )
        >>> values = layout.unpack(flat)
        >>> values.gaps, values.frozen_changed, values.histograms[0][2].tolist()
        ([[1.0, 1.0, 1.0, 1.0]], [1.0], [0.0, 1.0, 2.0])
    """

    layers: int
    has_rank: bool
    histograms: tuple[tuple[str, str, int], ...] = ()

    def sizes(self) -> list[int]:
        """Number of values of each part, in packing order."""
        n = self.layers
        rank = n * len(RANK_STATS) if self.has_rank else 0
        head = [n * len(BUFFER_STATS), n * len(GAP_STATS), rank, n * len(ANOMALIES), n]
        return head + [size for _, _, size in self.histograms]

    def pack(
        self,
        summary: Tensor,
        gaps: Tensor,
        rank_diff: Tensor | None,
        flags: Tensor,
        frozen_changed: Tensor,
        histograms: Sequence[Tensor] = (),
    ) -> Tensor:
        """One float32 tensor holding every part, on the device of ``summary``."""
        if (rank_diff is not None) != self.has_rank or len(histograms) != len(self.histograms):
            raise ValueError("StepLayout.pack: the parts do not match the layout.")
        empty = summary.new_zeros(0)
        parts = [summary, gaps, rank_diff if rank_diff is not None else empty, flags, frozen_changed, *histograms]
        flat = [p.detach().reshape(-1).to(device=summary.device, dtype=torch.float32) for p in parts]
        if [p.numel() for p in flat] != self.sizes():
            raise ValueError(f"StepLayout.pack: sizes {[p.numel() for p in flat]}, expected {self.sizes()}.")
        return torch.cat(flat)

    def unpack(self, host: Tensor) -> StepValues:
        """Split a (host) copy of `pack`'s result into named rows."""
        summary, gaps, rank, flags, frozen, *hist = host.split(self.sizes())
        n = self.layers
        return StepValues(
            summary=summary.view(n, len(BUFFER_STATS)).tolist(),
            gaps=gaps.view(n, len(GAP_STATS)).tolist(),
            rank_diff=rank.view(n, len(RANK_STATS)).tolist() if self.has_rank else None,
            flags=flags.view(n, len(ANOMALIES)).tolist(),
            frozen_changed=frozen.tolist(),
            histograms=[(layer, name, values) for (layer, name, _), values in zip(self.histograms, hist, strict=True)],
        )
