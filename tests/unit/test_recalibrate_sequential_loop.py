"""Mode ``"sequential"`` against its definition written with the one-pass function: for each BatchNorm layer in
forward order, one mode-``"train"`` recalibration of that layer alone (every other BatchNorm layer in eval mode,
the earlier ones already holding their new statistics). On random models whose layers run once per forward both
must leave the same statistics; layers called several times per forward are `test_recalibrate_shared_layers`'s."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_bnsgd.bn.recalibrate import recalibrate_bn


def _random_model(rng: random.Random) -> tuple[nn.Module, tuple[int, ...]]:
    """Blocks of (conv or linear, then BatchNorm, ReLU, sometimes pooling or dropout, in a random order), with the
    input shape of one sample."""
    dim = rng.choice([0, 2])  # 0: linear layers with BatchNorm1d on (N, C); 2: Conv2d with BatchNorm2d
    channels = rng.randint(1, 4)
    sample = (channels,) if dim == 0 else (channels, 6, 6)
    layers: list[nn.Module] = []
    for _ in range(rng.randint(2, 5)):
        out = rng.randint(2, 6)
        layers.append(nn.Linear(channels, out) if dim == 0 else nn.Conv2d(channels, out, 3, padding=1))
        bn = (nn.BatchNorm1d if dim == 0 else nn.BatchNorm2d)(out, affine=rng.random() < 0.7)
        block = [bn, nn.ReLU()]
        if rng.random() < 0.5:
            block.reverse()  # pre- or post-activation
        if rng.random() < 0.3:
            block.append(nn.Dropout(0.5))  # eval in both: the loop passes dropout="eval" as sequential does
        layers += block
        channels = out
    return nn.Sequential(*layers), sample


def _loop_of_one_pass(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Mode "sequential" by its definition: one-pass recalibrations, one layer at a time, in forward order."""
    order = [m for m in model.modules() if isinstance(m, _BatchNorm)]  # nn.Sequential: registration = forward
    model.train()
    for target in order:
        for layer in order:
            layer.train(layer is target)
        recalibrate_bn(model, batches, mode="train", dropout="eval")
    model.train()


@pytest.mark.parametrize("seed", range(10))
def test_sequential_equals_the_loop_of_one_pass_recalibrations(seed: int) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model, sample = _random_model(rng)
    sizes = [rng.choice([2, 3, 5, 8, 16]) for _ in range(rng.randint(2, 6))]
    batches = [torch.randn(n, *sample) * rng.uniform(0.5, 3) + rng.uniform(-2, 2) for n in sizes]
    with torch.no_grad():  # statistics far from the defaults, so that a layer estimated with stale ones shows
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.uniform_(-3, 3)
                m.running_var.uniform_(0.1, 5)
    reference = copy.deepcopy(model)
    report = recalibrate_bn(model, batches, mode="sequential")
    _loop_of_one_pass(reference, batches)
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert report.passes == len(layers)
    for i, (ours, theirs) in enumerate(
        zip(layers, [m for m in reference.modules() if isinstance(m, _BatchNorm)], strict=True)
    ):
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-6, msg=f"layer {i}")
        torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6, msg=f"layer {i}")


def test_the_loop_differs_from_one_pass_of_every_layer() -> None:
    """The comparison above can fail: one mode-"train" pass over every layer estimates each later layer from
    inputs normalized with batch statistics, which mode "sequential" (and the loop) do not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 4), nn.BatchNorm1d(4))
    batches = [torch.randn(4, 3) * 2 + 1 for _ in range(3)]  # small batches: batch and population statistics differ
    one_pass = copy.deepcopy(model)
    recalibrate_bn(one_pass, batches, mode="train")
    _loop_of_one_pass(model, batches)
    assert not torch.allclose(model[4].running_var, one_pass[4].running_var, rtol=1e-3)
