"""Data modules."""

from lightning_bnsgd.data.digits import DigitsDataModule

__all__ = ["DigitsDataModule"]
