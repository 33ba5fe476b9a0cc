"""lightning-bnsgd: BatchNorm + SGD toolkit for PyTorch Lightning."""

from lightning_bnsgd.bn import batchnorm_layers
from lightning_bnsgd.data import DigitsDataModule
from lightning_bnsgd.models import BNConvNet, ConvNetClassifier
from lightning_bnsgd.optim import SGDWarmup

__version__ = "0.1.0"

__all__ = [
    "BNConvNet",
    "ConvNetClassifier",
    "DigitsDataModule",
    "SGDWarmup",
    "__version__",
    "batchnorm_layers",
]
