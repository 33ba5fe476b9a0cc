"""Pure-torch BatchNorm utilities (no Lightning import): usable in any training loop."""

from lightning_bnsgd.bn.inspect import batchnorm_layers

__all__ = ["batchnorm_layers"]
