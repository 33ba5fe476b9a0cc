"""lightning-bnsgd: BatchNorm + SGD toolkit for PyTorch Lightning."""

from lightning_bnsgd.bn import RecalibrationReport, batchnorm_layers, recalibrate_bn
from lightning_bnsgd.callbacks import BNAnomalyError, BNRecalibration, BNStatsMonitor
from lightning_bnsgd.data import DigitsDataModule
from lightning_bnsgd.models import BNConvNet, ConvNetClassifier
from lightning_bnsgd.optim import SGDWarmup, WarmupLR, param_groups

__version__ = "0.1.0"

__all__ = [
    "BNAnomalyError",
    "BNConvNet",
    "BNRecalibration",
    "BNStatsMonitor",
    "ConvNetClassifier",
    "DigitsDataModule",
    "RecalibrationReport",
    "SGDWarmup",
    "WarmupLR",
    "__version__",
    "batchnorm_layers",
    "param_groups",
    "recalibrate_bn",
]
