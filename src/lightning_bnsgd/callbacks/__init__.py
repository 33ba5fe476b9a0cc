"""Lightning callbacks: exact BatchNorm recalibration and BatchNorm health monitoring."""

from lightning_bnsgd.callbacks.bn_monitor import BNAnomalyError, BNStatsMonitor
from lightning_bnsgd.callbacks.recalibration import BNRecalibration

__all__ = ["BNAnomalyError", "BNRecalibration", "BNStatsMonitor"]
