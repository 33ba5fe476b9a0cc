"""Models: the plain BatchNorm CNN and its LightningModule."""

from lightning_bnsgd.models.classifier import ConvNetClassifier
from lightning_bnsgd.models.cnn import BNConvNet

__all__ = ["BNConvNet", "ConvNetClassifier"]
