"""The warnings and errors of ``BNStatsMonitor``: misconfigured layers, few samples per channel, anomalies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_utilities.core.rank_zero import rank_zero_warn
from torch import Tensor
from torch.nn.modules.batchnorm import SyncBatchNorm, _BatchNorm

from lightning_bnsgd._compat import namespace_name, namespace_of
from lightning_bnsgd.bn.inspect import ANOMALIES, configuration_issues
from lightning_bnsgd.callbacks._bn_layers import Layer

OWNER = "BNStatsMonitor"
_ANOMALY_TEXT = {
    "nonfinite_running_mean": "NaN/Inf in running_mean",
    "nonfinite_running_var": "NaN/Inf in running_var",
    "nonfinite_weight": "NaN/Inf in weight",
    "nonfinite_bias": "NaN/Inf in bias",
    "running_var_low": "running_var collapsed below min_running_var={bound}",
    "running_var_high": "running_var exploded above max_running_var={bound}",
    "dead_frac_high": "dead-channel fraction above max_dead_fraction={bound}",
}


def warn_configuration(selected: Sequence[tuple[str, _BatchNorm]], world_size: int) -> None:
    """Warn about layer settings that are likely mistakes, as the layers stand at the first training batch."""
    issues = configuration_issues(selected)
    if issues["no_running_stats"]:
        rank_zero_warn(
            f"{OWNER}: BatchNorm layers without running statistics (built with `track_running_stats=False`) "
            f"normalize with batch statistics in evaluation too, so predictions depend on the batch: "
            f"{issues['no_running_stats']}."
        )
    if issues["momentum_none"]:
        rank_zero_warn(
            f"{OWNER}: BatchNorm layers with `momentum=None` keep a cumulative average that weights every "
            "batch since the start equally, so statistics collected under early weights never fade; use a "
            f"momentum such as 0.1 or recalibrate: {issues['momentum_none']}."
        )
    if issues["momentum_zero"]:
        rank_zero_warn(
            f"{OWNER}: BatchNorm layers with `momentum=0` never update their running statistics "
            f"(to freeze BatchNorm, keep the layer in eval mode instead): {issues['momentum_zero']}."
        )
    per_device = [
        name
        for name, m in selected
        if not isinstance(m, SyncBatchNorm) and (m.training or not isinstance(m.running_mean, Tensor))
    ]
    if world_size > 1 and per_device:
        rank_zero_warn(
            f"{OWNER}: {len(per_device)} plain BatchNorm layer(s) normalize with batch statistics on "
            f"{world_size} devices: each device uses its own batch's. When per-device batches are small, "
            f"use `Trainer(sync_batchnorm=True)` (SyncBatchNorm). Layers: {per_device}."
        )


def warn_few_samples(layers: Sequence[Layer], minimum: int) -> None:
    """Warn about layers that normalized with batch statistics from fewer than ``minimum`` values per channel."""
    few = [
        f"{x.name} ({x.capture.samples})" for x in layers if x.capture.batch_stats and 0 < x.capture.samples < minimum
    ]
    if few:
        rank_zero_warn(
            f"{OWNER}: BatchNorm layers normalize with batch statistics from fewer than "
            f"min_samples_per_channel={minimum} values per channel in a training "
            "batch, so their normalization and running statistics are noisy (larger batches, "
            f"SyncBatchNorm or GroupNorm help): {few}."
        )


def anomaly_problems(
    layers: Sequence[Layer], flag_rows: list[list[float]], step: int, where: str, bounds: dict[str, float | None]
) -> list[tuple[str, str, str]]:
    """``(layer name, kind, message)`` for every flagged anomaly, in layer order."""
    problems = []
    for layer, row in zip(layers, flag_rows, strict=True):
        for kind, flag in zip(ANOMALIES, row, strict=True):
            if flag > 0:
                text = _ANOMALY_TEXT[kind].format(bound=bounds.get(kind))
                problems.append((layer.name, kind, f"layer {layer.name!r}: {text} at step {step}{where}"))
    return problems


def histogram_loggers(trainer: Any) -> list[Any]:
    """The Trainer's TensorBoard loggers, each recognized in its own Lightning namespace."""
    found, skipped = [], []
    for logger in trainer.loggers:
        if namespace_name(logger) is not None and isinstance(logger, namespace_of(logger).loggers.TensorBoardLogger):
            found.append(logger)
        else:
            skipped.append(type(logger).__name__)
    if skipped:
        rank_zero_warn(
            f"{OWNER}: `log_histograms=True` but {skipped} cannot log histograms; only TensorBoardLogger gets them."
        )
    return found


__all__ = ["anomaly_problems", "histogram_loggers", "warn_configuration", "warn_few_samples"]
