"""Recalibration across 2 CPU processes (gloo): exact over the union of uneven shards, identical buffers, no hang.

Rank 0 holds 600 samples from one end of a sorted data set (12 batches of 50), rank 1 the other 400 (13 batches of
30 and a last one of 10): different lengths and different distributions. Every scenario runs in one spawn of two
processes; the parent compares each rank's result with the statistics of the union of the samples used.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _spawn import outcome, spawn_ranks
from torch import nn

from lightning_bnsgd._compat import Callback
from lightning_bnsgd.bn.recalibrate import RecalibrationReport, recalibrate_bn
from lightning_bnsgd.callbacks.recalibration import BNRecalibration
from lightning_bnsgd.data.digits import DigitsDataModule
from lightning_bnsgd.models.classifier import ConvNetClassifier

WORLD = 2
SHARD = {0: (0, 600, 50), 1: (600, 1000, 30)}  # rank -> (start, end, batch size)


def _data() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1000, 3, generator=gen)
    return x[x[:, 0].argsort()]  # sorted: the two ranks see very different data


def _shard(rank: int) -> torch.Tensor:
    start, end, _ = SHARD[rank]
    return _data()[start:end]


def _rank_batches(rank: int) -> list[torch.Tensor]:
    return list(torch.split(_shard(rank), SHARD[rank][2]))  # rank 0: 12 x 50; rank 1: 13 x 30 + 10


def _generator(batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    yield from batches  # no length: the processes agree before every forward


class _GatheringSyncBN(nn.SyncBatchNorm):
    """SyncBatchNorm's semantics on CPU (the real one needs a GPU): batch statistics over all processes' inputs,
    a collective in every forward (unequal forward counts hang), zero-size inputs accepted."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        sizes = [torch.zeros(1, dtype=torch.long) for _ in range(WORLD)]
        dist.all_gather(sizes, torch.tensor([input.shape[0]]))
        counts = [int(c) for c in sizes]
        padded = torch.zeros(max(counts), *input.shape[1:])
        padded[: input.shape[0]] = input
        parts = [torch.empty_like(padded) for _ in range(WORLD)]
        dist.all_gather(parts, padded)
        full = torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])
        momentum = self.momentum if self.momentum is not None else 0.0
        out = F.batch_norm(
            full, self.running_mean, self.running_var, self.weight, self.bias, self.training, momentum, self.eps
        )
        start = sum(counts[: dist.get_rank()])
        return out[start : start + input.shape[0]]


def _model(sync: bool = False) -> nn.Module:
    torch.manual_seed(0)
    first: nn.Module = _GatheringSyncBN(6) if sync else nn.BatchNorm1d(6)
    return nn.Sequential(nn.Linear(3, 6), first, nn.ReLU(), nn.Dropout(0.2), nn.Linear(6, 4), nn.BatchNorm1d(4))


def _run(rank: int, sync: bool, mode: str, loader: Any, budget: int | None) -> dict[str, Any]:
    model = _model(sync)
    calls = {"all_reduce": 0}
    original = dist.all_reduce

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls["all_reduce"] += 1
        return original(*args, **kwargs)

    dist.all_reduce = counting  # type: ignore[assignment]
    try:
        report = recalibrate_bn(model, loader, mode=mode, num_samples=budget)
    finally:
        dist.all_reduce = original
    state = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    return {"report": report, "state": state, "all_reduce": calls["all_reduce"]}


SCENARIOS: dict[str, tuple[bool, str, str, int | None]] = {
    # name: (SyncBN stand-in, mode, loader kind, num_samples)
    "planned": (False, "train", "list", None),
    "planned_sequential": (False, "sequential", "list", None),
    "per_batch": (False, "train", "generator", None),
    "planned_budget": (False, "train", "list", 900),  # ends inside rank 0's data after rank 1 ran out
    "per_batch_budget": (False, "train", "generator", 700),  # ends inside both ranks' data
    "sequential_budget": (False, "sequential", "list", 900),
    "sync": (True, "train", "list", None),
    "sync_budget": (True, "train", "list", 700),
    "sync_sequential": (True, "sequential", "list", None),
}


class _Boom(RuntimeError):
    pass


class _FailingForward:
    """The user's forward, raising at this process's ``fail_at``-th call (``None``: never)."""

    def __init__(self, fail_at: int | None) -> None:
        self.fail_at, self.calls = fail_at, 0

    def __call__(self, model: nn.Module, batch: Any) -> Any:
        self.calls += 1
        if self.calls == self.fail_at:
            raise _Boom(f"forward {self.calls} failed")
        return model(batch)


class _FailingData:
    """A shard with a length whose ``fail_at``-th batch cannot be read (``None``: every batch can)."""

    def __init__(self, batches: list[torch.Tensor], fail_at: int | None) -> None:
        self.batches, self.fail_at = batches, fail_at

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.batches):
            if i == self.fail_at:
                raise _Boom(f"batch {i} cannot be read")
            yield batch if i != 1 or self.fail_at != -1 else {"meta": "no tensor"}  # -1: batch 1 has no size


#: name -> (mode, loader kind, num_samples, {rank: where it fails}); every other rank has no failure of its own
FAILURES: dict[str, tuple[str, str, int | None, dict[int, int]]] = {
    "forward_planned": ("train", "list", None, {1: 3}),
    "forward_per_batch": ("train", "generator", 700, {1: 3}),
    "forward_sequential": ("sequential", "list", None, {1: 16}),  # in the second pass (rank 1 has 14 forwards each)
    "data_planned": ("train", "data", 900, {1: 4}),
    "uncountable_planned": ("train", "data", 900, {1: -1}),  # rank 1's second batch has no tensor, with a budget
    "both_ranks": ("train", "list", None, {0: 2, 1: 5}),
}


def _failure(rank: int, mode: str, kind: str, budget: int | None, fail: dict[int, int]) -> dict[str, Any]:
    model = _model()
    batches = _rank_batches(rank)
    where = fail.get(rank)
    loader: Any = {"list": batches, "generator": _generator(batches), "data": _FailingData(batches, where)}[kind]
    forward = _FailingForward(where if kind != "data" else None)
    return outcome(model, lambda: recalibrate_bn(model, loader, mode=mode, num_samples=budget, forward_fn=forward))


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=30)
    )
    try:
        results: dict[str, Any] = {}
        for name, (sync, mode, kind, budget) in SCENARIOS.items():
            batches = _rank_batches(rank)
            loader = batches if kind == "list" else _generator(batches)
            results[name] = _run(rank, sync, mode, loader, budget)
        results["failures"] = {name: _failure(rank, *args) for name, args in FAILURES.items()}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _used_union(report: RecalibrationReport) -> torch.Tensor:
    """The samples a run used: each rank uses the first ``samples_per_rank[r]`` samples of its shard, in order."""
    return torch.cat([_shard(r)[:n] for r, n in enumerate(report.samples_per_rank)])


def _first_layer_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        h = _model()[0](x).double()
    return h.mean(0), h.var(0)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp")
    return spawn_ranks(_worker, out, WORLD)


@pytest.mark.ddp
@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_uneven_shards_exact_over_the_union(ranks: list[dict[str, Any]], name: str) -> None:
    _, mode, _, budget = SCENARIOS[name]
    r0, r1 = ranks[0][name], ranks[1][name]
    report = r0["report"]
    assert report.samples_per_rank == r1["report"].samples_per_rank
    assert report.num_samples == r1["report"].num_samples == sum(report.samples_per_rank)
    assert report.num_samples == (budget if budget is not None else 1000)
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), f"{name} {key}: ranks differ"
    union = _used_union(report)
    mean, var = _first_layer_stats(union)
    first = "1.running_mean", "1.running_var"
    torch.testing.assert_close(r0["state"][first[0]].double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r0["state"][first[1]].double(), var, rtol=1e-5, atol=1e-6)
    if mode == "sequential":  # every layer is exact over the union, whatever the batching
        reference = _model()
        recalibrate_bn(reference, list(torch.split(union, 64)), mode="sequential")
        for key, value in reference.state_dict().items():
            if "running" in key:
                torch.testing.assert_close(r0["state"][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_agreement_kind_and_its_collectives(ranks: list[dict[str, Any]]) -> None:
    r0 = ranks[0]
    assert r0["planned"]["report"].agreement == "planned"
    assert r0["per_batch"]["report"].agreement == "per_batch"
    assert r0["sync"]["report"].agreement == "per_batch"
    # planned: a fixed handful of small all-reduces (plan, settle, sample counts, NaN check), none per batch
    assert r0["planned"]["all_reduce"] <= 4
    assert r0["per_batch"]["all_reduce"] >= 12  # one per step at least: 12 steps until rank 0 runs out
    # the budget that rank 1 could not fill is finished per batch by rank 0 (exactly 900 samples)
    assert r0["planned_budget"]["report"].samples_per_rank == [500, 400]
    assert r0["per_batch_budget"]["report"].samples_per_rank == [450, 250]


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_syncbn_ranks_that_ran_out_forward_empty_batches(ranks: list[dict[str, Any]]) -> None:
    r0, r1 = ranks[0]["sync"]["report"], ranks[1]["sync"]["report"]
    # 14 steps: rank 0 forwards its 12 batches, then 2 empty ones while rank 1 finishes (no hang)
    assert r0.num_batches == 12 and r1.num_batches == 14
    assert r0.samples_per_rank == [600, 400]
    assert ranks[0]["sync_budget"]["report"].samples_per_rank == [450, 250]


def _first_layer_error(ranks: list[dict[str, Any]], name: str) -> float:
    """Max abs error of rank 0's first-layer statistics against the union's (for the record)."""
    state = ranks[0][name]["state"]
    mean, var = _first_layer_stats(_used_union(ranks[0][name]["report"]))
    return max(
        float((state["1.running_mean"].double() - mean).abs().max()),
        float((state["1.running_var"].double() - var).abs().max()),
    )


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_error_against_the_union_is_float_rounding(ranks: list[dict[str, Any]]) -> None:
    errors = {name: _first_layer_error(ranks, name) for name in SCENARIOS}
    print("max abs error vs union:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) < 1e-5


class _SaveBuffers(Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        buffers = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items() if "running" in k}
        torch.save(buffers, Path(self.out) / f"lightning_rank{trainer.global_rank}.pt")


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_ddp_spawn_trainer_identical_buffers(tmp_path: Path, make_trainer: Any) -> None:
    recal = BNRecalibration(num_samples=600, verbose=True)
    trainer = make_trainer(
        devices=WORLD,
        strategy="ddp_spawn",
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[recal, _SaveBuffers(str(tmp_path))],
    )
    trainer.fit(ConvNetClassifier(input_size=8, padding="same", channels=(8, 8)), DigitsDataModule(batch_size=32))
    b0 = torch.load(tmp_path / "lightning_rank0.pt")
    b1 = torch.load(tmp_path / "lightning_rank1.pt")
    assert b0.keys() == b1.keys() and len(b0) == 4
    for key in b0:
        assert torch.equal(b0[key], b1[key]), key


@pytest.mark.ddp
@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", list(FAILURES))
def test_an_error_on_one_rank_reaches_every_rank(ranks: list[dict[str, Any]], name: str) -> None:
    # every rank raises, at once (the collectives time out after 30 s: a rank left waiting would fail with a timeout
    # instead), the failing rank its own error noting its rank, the others one naming the failing rank and its error
    failing = FAILURES[name][3]
    for r in range(WORLD):
        result = ranks[r]["failures"][name]
        error = result["error"]
        assert error, f"rank {r} did not raise"
        assert result["unchanged"], f"rank {r}: statistics changed although the recalibration failed"
        assert "timed out" not in error["message"].lower() and "connection" not in error["message"].lower()
        expected = "UncountableBatches" if failing.get(r) == -1 else "_Boom"
        if r in failing:
            assert error["type"] == expected
            assert any(f"raised on rank {r} of 2" in note for note in error["notes"]), error
            if expected == "UncountableBatches":
                assert error["message"].startswith("recalibrate_bn: a sample budget (`num_samples`)")
                assert "Pass `num_batches` instead of `num_samples`" in error["message"]
        else:
            assert error["type"] == "RankFailure"
            failed = ", ".join(f"rank {f}" for f in sorted(failing))
            assert error["message"].startswith(f"recalibrate_bn: {failed} of 2 failed"), error
            for f, where in failing.items():
                kind = "UncountableBatches" if where == -1 else "_Boom"
                assert f"rank {f} raised {kind}: " in error["message"], error
