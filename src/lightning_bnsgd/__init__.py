"""lightning-bnsgd: BatchNorm + SGD toolkit for PyTorch Lightning."""

from lightning_bnsgd.bn import (
    LayerShift,
    RecalibrationReport,
    ScaleInvarianceReport,
    batchnorm_layers,
    equilibrium_angular_update,
    find_scale_invariant,
    recalibrate_bn,
    statistics_shift,
)
from lightning_bnsgd.callbacks import (
    BNAnomalyError,
    BNFoldExport,
    BNRecalibration,
    BNStatsMonitor,
    FoldExportResult,
    WeightDynamicsMonitor,
)
from lightning_bnsgd.data import DigitsDataModule
from lightning_bnsgd.models import BNConvNet, ConvNetClassifier
from lightning_bnsgd.optim import SGDWarmup, WarmupLR, param_groups

__version__ = "0.2.1"

__all__ = [
    "BNAnomalyError",
    "BNConvNet",
    "BNFoldExport",
    "BNRecalibration",
    "BNStatsMonitor",
    "ConvNetClassifier",
    "DigitsDataModule",
    "FoldExportResult",
    "LayerShift",
    "RecalibrationReport",
    "SGDWarmup",
    "ScaleInvarianceReport",
    "WarmupLR",
    "WeightDynamicsMonitor",
    "__version__",
    "batchnorm_layers",
    "equilibrium_angular_update",
    "find_scale_invariant",
    "param_groups",
    "recalibrate_bn",
    "statistics_shift",
]
