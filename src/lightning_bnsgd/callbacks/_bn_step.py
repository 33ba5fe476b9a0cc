"""The numbers of one monitored step of ``BNStatsMonitor``.

The gaps and the cross-rank spread on the device, the logged metrics on the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_bnsgd.bn.inspect import BUFFER_STATS, GAP_STATS, Segments, gap_summaries
from lightning_bnsgd.callbacks._bn_layers import Layer, buffer_used
from lightning_bnsgd.callbacks._monitor_layout import RANK_STATS, StepValues


def batch_gaps(layers: Sequence[Layer], segments: Segments, device: torch.device) -> Tensor:
    """``(layers, len(GAP_STATS))`` batch-versus-running gaps.

    NaN rows for layers whose input was not seen (``segments``: of all ``layers``).
    """
    gaps = torch.full((len(layers), len(GAP_STATS)), math.nan, device=device)
    captured = [i for i, x in enumerate(layers) if x.capture.mean is not None]
    if not captured:
        return gaps
    caps = [layers[i].capture for i in captured]
    flat = [
        torch.cat([getattr(c, name).to(device) for c in caps])
        for name in ("mean", "var", "running_mean", "running_var")
    ]
    if len(captured) != len(layers):
        segments = Segments([layers[i].module.num_features for i in captured], device)
    eps = torch.tensor([float(layers[i].module.eps) for i in captured], device=device)[segments.ids]
    gaps[captured] = gap_summaries(flat[0], flat[1], flat[2], flat[3], eps, segments)
    return gaps


def across_ranks(
    layers: Sequence[Layer],
    flags: Tensor,
    frozen: Tensor,
    device: torch.device,
    all_max_min: Callable[[Tensor], tuple[Tensor, Tensor]],
) -> tuple[Tensor, Tensor, Tensor]:
    """One all-reduce: per-layer cross-rank spread of the buffers used, and flags raised on any rank.

    The all-reduce is ``all_max_min``: the element-wise maximum and minimum over the ranks.
    """
    with_stats = [i for i, x in enumerate(layers) if isinstance(x.module.running_mean, Tensor)]
    means = [buffer_used(layers[i], "running_mean").to(device) for i in with_stats]
    varis = [buffer_used(layers[i], "running_var").to(device) for i in with_stats]
    sizes = [t.numel() for t in means]
    n_buf = sum(sizes)
    # payload: [running_mean of every layer | running_var of every layer | flags | frozen]
    payload = torch.cat([*means, *varis, flags.flatten().float(), frozen.float()])
    mx, mn = all_max_min(payload)
    spread = (mx - mn).float()
    rank_diff = torch.full((len(layers), len(RANK_STATS)), math.nan, device=device)
    if sizes:
        segments = Segments(sizes, device)
        rank_diff[with_stats, 0] = segments.max(spread[:n_buf])
        rank_diff[with_stats, 1] = segments.max(spread[n_buf : 2 * n_buf])
    any_flags = mx[2 * n_buf : 2 * n_buf + flags.numel()].view_as(flags)
    return rank_diff, any_flags, mx[2 * n_buf + flags.numel() :]


def step_metrics(layers: Sequence[Layer], values: StepValues, stats: Sequence[str], prefix: str) -> dict[str, float]:
    """The step's metrics: ``<prefix>/<layer>/<statistic>`` and the ``<prefix>/summary/...`` values.

    The per-layer metrics are those of the selected ``stats`` each layer has.
    """
    selected = set(stats)
    metrics: dict[str, float] = {}
    worst: dict[str, float] = {}
    nonfinite, dead, channels = 0.0, 0.0, 0
    for i, layer in enumerate(layers):
        m = layer.module
        has_running, has_affine = isinstance(m.running_mean, Tensor), isinstance(m.weight, Tensor)
        row: dict[str, float] = dict(zip(BUFFER_STATS, values.summary[i], strict=True))
        if layer.capture.mean is not None:
            row.update(zip(GAP_STATS, values.gaps[i], strict=True))
        if layer.capture.samples:
            row["samples_per_channel"] = float(layer.capture.samples)
        if values.rank_diff is not None and has_running:
            row.update(zip(RANK_STATS, values.rank_diff[i], strict=True))
        for key in ("gap_mean_max", "gap_var_max", *RANK_STATS):
            if key in row:
                worst[key] = _nanmax(worst.get(key, -math.inf), row[key])
        nonfinite += row["nonfinite_count"]
        if has_affine:
            dead += row["dead_frac"] * m.num_features
            channels += m.num_features
        for key, value in row.items():
            absent = (key.startswith(("running_", "gain_")) and not has_running) or (
                key.startswith(("weight_", "bias_", "dead_")) and not has_affine
            )
            if key in selected and not absent:
                metrics[f"{prefix}/{layer.name}/{key}"] = value
    metrics[f"{prefix}/summary/nonfinite_count"] = nonfinite
    if channels:
        metrics[f"{prefix}/summary/dead_frac"] = dead / channels
    metrics.update({f"{prefix}/summary/{key}": value for key, value in worst.items()})
    return metrics


def _nanmax(a: float, b: float) -> float:
    """Maximum that propagates NaN, so a broken layer shows in the summary."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


__all__ = ["across_ranks", "batch_gaps", "step_metrics"]
