"""Pure-torch BatchNorm utilities (no Lightning import): usable in any training loop."""

from lightning_bnsgd.bn.dynamics import (
    ScaleInvarianceReport,
    ScaleInvariantGroup,
    angular_update,
    effective_lr,
    equilibrium_angular_update,
    find_scale_invariant,
    sgd_group_equilibrium,
    weight_layers,
)
from lightning_bnsgd.bn.export import ExportResult, check_in_fresh_process, export_folded
from lightning_bnsgd.bn.fold import FoldDecision, FoldReport, fold_batchnorm
from lightning_bnsgd.bn.inspect import batchnorm_layers
from lightning_bnsgd.bn.recalibrate import LayerShift, RecalibrationReport, recalibrate_bn, statistics_shift

__all__ = [
    "ExportResult",
    "FoldDecision",
    "FoldReport",
    "LayerShift",
    "RecalibrationReport",
    "ScaleInvarianceReport",
    "ScaleInvariantGroup",
    "angular_update",
    "batchnorm_layers",
    "check_in_fresh_process",
    "effective_lr",
    "equilibrium_angular_update",
    "export_folded",
    "find_scale_invariant",
    "fold_batchnorm",
    "recalibrate_bn",
    "sgd_group_equilibrium",
    "statistics_shift",
    "weight_layers",
]
