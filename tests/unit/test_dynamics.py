"""Scale-invariance detection and the math of `lightning_bnsgd.bn.dynamics` (pure torch)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_bnsgd.bn.dynamics import (
    angular_update,
    effective_lr,
    equilibrium_angular_update,
    find_scale_invariant,
    sgd_group_equilibrium,
    weight_layers,
)
from lightning_bnsgd.models.cnn import BNConvNet


def _probe() -> torch.Tensor:
    return torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------- math
def test_effective_lr_is_lr_over_squared_norm():
    assert effective_lr(0.1, 0.5) == pytest.approx(0.4)
    assert effective_lr(0.1, 0.0) == math.inf


@pytest.mark.parametrize("angle", [1e-6, 1e-3, 0.3, 1.5, 3.0])
def test_angular_update_matches_a_known_rotation_even_when_tiny(angle):
    a = torch.tensor([2.0, 0.0, 0.0])
    b = 5.0 * torch.tensor([math.cos(angle), math.sin(angle), 0.0])
    assert float(angular_update(a, b)) == pytest.approx(angle, rel=1e-6)


def test_angular_update_ignores_scale_and_shape():
    w = torch.randn(4, 3, 3, 3)
    assert float(angular_update(w, 7.0 * w)) == pytest.approx(0.0, abs=1e-7)
    assert float(angular_update(w, -w)) == pytest.approx(math.pi)


def test_equilibrium_formula_values():
    # Wan et al. 2021 / Kosson et al. 2023: sqrt(2 lr wd / (1 + m)).
    assert equilibrium_angular_update(0.1, 5e-4, 0.9) == pytest.approx(math.sqrt(2 * 0.1 * 5e-4 / 1.9))
    assert equilibrium_angular_update(0.2, 1e-4) == pytest.approx(math.sqrt(2 * 0.2 * 1e-4))
    assert equilibrium_angular_update(0.2, 1e-4, 0.5, dampening=0.5) == pytest.approx(math.sqrt(0.1 * 1e-4 * 2 / 1.5))
    nesterov = equilibrium_angular_update(0.1, 5e-4, 0.9, nesterov=True)
    assert nesterov / equilibrium_angular_update(0.1, 5e-4, 0.9) == pytest.approx(math.sqrt(1 + 1.8 - 2 * 0.729))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"lr": -1.0, "weight_decay": 0.0}, ValueError),
        ({"lr": 0.1, "weight_decay": 0.0, "momentum": 1.0}, ValueError),
        ({"lr": "0.1", "weight_decay": 0.0}, TypeError),
    ],
)
def test_equilibrium_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error, match="equilibrium_angular_update"):
        equilibrium_angular_update(**kwargs)


def test_sgd_group_equilibrium_reads_torch_sgd_groups_and_skips_adam():
    w = nn.Parameter(torch.ones(3, 3))
    sgd = torch.optim.SGD([w], lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    assert sgd_group_equilibrium(sgd.param_groups[0]) == pytest.approx(
        equilibrium_angular_update(0.1, 5e-4, 0.9, nesterov=True)
    )
    adam = torch.optim.AdamW([w], lr=1e-3)
    assert sgd_group_equilibrium(adam.param_groups[0]) is None


@pytest.mark.parametrize(("momentum", "nesterov"), [(0.0, False), (0.9, False), (0.9, True), (0.5, True)])
def test_equilibrium_matches_torch_sgd_on_a_scale_invariant_random_walk(momentum, nesterov):
    """torch.optim.SGD on a weight with random gradients orthogonal to it, scaled 1/||w|| (scale-invariant)."""
    gen = torch.Generator().manual_seed(0)
    lr, wd = 0.1, 5e-3
    w = nn.Parameter(torch.randn(2000, generator=gen))
    opt = torch.optim.SGD([w], lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    angles = []
    for step in range(6000):
        with torch.no_grad():
            g = torch.randn(2000, generator=gen)
            g -= (g @ w) / (w @ w) * w
            w.grad = g / w.norm()
            before = w.detach().clone()
        opt.step()
        if step >= 4000:
            angles.append(float(angular_update(before, w)))
    measured = sum(angles) / len(angles)
    assert measured == pytest.approx(equilibrium_angular_update(lr, wd, momentum, nesterov), rel=0.03)


# ---------------------------------------------------------------------------------------------- detection
def test_post_activation_bnconvnet_weight_and_bias_are_invariant_together():
    net = BNConvNet(input_size=8, padding="same", channels=(8, 16))
    report = find_scale_invariant(net, _probe())
    assert report.names == ["features.0.conv", "features.1.conv"]
    assert report.groups[0].params == ("features.0.conv.weight", "features.0.conv.bias")
    assert all(g.granularity == "channel" for g in report.groups)
    assert list(report.rejected) == ["head"]
    assert "scal" in report.rejected["head"]
    assert "features.0.conv" in str(report)


def test_pre_activation_conv_weight_alone_is_invariant():
    net = BNConvNet(input_size=8, padding="same", channels=(8, 16), norm_position="pre_activation")
    report = find_scale_invariant(net, _probe())
    assert [g.params for g in report.groups] == [("features.0.conv.weight",), ("features.1.conv.weight",)]


def test_no_batchnorm_means_nothing_is_invariant():
    net = BNConvNet(input_size=8, padding="same", channels=(8, 16), batch_norm=False)
    report = find_scale_invariant(net, _probe())
    assert report.groups == []
    assert set(report.rejected) == {"features.0.conv", "features.1.conv", "head"}


class _Tricky(nn.Module):
    """A BN after the conv in module order, but the conv's output also reaches the head unnormalized."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.unused = nn.Linear(3, 3)
        self.head = nn.Linear(4 * 64 * 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head(torch.cat([self.bn(y).flatten(1), y.flatten(1)], dim=1))


def test_module_order_is_not_trusted_and_unused_weights_are_rejected():
    report = find_scale_invariant(_Tricky(), _probe())
    assert report.groups == []
    assert "scal" in report.rejected["conv"]
    assert "does not depend" in report.rejected["unused"]


def test_whole_tensor_only_invariance_is_told_apart_from_per_channel():
    # GroupNorm-like normalization over all channels together: only a common factor is invariant.
    net = nn.Sequential(nn.Linear(6, 4, bias=False), nn.Flatten(0), nn.LayerNorm(64, elementwise_affine=False))
    report = find_scale_invariant(net, torch.randn(16, 6))
    assert [(g.name, g.granularity) for g in report.groups] == [("0", "tensor")]


def test_probe_restores_buffers_flags_parameters_and_rng():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Dropout(0.5), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 2))
    net.eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    report = find_scale_invariant(net, _probe())
    assert report.names == ["0"]  # dropout draws the same mask in every probe forward
    assert not any(m.training for m in net.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_as_is_mode_respects_batchnorm_frozen_in_eval():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 2))
    net[1].eval()
    assert find_scale_invariant(net, _probe(), mode="as_is").groups == []
    assert find_scale_invariant(net, _probe(), mode="train").names == ["0"]


def test_weight_layers_skips_norms_frozen_and_lazy():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 4), nn.LazyLinear(2))
    net[2].weight.requires_grad_(False)
    assert [n for n, _ in weight_layers(net)] == ["0"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"factor": 1.0}, ValueError, "factor"),
        ({"factor": -2.0}, ValueError, "factor"),
        ({"rtol": 0.0}, ValueError, "rtol"),
        ({"mode": "eval"}, ValueError, "mode"),
    ],
)
def test_find_scale_invariant_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        find_scale_invariant(nn.Linear(2, 2), torch.randn(4, 2), **kwargs)


def test_forward_without_tensor_output_is_an_error():
    with pytest.raises(ValueError, match="no tensor"):
        find_scale_invariant(nn.Linear(2, 2), torch.randn(4, 2), lambda m, b: None)


def _deep(depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Conv2d(1 if i == 0 else 4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(4 * 64, 3))


@pytest.mark.parametrize("depth", [2, 12])
def test_the_probe_costs_the_same_few_forwards_whatever_the_depth(depth):
    net = _deep(depth)
    calls: list[int] = []
    net.register_forward_hook(lambda *args: calls.append(1))
    report = find_scale_invariant(net, _probe())
    assert len(report.groups) == depth
    assert len(calls) == 3  # the gradient screen (its outputs are the reference), joint scaling, joint perturbation


def test_per_layer_scaling_gives_the_same_answer_as_the_gradient_screen(monkeypatch):
    import lightning_bnsgd.bn.dynamics as dynamics

    nets = [BNConvNet(input_size=8, padding="same", channels=(8, 16)), _deep(3), _Tricky()]
    fast = [find_scale_invariant(net, _probe()) for net in nets]
    monkeypatch.setattr(dynamics, "_confirm", lambda *args: False)  # force the one-layer-at-a-time path
    slow = [find_scale_invariant(net, _probe()) for net in nets]
    for a, b in zip(fast, slow, strict=True):
        assert [(g.name, g.params, g.granularity) for g in a.groups] == [
            (g.name, g.params, g.granularity) for g in b.groups
        ]
        assert list(a.rejected) == list(b.rejected)


def test_sync_batch_norm_uses_this_processs_statistics_in_the_probe(monkeypatch):
    """The dynamics monitor probes on rank zero only: a SyncBatchNorm collective there would wait for the other ranks
    forever. Inside a (simulated) 2-process group, SyncBatchNorm's own forward would all-reduce (and refuses CPU
    inputs); the probe must not call it, and must leave the layer as it was."""
    net = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.SyncBatchNorm(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match="SyncBatchNorm"):  # what a collective forward would do here
        net(_probe())
    report = find_scale_invariant(net, _probe())
    assert report.names == ["0"]
    assert "forward" not in vars(net[1])
