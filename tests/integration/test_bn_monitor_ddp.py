"""``BNStatsMonitor`` under DDP on CPU (2 processes, gloo): rank-zero logging and the cross-rank difference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _rank_logger import RankFileLogger, read_jsonl

from lightning_bnsgd._compat import LightningModule, pl
from lightning_bnsgd.callbacks.bn_monitor import BNStatsMonitor
from lightning_bnsgd.data.digits import DigitsDataModule
from lightning_bnsgd.models.cnn import BNConvNet

LAYERS = ("net.features.0.norm", "net.features.1.norm")


class SmallNet(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = BNConvNet(input_size=8, padding="same", channels=(4, 8))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _fit(tmp_path: Path, make_trainer: Any, strategy: Any) -> dict[int, list[dict[str, Any]]]:
    trainer = make_trainer(
        devices=2,
        strategy=strategy,
        max_steps=4,
        logger=RankFileLogger(str(tmp_path)),
        callbacks=[BNStatsMonitor(log_every_n_steps=2)],
        limit_val_batches=0,
    )
    trainer.fit(SmallNet(), DigitsDataModule(batch_size=16))  # DistributedSampler: different data per rank
    return {rank: read_jsonl(tmp_path / f"rank{rank}.jsonl") for rank in (0, 1)}


def _bn_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in calls if any(k.startswith("bn/") for k in c["metrics"])]


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_rank_zero_logs_and_buffers_agree_with_broadcast(tmp_path: Path, make_trainer: Any) -> None:
    calls = _fit(tmp_path, make_trainer, "ddp_spawn")
    bn0, bn1 = _bn_calls(calls[0]), _bn_calls(calls[1])
    assert bn1 == []  # rank 1 gets its logger calls (Lightning's own), never the monitor's
    assert [c["step"] for c in bn0] == [1, 3]  # `self.log`'s step of batches 2 and 4
    for call in bn0:
        metrics = call["metrics"]
        for layer in LAYERS:
            assert metrics[f"bn/{layer}/rank_diff_running_mean_max"] == 0.0
            assert metrics[f"bn/{layer}/rank_diff_running_var_max"] == 0.0
        assert metrics["bn/summary/rank_diff_running_var_max"] == 0.0


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_ranks_diverge_without_buffer_broadcast(tmp_path: Path, make_trainer: Any) -> None:
    strategy = pl.strategies.DDPStrategy(broadcast_buffers=False, start_method="spawn")
    calls = _fit(tmp_path, make_trainer, strategy)
    bn0 = _bn_calls(calls[0])
    assert _bn_calls(calls[1]) == []
    assert [c["step"] for c in bn0] == [1, 3]  # `self.log`'s step of batches 2 and 4
    last = bn0[-1]["metrics"]
    for layer in LAYERS:
        assert last[f"bn/{layer}/rank_diff_running_mean_max"] > 0.0
        assert last[f"bn/{layer}/rank_diff_running_var_max"] > 0.0
    assert last["bn/summary/rank_diff_running_mean_max"] == max(
        last[f"bn/{layer}/rank_diff_running_mean_max"] for layer in LAYERS
    )
