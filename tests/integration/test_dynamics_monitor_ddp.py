"""``WeightDynamicsMonitor`` under DDP on CPU (2 processes, gloo): rank zero logs values that match an independent
record of the same optimizer steps, at the step of the module's own ``self.log`` metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _rank_logger import RankFileLogger, read_jsonl
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bnsgd._compat import Callback, LightningModule, logging_step
from lightning_bnsgd.bn.dynamics import angular_update
from lightning_bnsgd.callbacks.dynamics_monitor import WeightDynamicsMonitor

INVARIANT = ("net.0", "net.3")


class UserNet(LightningModule):
    """A user's module: ``training_step`` calls ``self(x)`` and logs its loss; SGD with weight decay."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1, bias=False),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 3),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g))
        return DataLoader(data, batch_size=8)


class Truth(Callback):
    """Rank zero's own record of every optimizer step (weights before and after, gradient norms), written to
    ``<folder>/truth.jsonl`` at the step Lightning logs that batch's metrics at."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        modules = dict(pl_module.named_modules())
        self.before = {n: modules[n].weight.detach().clone() for n in INVARIANT}
        self.grads = {n: float(modules[n].weight.grad.norm()) for n in INVARIANT}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        modules = dict(pl_module.named_modules())
        row = {
            "step": logging_step(trainer),
            "angle": {n: float(angular_update(self.before[n], modules[n].weight)) for n in INVARIANT},
            "norm": {n: float(modules[n].weight.detach().norm()) for n in INVARIANT},
            "grad": self.grads,
        }
        with open(Path(self.folder) / "truth.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_ddp_spawn_rank_zero_logs_the_dynamics_of_every_monitored_step(tmp_path: Path, make_trainer: Any) -> None:
    trainer = make_trainer(
        devices=2,
        strategy="ddp_spawn",
        max_steps=4,
        log_every_n_steps=2,
        logger=RankFileLogger(str(tmp_path)),
        callbacks=[WeightDynamicsMonitor(), Truth(str(tmp_path))],
    )
    trainer.fit(UserNet())  # DistributedSampler: different data per rank, gradients averaged by DDP
    rank0, rank1 = read_jsonl(tmp_path / "rank0.jsonl"), read_jsonl(tmp_path / "rank1.jsonl")
    assert not any(k.startswith("dynamics/") for call in rank1 for k in call["metrics"])  # rank zero only
    dynamics = [c for c in rank0 if any(k.startswith("dynamics/") for k in c["metrics"])]
    own = {c["step"] for c in rank0 if "train_loss" in c["metrics"]}
    truth = {row["step"]: row for row in read_jsonl(tmp_path / "truth.jsonl")}
    assert [c["step"] for c in dynamics] == [1, 3]  # batches 2 and 4, at the step of their self.log metrics
    assert {c["step"] for c in dynamics} <= own
    for call in dynamics:
        metrics, row = call["metrics"], truth[call["step"]]
        for name in INVARIANT:
            assert metrics[f"dynamics/{name}/angular_update"] == pytest.approx(row["angle"][name], rel=1e-6)
            assert metrics[f"dynamics/{name}/weight_norm"] == pytest.approx(row["norm"][name], rel=1e-6)
            assert metrics[f"dynamics/{name}/grad_norm"] == pytest.approx(row["grad"][name], rel=1e-5)
            assert metrics[f"dynamics/{name}/angular_update_ratio"] > 0
        assert "dynamics/net.8/grad_norm" in metrics
        assert "dynamics/net.8/angular_update" not in metrics  # the head is not scale-invariant
