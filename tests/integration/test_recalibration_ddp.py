"""Recalibration across 2 CPU processes (gloo): identical buffers, exact union, no hang on uneven data."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from lightning_bnsgd._compat import Callback, Trainer
from lightning_bnsgd.bn.recalibrate import recalibrate_bn
from lightning_bnsgd.callbacks.recalibration import BNRecalibration
from lightning_bnsgd.data.digits import DigitsDataModule
from lightning_bnsgd.models.classifier import ConvNetClassifier

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.2), nn.Linear(6, 4), nn.BatchNorm1d(4)
    )


def _data() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1000, 3, generator=gen)
    return x[x[:, 0].argsort()]  # sorted: the two ranks see very different data


def _rank_batches(rank: int) -> list[torch.Tensor]:
    x = _data()
    if rank == 0:
        return list(torch.split(x[:600], 50))  # 12 batches of 50
    return list(torch.split(x[600:], 34))  # 11 batches of 34 and one of 26


class _CollectiveBN(nn.BatchNorm1d):
    """Stands in for SyncBatchNorm on CPU: a collective in every forward, so unequal forward counts hang."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        flag = torch.ones(1)
        dist.all_reduce(flag)
        return super().forward(input)


class _GatheringSyncBN(nn.SyncBatchNorm):
    """SyncBatchNorm's semantics on CPU (the real one needs a GPU): batch statistics over all processes' inputs."""

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


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results: dict[str, Any] = {}
        for mode in ("train", "sequential"):
            model = _model()
            report = recalibrate_bn(model, _rank_batches(rank), mode=mode)
            results[mode] = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
            results[f"{mode}_samples"] = report.num_samples
        synced = nn.Sequential(nn.Linear(3, 4), _CollectiveBN(4))
        batches = list(torch.split(_data()[rank * 500 : rank * 500 + (250 if rank else 400)], 50))  # 8 vs 5
        report = recalibrate_bn(synced, batches)
        results["uneven_batches"] = report.num_batches
        results["uneven_var"] = synced[1].running_var.clone()
        torch.manual_seed(0)
        sync_model = nn.Sequential(nn.Linear(3, 4), _GatheringSyncBN(4))
        report = recalibrate_bn(sync_model, _rank_batches(rank))
        results["sync_samples"] = report.num_samples
        results["sync_stats"] = (sync_model[1].running_mean.clone(), sync_model[1].running_var.clone())
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_two_processes_match_the_union(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    union = _rank_batches(0) + _rank_batches(1)
    for mode in ("train", "sequential"):
        assert r0[f"{mode}_samples"] == r1[f"{mode}_samples"] == 1000
        reference = _model()
        recalibrate_bn(reference, union, mode=mode)
        for key, value in reference.state_dict().items():
            if "running" not in key:
                continue
            assert torch.equal(r0[mode][key], r1[mode][key]), f"{mode} {key}: ranks differ"
            torch.testing.assert_close(r0[mode][key], value, rtol=1e-5, atol=1e-6)
    x = _data()
    torch.testing.assert_close(r0["train"]["1.running_mean"].double(), _first_linear_stats(x)[0], rtol=1e-5, atol=1e-6)
    assert r0["uneven_batches"] == r1["uneven_batches"] == 5  # agreed on the shorter loader, no hang
    assert torch.equal(r0["uneven_var"], r1["uneven_var"])
    # SyncBatchNorm: already global per forward, counted with the global element count, not merged twice
    assert r0["sync_samples"] == r1["sync_samples"] == 1000
    assert all(torch.equal(a, b) for a, b in zip(r0["sync_stats"], r1["sync_stats"], strict=True))
    torch.manual_seed(0)
    with torch.no_grad():
        h = nn.Linear(3, 4)(x).double()
    torch.testing.assert_close(r0["sync_stats"][0].double(), h.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r0["sync_stats"][1].double(), h.var(0), rtol=1e-5, atol=1e-6)


def _first_linear_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        h = _model()[0](x).double()
    return h.mean(0), h.var(0)


class _SaveBuffers(Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        buffers = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items() if "running" in k}
        torch.save(buffers, Path(self.out) / f"lightning_rank{trainer.global_rank}.pt")


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_ddp_spawn_trainer_identical_buffers(tmp_path: Path) -> None:
    recal = BNRecalibration(num_samples=600, verbose=True)
    trainer = Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy="ddp_spawn",
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        callbacks=[recal, _SaveBuffers(str(tmp_path))],
    )
    trainer.fit(ConvNetClassifier(input_size=8, padding="same", channels=(8, 8)), DigitsDataModule(batch_size=32))
    b0 = torch.load(tmp_path / "lightning_rank0.pt")
    b1 = torch.load(tmp_path / "lightning_rank1.pt")
    assert b0.keys() == b1.keys() and len(b0) == 4
    for key in b0:
        assert torch.equal(b0[key], b1[key]), key
