"""Mode ``"sequential"`` on BatchNorm layers called several times in one forward (issue 24 item 21): every call's
input counts, exactly as in mode ``"train"`` and as a float64 oracle of the inference-time inputs says."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_bnsgd.bn.recalibrate import recalibrate_bn


def _stats(*inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.cat(inputs).double()
    return x.mean(0), x.var(0, unbiased=True)


def _eval_bn(layer: nn.BatchNorm1d, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``layer`` at inference with the statistics ``mean``/``var``, in float64."""
    w, b = layer.weight.double(), layer.bias.double()
    return (x - mean) / (var + layer.eps).sqrt() * w + b


def _close(layer: nn.BatchNorm1d, mean: torch.Tensor, var: torch.Tensor) -> None:
    torch.testing.assert_close(layer.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.running_var.double(), var, rtol=1e-5, atol=1e-6)


class Siamese(nn.Module):
    """One branch applied to both items of a pair: each BatchNorm layer runs twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4), nn.BatchNorm1d(4))
        self.head = nn.Linear(8, 2)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.branch(pair[:, 0]), self.branch(pair[:, 1])], dim=1))


def _pairs() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    left = torch.randn(300, 3, generator=gen) * 2.0 + 1.0
    right = torch.randn(300, 3, generator=gen) * 0.5 - 3.0  # the second items differ: both calls must count
    return list(torch.split(torch.stack([left, right], dim=1), [64, 64, 64, 64, 44]))


def test_sequential_counts_both_calls_of_a_siamese_branch() -> None:
    torch.manual_seed(0)
    model = Siamese()
    batches = _pairs()
    in_train = copy.deepcopy(model)
    report = recalibrate_bn(model, batches, mode="sequential")
    recalibrate_bn(in_train, batches, mode="train")
    assert report.layers == ["branch.1", "branch.4"]
    pairs = torch.cat(batches).double()
    net = copy.deepcopy(model).double()
    lin1, bn1, lin2 = net.branch[0], net.branch[1], net.branch[3]
    with torch.no_grad():
        first = [lin1(pairs[:, k]) for k in (0, 1)]
        mean1, var1 = _stats(*first)
        second = [lin2(torch.relu(_eval_bn(bn1, h, mean1, var1))) for h in first]
        mean2, var2 = _stats(*second)
    _close(model.branch[1], mean1, var1)  # both calls' inputs, not the first item's alone
    _close(in_train.branch[1], mean1, var1)  # the first layer: mode "train" gets the same exactly
    _close(model.branch[4], mean2, var2)  # inference semantics: the earlier layer with its new statistics


class SharedHead(nn.Module):
    """A head applied after each stage (deep supervision, a head shared across feature maps): the head's second
    call comes after a layer (``bn_b``) that is first reached after the head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn_a = nn.Linear(3, 4), nn.BatchNorm1d(4)
        self.stage, self.bn_b = nn.Linear(4, 4), nn.BatchNorm1d(4)
        self.head, self.head_bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f1 = torch.relu(self.bn_a(self.stem(x)))
        f2 = torch.relu(self.bn_b(self.stage(f1)))
        return self.head_bn(self.head(f1)) + self.head_bn(self.head(f2))


def test_sequential_gives_a_shared_head_the_inference_inputs_of_every_call() -> None:
    torch.manual_seed(0)
    model = SharedHead()
    with torch.no_grad():
        model.stage.bias.fill_(2.0)  # the second feature map differs from the first
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 3, generator=gen) * 3.0 + 1.0
    batches = list(torch.split(x, 50))
    report = recalibrate_bn(model, batches, mode="sequential")
    assert sorted(report.layers) == ["bn_a", "bn_b", "head_bn"]
    assert report.passes > 3  # the rounds that settle the head after bn_b
    net = copy.deepcopy(model).double()
    xd = x.double()
    with torch.no_grad():
        mean_a, var_a = _stats(net.stem(xd))
        f1 = torch.relu(_eval_bn(net.bn_a, net.stem(xd), mean_a, var_a))
        mean_b, var_b = _stats(net.stage(f1))
        f2 = torch.relu(_eval_bn(net.bn_b, net.stage(f1), mean_b, var_b))
        mean_h, var_h = _stats(net.head(f1), net.head(f2))
    _close(model.bn_a, mean_a, var_a)
    _close(model.bn_b, mean_b, var_b)
    _close(model.head_bn, mean_h, var_h)


def test_sequential_refuses_a_layer_whose_input_depends_on_its_own_statistics() -> None:
    """A block applied to its own output has no one-pass-per-layer answer: an error, nothing changed."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model = nn.Sequential(block, block)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"did not settle.*its own statistics"):
        recalibrate_bn(model, [torch.randn(32, 4) * 3.0 for _ in range(2)], mode="sequential")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
