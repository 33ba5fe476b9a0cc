"""``WeightDynamicsMonitor`` in a user's ``lightning.pytorch`` project: a torchvision-layout ResNet fed dict batches
normalized in ``on_after_batch_transfer``, ``SGDWarmup`` param groups, manual optimization with two optimizers,
a LightningModule whose ``training_step`` does not call ``forward``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_bnsgd.bn.dynamics import equilibrium_angular_update
from lightning_bnsgd.callbacks.dynamics_monitor import WeightDynamicsMonitor

from .project import L, MemoryLogger, UserDataModule, UserModel, quiet_trainer

CONVS = [
    "net.conv1",
    "net.layer1.0.conv1",
    "net.layer1.0.conv2",
    "net.layer2.0.conv1",
    "net.layer2.0.conv2",
    "net.layer2.0.downsample.0",
]


def _fit(tmp_path: Path, callbacks: list[Any], model: L.LightningModule | None = None, **kwargs: Any) -> Any:
    L.seed_everything(7, verbose=False)
    model = model or UserModel()
    trainer = quiet_trainer(tmp_path, callbacks=callbacks, **{"max_epochs": 2, "limit_val_batches": 1, **kwargs})
    trainer.fit(model, datamodule=UserDataModule())
    return model


def test_resnet_convs_are_found_and_logged_to_a_lightning_pytorch_logger(tmp_path: Path) -> None:
    logger, monitor = MemoryLogger(), WeightDynamicsMonitor(log_every_n_steps=2)
    _fit(tmp_path, [monitor], logger=logger)
    assert monitor.report is not None
    assert monitor.report.names == CONVS  # every conv (bias=False) feeds a BatchNorm, downsample's too
    assert all(g.granularity == "channel" for g in monitor.report.groups)
    assert list(monitor.report.rejected) == ["net.fc"]
    assert monitor.layer_names == [*CONVS[:3], CONVS[5], CONVS[3], CONVS[4], "net.fc"]  # forward order
    # 7 batches per epoch, every 2nd of 14, at the step of Lightning's own metrics (the batches stepped before)
    assert [s for s, _ in logger.logged("dynamics/")] == [1, 3, 5, 7, 9, 11, 13]
    metrics = logger.logged("dynamics/")[0][1]
    for name in CONVS:
        assert metrics[f"dynamics/{name}/angular_update"] > 0
        assert metrics[f"dynamics/{name}/angular_update_eq"] > 0  # SGDWarmup's decay group: weight decay 1e-4
        assert f"dynamics/{name}/grad_norm" in metrics
    assert "dynamics/net.fc/grad_norm" in metrics


def test_the_training_trajectory_is_bitwise_unchanged(tmp_path: Path) -> None:
    plain = _fit(tmp_path / "plain", [])
    monitored = _fit(tmp_path / "with", [WeightDynamicsMonitor(log_every_n_steps=1)])
    for (name, a), (_, b) in zip(plain.state_dict().items(), monitored.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


class TwoOptimizerModel(UserModel):
    """A GAN-style loop: manual optimization, the backbone and the head stepped by different SGD optimizers, and
    ``training_step`` calls ``self.net`` directly (never ``forward``)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        body, head = self.optimizers()
        body.zero_grad()
        head.zero_grad()
        self.manual_backward(F.cross_entropy(self.net(batch["image"]), batch["label"]))
        body.step()
        head.step()

    def configure_optimizers(self) -> Any:
        body = [p for n, p in self.net.named_parameters() if not n.startswith("fc.")]
        return [
            torch.optim.SGD(body, lr=0.05, momentum=0.9, weight_decay=5e-4),
            torch.optim.SGD(self.net.fc.parameters(), lr=0.01, momentum=0.0),
        ]


def test_manual_optimization_two_optimizers_and_a_training_step_without_forward(tmp_path: Path) -> None:
    logger, monitor = MemoryLogger(), WeightDynamicsMonitor(log_every_n_steps=3)
    _fit(tmp_path, [monitor], model=TwoOptimizerModel(), logger=logger, max_epochs=1)
    assert monitor.report is not None and monitor.report.names == CONVS
    assert [s for s, _ in logger.logged("dynamics/")] == [2, 5]  # batches 3 and 6 (two optimizer steps each)
    metrics = logger.logged("dynamics/")[0][1]
    expected = equilibrium_angular_update(0.05, 5e-4, 0.9)
    assert all(metrics[f"dynamics/{name}/angular_update_eq"] == expected for name in CONVS)
