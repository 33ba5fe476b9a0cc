"""Lightning callbacks: exact BatchNorm recalibration, BatchNorm health monitoring, weight dynamics monitoring."""

from lightning_bnsgd.callbacks.bn_monitor import BNAnomalyError, BNStatsMonitor
from lightning_bnsgd.callbacks.dynamics_monitor import WeightDynamicsMonitor
from lightning_bnsgd.callbacks.recalibration import BNRecalibration

__all__ = ["BNAnomalyError", "BNRecalibration", "BNStatsMonitor", "WeightDynamicsMonitor"]
