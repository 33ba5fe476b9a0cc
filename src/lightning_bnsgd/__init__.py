"""lightning-bnsgd: BatchNorm + SGD toolkit for PyTorch Lightning.

The top level holds what goes into a ``Trainer``, a ``configure_optimizers`` or a YAML file; the research helpers
(layer lists, statistics shifts, scale invariance) live in ``lightning_bnsgd.bn``.
"""

from typing import Any

from lightning_bnsgd import bn
from lightning_bnsgd._moved import moved_attribute
from lightning_bnsgd.bn import RecalibrationReport, recalibrate_bn
from lightning_bnsgd.callbacks import (
    BNAnomalyError,
    BNFoldExport,
    BNRecalibration,
    BNStatsMonitor,
    WeightDynamicsMonitor,
)
from lightning_bnsgd.data import DigitsDataModule
from lightning_bnsgd.models import BNConvNet, ConvNetClassifier
from lightning_bnsgd.optim import SGDWarmup, WarmupLR, param_groups

__version__ = "0.2.1"

#: Top-level names of 0.2 that moved to ``lightning_bnsgd.bn`` in 0.3: still importable, with a ``FutureWarning``,
#: until 0.4.
MOVED_TO_BN = (
    "LayerShift",
    "ScaleInvarianceReport",
    "batchnorm_layers",
    "equilibrium_angular_update",
    "find_scale_invariant",
    "statistics_shift",
)


def __getattr__(name: str) -> Any:
    return moved_attribute(__name__, name, MOVED_TO_BN, bn)


__all__ = [
    "BNAnomalyError",
    "BNConvNet",
    "BNFoldExport",
    "BNRecalibration",
    "BNStatsMonitor",
    "ConvNetClassifier",
    "DigitsDataModule",
    "RecalibrationReport",
    "SGDWarmup",
    "WarmupLR",
    "WeightDynamicsMonitor",
    "__version__",
    "param_groups",
    "recalibrate_bn",
]
