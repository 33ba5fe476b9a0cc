"""An error in the last merge of a pass on one of 2 CPU processes (gloo) reaches the other at once, in both modes.

The merge after a pass (`StatsCollector.flush`) comes after the pass's last agreement: a process that fails there
must still answer the next collective, with its error, so that the other raises too instead of waiting in it until
the process-group timeout (20 s here).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _spawn import outcome, spawn_ranks
from torch import nn

from lightning_bnsgd.bn.collector import StatsCollector
from lightning_bnsgd.bn.recalibrate import recalibrate_bn

WORLD = 2
FAILING = 1
MODES = ("train", "sequential")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4), nn.BatchNorm1d(4))


def _broken_flush(self: StatsCollector) -> None:
    raise RuntimeError("flat buffers not intact")


def _attempt(rank: int, mode: str) -> dict[str, Any]:
    model = _model()
    gen = torch.Generator().manual_seed(rank)
    batches = [torch.randn(16, 3, generator=gen) for _ in range(3 + rank)]  # uneven shards
    return outcome(model, lambda: recalibrate_bn(model, batches, mode=mode))  # type: ignore[arg-type]


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=20)
    )
    if rank == FAILING:
        StatsCollector.flush = _broken_flush  # type: ignore[method-assign]  # this process only
    try:
        results = {mode: _attempt(rank, mode) for mode in MODES}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("flush")
    return spawn_ranks(_worker, out, WORLD)


@pytest.mark.ddp
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_a_merge_error_on_one_rank_reaches_every_rank(ranks: list[dict[str, Any]], mode: str) -> None:
    failed, other = ranks[FAILING][mode], ranks[1 - FAILING][mode]
    for result in (failed, other):
        assert result["error"], "a rank did not raise"
        assert result["unchanged"], "statistics changed although the recalibration failed"
        assert "timed out" not in result["error"]["message"].lower()
        assert "connection" not in result["error"]["message"].lower()
    assert failed["error"]["type"] == "RuntimeError" and failed["error"]["message"] == "flat buffers not intact"
    assert any(f"raised on rank {FAILING} of 2" in note for note in failed["error"]["notes"]), failed["error"]
    assert other["error"]["type"] == "RankFailure", other["error"]
    message = other["error"]["message"]
    assert message.startswith(f"recalibrate_bn: rank {FAILING} of 2 failed"), message
    assert "RuntimeError: flat buffers not intact" in message
