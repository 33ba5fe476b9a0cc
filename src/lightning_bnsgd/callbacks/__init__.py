"""Lightning callbacks: exact BatchNorm recalibration, BatchNorm health and weight dynamics monitoring, folded export.

The folded export runs at the end of fit.
"""

from lightning_bnsgd.callbacks.bn_monitor import BNAnomalyError, BNStatsMonitor
from lightning_bnsgd.callbacks.dynamics_monitor import WeightDynamicsMonitor
from lightning_bnsgd.callbacks.fold_export import BNFoldExport, FoldExportResult
from lightning_bnsgd.callbacks.recalibration import BNRecalibration

__all__ = [
    "BNAnomalyError",
    "BNFoldExport",
    "BNRecalibration",
    "BNStatsMonitor",
    "FoldExportResult",
    "WeightDynamicsMonitor",
]
