"""The fast reader of mode "train" (one copy of the flat buffers per forward) against the hooked reader (a forward
hook per layer, the reference): on random small models both must leave identical statistics."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest
import torch
from torch import nn

from lightning_bnsgd.bn.collector import StatsCollector
from lightning_bnsgd.bn.recalibrate import recalibrate_bn

_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _random_model(rng: random.Random) -> tuple[nn.Module, tuple[int, ...]]:
    """A stack of (conv or linear, BatchNorm, ReLU) blocks of random width, dimension, affine and momentum; with
    the input shape of one sample."""
    dim = rng.choice([0, 1, 2, 3])  # 0: linear layers with BatchNorm1d on (N, C)
    channels = rng.randint(1, 4)
    sample = (channels,) if dim == 0 else (channels, *[rng.randint(2, 4)] * dim)
    layers: list[nn.Module] = []
    for _ in range(rng.randint(1, 4)):
        out = rng.randint(1, 5)
        if dim == 0:
            layers.append(nn.Linear(channels, out))
        else:
            conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
            layers.append(conv(channels, out, 3, padding=1))
        bn = _BN[max(dim, 1)](out, affine=rng.random() < 0.5, momentum=rng.choice([None, 0.1, 0.5]))
        layers += [bn, nn.ReLU()]
        channels = out
    return nn.Sequential(*layers), sample


def _buffers(model: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for t in m.buffers()]


@pytest.mark.parametrize("seed", range(12))
def test_fast_and_hooked_readers_leave_identical_statistics(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model, sample = _random_model(rng)
    sizes = [4, 4] + [rng.choice([1, 2, 3, 4, 5, 8]) for _ in range(rng.randint(1, 8))]  # shape (4, ...) repeats
    batches = [torch.randn(n, *sample) * rng.uniform(0.5, 3) + rng.uniform(-2, 2) for n in sizes]
    fast_forwards = []
    real_fast_forward = StatsCollector._fast_forward

    def counted(self: StatsCollector, *args: Any) -> None:
        fast_forwards.append(1)
        real_fast_forward(self, *args)

    monkeypatch.setattr(StatsCollector, "_fast_forward", counted)
    results = {}
    for reader in ("hooks", "flat"):
        monkeypatch.setattr(StatsCollector, "READER", reader)
        fast_forwards.clear()
        trial = copy.deepcopy(model)
        report = recalibrate_bn(trial, batches)
        results[reader] = (_buffers(trial), report.num_samples, report.num_batches, report.layers, len(fast_forwards))
    hooked, fast = results["hooks"], results["flat"]
    assert hooked[4] == 0 and fast[4] > 0  # each reader did read the forwards after a shape's first
    assert fast[1:4] == hooked[1:4]
    for a, b in zip(fast[0], hooked[0], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(fast[0], _buffers(model), strict=True))  # the statistics moved
