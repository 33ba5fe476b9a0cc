"""A process with no sample to use (an empty shard, or no share of a small ``num_samples``) under DDP: both modes
give every process the statistics of the samples the others used, exactly as one process over them would."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _spawn import spawn_ranks
from torch import nn

from lightning_bnsgd.bn.recalibrate import recalibrate_bn

WORLD = 2
MODES = ("train", "sequential")
#: name: (rank 0's batches, rank 1's batches, num_samples); every sample rank 1 could use is left to rank 0
CASES: dict[str, tuple[int, int, int | None]] = {
    "rank 1 has no batch": (4, 0, None),
    "a budget of 2 goes to rank 0 alone": (4, 4, 2),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4), nn.BatchNorm1d(4))


def _batches(count: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(50, 3, generator=gen) * 2 + 1 for _ in range(count)]


def _statistics(model: nn.Module) -> list[torch.Tensor]:
    return [
        t.clone() for m in model.modules() if isinstance(m, nn.BatchNorm1d) for t in (m.running_mean, m.running_var)
    ]


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=30)
    )
    try:
        results: dict[str, Any] = {}
        for name, (first, second, budget) in CASES.items():
            for mode in MODES:
                model = _model()
                batches = _batches(first, seed=0) if rank == 0 else _batches(second, seed=1)
                try:
                    report = recalibrate_bn(model, batches, mode=mode, num_samples=budget)
                    results[name, mode] = {"stats": _statistics(model), "used": report.samples_per_rank}
                except Exception as err:
                    results[name, mode] = {"error": f"{type(err).__name__}: {err}"}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[Any, Any]]:
    return spawn_ranks(_worker, tmp_path_factory.mktemp("empty_shard"), WORLD)


@pytest.mark.ddp
@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CASES))
def test_a_process_without_samples_gets_the_others_statistics(
    ranks: list[dict[Any, Any]], name: str, mode: str
) -> None:
    first, _, budget = CASES[name]
    r0, r1 = ranks[0][name, mode], ranks[1][name, mode]
    assert "error" not in r0 and "error" not in r1, (r0.get("error"), r1.get("error"))
    assert r0["used"] == r1["used"] == [budget or 50 * first, 0]
    reference = _model()
    recalibrate_bn(reference, _batches(first, seed=0), mode=mode, num_samples=budget)  # one process, rank 0's data
    for ours, theirs, expected in zip(r0["stats"], r1["stats"], _statistics(reference), strict=True):
        assert torch.equal(ours, theirs)  # identical on both ranks
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
