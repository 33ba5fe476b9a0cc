"""``ConvNetClassifier``: the LightningModule around ``BNConvNet`` (or any classifier ``nn.Module``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchmetrics.classification import MulticlassAccuracy

from lightning_bnsgd._compat import LightningModule
from lightning_bnsgd.models.cnn import BNConvNet, NormPosition, Padding
from lightning_bnsgd.optim import SGDWarmup


class ConvNetClassifier(LightningModule):
    """Image classifier: cross-entropy loss, torchmetrics accuracy, SGD with warmup.

    Logs ``train/loss`` (per step and per epoch), ``train/acc`` (per epoch), ``val/loss``, ``val/acc``,
    ``test/loss`` and ``test/acc``; ``predict_step`` returns class probabilities.

    Args:
        in_channels: input channels of ``BNConvNet`` (linked from the data module by the CLI).
        num_classes: number of classes (linked from the data module by the CLI).
        input_size: input height/width of ``BNConvNet`` (linked from the data module by the CLI).
        channels: output channels of each conv block of ``BNConvNet``.
        kernel_size: kernel size of ``BNConvNet``'s convolutions.
        padding: ``"valid"`` or ``"same"`` padding in ``BNConvNet``.
        norm_position: ``"post_activation"`` or ``"pre_activation"`` BatchNorm placement.
        dropout: dropout before the linear head.
        block_dropout: dropout right before the BatchNorm of every conv block (studies the variance shift).
        batch_norm: ``False`` builds ``BNConvNet`` without BatchNorm layers (a baseline).
        net: any ``nn.Module`` mapping images to logits, used instead of ``BNConvNet`` (its ``num_classes``
            must match). It is not stored in the hyperparameters: pass it again to ``load_from_checkpoint``.
        optimizer: the ``SGDWarmup`` recipe used by ``configure_optimizers`` (default: ``SGDWarmup()``).
        compile: wrap the network with ``torch.compile``. Forward hooks that callbacks attach to BatchNorm layers
            after compilation would be skipped by the compiled graph, so steps on which such hooks are attached
            (``BNStatsMonitor``'s logging steps) and BN recalibration (``bn_recalibration_step``) run the same
            network eagerly; all other steps run compiled.
        compile_backend: the ``backend`` passed to ``torch.compile`` (e.g. ``"inductor"``, ``"aot_eager"``).
        channels_last: convert the network and every input batch to ``torch.channels_last`` memory format.

    Examples:
        >>> model = ConvNetClassifier(input_size=8, padding="same")
        >>> model(torch.zeros(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 28,
        channels: Sequence[int] = (32, 64),
        kernel_size: int = 3,
        padding: Padding = "valid",
        norm_position: NormPosition = "post_activation",
        dropout: float = 0.0,
        block_dropout: float = 0.0,
        batch_norm: bool = True,
        net: nn.Module | None = None,
        optimizer: SGDWarmup | None = None,
        compile: bool = False,
        compile_backend: str = "inductor",
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if net is not None and not isinstance(net, nn.Module):
            raise TypeError(f"`net` must be a torch.nn.Module or None, got {type(net).__name__}.")
        if isinstance(optimizer, dict):  # as stored in a checkpoint's hyperparameters
            optimizer = SGDWarmup(**optimizer)
        if optimizer is not None and not isinstance(optimizer, SGDWarmup):
            raise TypeError(f"`optimizer` must be an SGDWarmup or None, got {type(optimizer).__name__}.")
        self.optimizer_config = optimizer if optimizer is not None else SGDWarmup()
        # Plain types only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["net", "optimizer"])
        self.hparams["channels"] = [int(c) for c in channels]
        self.hparams["optimizer"] = dataclasses.asdict(self.optimizer_config)
        self.net: nn.Module = (
            net
            if net is not None
            else BNConvNet(
                in_channels=in_channels,
                num_classes=num_classes,
                input_size=input_size,
                channels=channels,
                kernel_size=kernel_size,
                padding=padding,
                norm_position=norm_position,
                dropout=dropout,
                block_dropout=block_dropout,
                batch_norm=batch_norm,
            )
        )
        self.channels_last = channels_last
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        # Kept out of the module tree so the state_dict holds each parameter once, under ``net.``.
        self.__dict__["_forward"] = torch.compile(self.net, backend=compile_backend) if compile else self.net
        self._norm_layers = [m for m in self.net.modules() if isinstance(m, _BatchNorm)]
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    @property
    def lr(self) -> float | None:
        """The absolute ``lr`` of the ``SGDWarmup`` recipe (``None`` while it scales ``lr_base`` with the batch).

        Setting it sets ``SGDWarmup.lr``, the peak LR used as given (``lr_base`` no longer applies). That is what
        Lightning's LR finder suggests: ``Tuner(trainer).lr_find(model)`` finds and sets it (docs: FAQ, "How do I
        choose the learning rate?").
        """
        return self.optimizer_config.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self.optimizer_config = dataclasses.replace(self.optimizer_config, lr=value)
        self.hparams["optimizer"] = dataclasses.asdict(self.optimizer_config)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits."""
        x = self._layout(x)
        if self._forward is not self.net and self._norm_hooks_attached():
            return self.net(x)
        return self._forward(x)

    def _norm_hooks_attached(self) -> bool:
        return any(m._forward_hooks or m._forward_pre_hooks for m in self._norm_layers)

    def bn_recalibration_step(self, batch: Any) -> None:
        """Forward used by ``BNRecalibration``: the eager network (also when ``compile=True``) on the images."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        self.net(self._layout(x))

    def _shared_step(self, batch: Any, stage: str, metric: MulticlassAccuracy) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        # Per step: update() only (forward() would also compute a per-batch accuracy) and one self.log call, as
        # each call costs Lightning about a millisecond; the accuracy is logged once, at epoch end.
        metric.update(logits, y)
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def on_train_epoch_end(self) -> None:
        """Log ``train/acc``, the epoch's training accuracy."""
        self.log("train/acc", self.train_acc, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        """Log ``val/acc``, the accuracy of the validation run."""
        self.log("val/acc", self.val_acc, prog_bar=True)

    def on_test_epoch_end(self) -> None:
        """Log ``test/acc``, the accuracy of the test run."""
        self.log("test/acc", self.test_acc, prog_bar=True)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Return the batch's cross-entropy loss, logged as ``train/loss``; update the training accuracy."""
        return self._shared_step(batch, "train", self.train_acc)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Log the batch's cross-entropy loss as ``val/loss``; update the validation accuracy."""
        self._shared_step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Log the batch's cross-entropy loss as ``test/loss``; update the test accuracy."""
        self._shared_step(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Return class probabilities (softmax of the logits)."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return torch.softmax(self(x), dim=-1)

    def configure_optimizers(self) -> Any:
        """The SGD optimizer and per-step ``WarmupLR`` of the ``SGDWarmup`` recipe (``optimizer``) for this module."""
        return self.optimizer_config.build(self)
