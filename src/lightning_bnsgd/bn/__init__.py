"""Pure-torch BatchNorm utilities (no Lightning import): usable in any training loop."""

from lightning_bnsgd.bn.inspect import batchnorm_layers
from lightning_bnsgd.bn.recalibrate import RecalibrationReport, recalibrate_bn, statistics_shift

__all__ = ["RecalibrationReport", "batchnorm_layers", "recalibrate_bn", "statistics_shift"]
