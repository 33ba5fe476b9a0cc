"""Unit tests of the pure-torch BatchNorm summaries in ``lightning_bnsgd.bn.inspect``."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_bnsgd.bn.distributed import all_ranks_max_min, all_reduce_max
from lightning_bnsgd.bn.inspect import (
    ANOMALIES,
    BUFFER_STATS,
    CHECKED_TENSORS,
    GAP_STATS,
    Segments,
    anomaly_flags,
    batch_moments,
    batchnorm_layers,
    configuration_issues,
    gap_summaries,
    summarize_layers,
    updates_running_stats,
)


def buffer_summary(bn: nn.Module, dead_threshold: float = 1e-2) -> torch.Tensor:
    """One layer's row of `summarize_layers`."""
    return summarize_layers([bn], dead_threshold)[0][0]


def nonfinite_counts(bn: nn.Module) -> torch.Tensor:
    """One layer's NaN/Inf counts from `summarize_layers`."""
    return summarize_layers([bn])[1][0]


def batch_gap(mean: torch.Tensor, var: torch.Tensor, rm: torch.Tensor, rv: torch.Tensor, eps: float) -> torch.Tensor:
    """One layer's row of `gap_summaries`."""
    segments = Segments([mean.numel()], mean.device)
    return gap_summaries(mean, var, rm, rv, torch.full_like(mean, eps), segments)[0]


def _random_bn(channels: int, seed: int = 0) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) * 3 + 0.1)
        bn.weight.copy_(torch.randn(channels, generator=g))
        bn.bias.copy_(torch.randn(channels, generator=g))
    return bn


def _reference_summary(bn: nn.BatchNorm2d, dead_threshold: float) -> dict[str, float]:
    """The summaries computed the long way, in float64, channel by channel."""
    rm = [float(v) for v in bn.running_mean.double()]
    rv = [float(v) for v in bn.running_var.double()]
    w = [float(v) for v in bn.weight.detach().double()]
    b = [float(v) for v in bn.bias.detach().double()]
    n = len(rm)

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    def pstd(xs: list[float]) -> float:
        m = mean(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))

    gain = [abs(w[i]) / math.sqrt(rv[i] + bn.eps) for i in range(n)]
    return {
        "running_mean_mean": mean(rm),
        "running_mean_absmean": mean([abs(x) for x in rm]),
        "running_var_min": min(rv),
        "running_var_mean": mean(rv),
        "running_var_max": max(rv),
        "weight_mean": mean(w),
        "weight_std": pstd(w),
        "bias_mean": mean(b),
        "bias_std": pstd(b),
        "dead_frac": sum(abs(x) < dead_threshold for x in w) / n,
        "gain_mean": mean(gain),
        "gain_max": max(gain),
        "nonfinite_count": 0.0,
    }


def test_buffer_summary_matches_reference() -> None:
    bn = _random_bn(7)
    with torch.no_grad():
        bn.weight[2] = 1e-4  # one dead channel
        bn.weight[5] = -0.005  # dead too: the threshold applies to |gamma|
    got = dict(zip(BUFFER_STATS, buffer_summary(bn, dead_threshold=0.01).tolist(), strict=True))
    expected = _reference_summary(bn, 0.01)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert got["dead_frac"] == pytest.approx(2 / 7)


@settings(max_examples=25, deadline=None)
@given(channels=st.integers(1, 33), seed=st.integers(0, 10_000), threshold=st.floats(0.0, 2.0))
def test_buffer_summary_property(channels: int, seed: int, threshold: float) -> None:
    bn = _random_bn(channels, seed)
    got = buffer_summary(bn, dead_threshold=threshold)
    expected = _reference_summary(bn, threshold)
    assert got.dtype == torch.float32 and got.shape == (len(BUFFER_STATS),)
    for key, value in zip(BUFFER_STATS, got.tolist(), strict=True):
        assert value == pytest.approx(expected[key], rel=1e-4, abs=1e-5), key


def test_buffer_summary_missing_parts_are_nan() -> None:
    no_affine = dict(zip(BUFFER_STATS, buffer_summary(nn.BatchNorm1d(3, affine=False)).tolist(), strict=True))
    for key in ("weight_mean", "weight_std", "bias_mean", "bias_std", "dead_frac"):
        assert math.isnan(no_affine[key]), key
    # without gamma the gain is 1 / sqrt(running_var + eps)
    assert no_affine["gain_max"] == pytest.approx(1 / math.sqrt(1 + 1e-5))
    no_stats = nn.BatchNorm1d(3, track_running_stats=False)
    values = dict(zip(BUFFER_STATS, buffer_summary(no_stats).tolist(), strict=True))
    for key in ("running_mean_mean", "running_var_min", "running_var_max", "gain_mean", "gain_max"):
        assert math.isnan(values[key]), key
    assert values["weight_mean"] == pytest.approx(1.0)


def test_batch_moments_float32_and_unbiased() -> None:
    x = torch.randn(5, 3, 4, 2, dtype=torch.float16)
    mean, var, samples = batch_moments(x)
    assert mean.dtype == torch.float32 and var.dtype == torch.float32
    assert samples == 5 * 4 * 2
    flat = x.float().transpose(0, 1).reshape(3, -1)
    assert torch.allclose(mean, flat.mean(dim=1), atol=1e-6)
    assert torch.allclose(var, flat.var(dim=1, unbiased=True), atol=1e-5)
    mean64, _, _ = batch_moments(x.double())
    assert mean64.dtype == torch.float64
    with pytest.raises(ValueError, match="channel dimension"):
        batch_moments(torch.zeros(4))


def test_gap_zero_for_exact_statistics_and_ln10_for_scaled_variance() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 6, 5, 5) * 3 + 2
    bn = nn.BatchNorm2d(6, momentum=1.0).train()
    bn(x)  # momentum 1: running statistics = this batch's (unbiased variance)
    mean, var, _ = batch_moments(x)
    exact = batch_gap(mean, var, bn.running_mean, bn.running_var, bn.eps)
    assert exact.abs().max().item() < 1e-5
    scaled = batch_gap(mean, var, bn.running_mean, bn.running_var * 10, bn.eps)
    gaps = dict(zip(GAP_STATS, scaled.tolist(), strict=True))
    assert gaps["gap_var_mean"] == pytest.approx(math.log(10), abs=1e-4)
    assert gaps["gap_var_max"] == pytest.approx(math.log(10), abs=1e-4)
    assert gaps["gap_mean_max"] < 1e-4


def test_gap_mean_in_running_std_units() -> None:
    batch_mean = torch.tensor([1.0, -2.0, 0.0])
    running_mean = torch.zeros(3)
    running_var = torch.tensor([4.0, 1.0, 1.0])
    gap = batch_gap(batch_mean, running_var.clone(), running_mean, running_var, eps=0.0)
    # |1 - 0| / 2 = 0.5, |-2 - 0| / 1 = 2, 0
    assert gap[0].item() == pytest.approx((0.5 + 2 + 0) / 3)
    assert gap[1].item() == pytest.approx(2.0)
    assert gap[2].item() == pytest.approx(0.0) and gap[3].item() == pytest.approx(0.0)


def test_nonfinite_counts_and_flags() -> None:
    good, bad = _random_bn(4, 1), _random_bn(4, 2)
    with torch.no_grad():
        bad.running_var[1] = float("nan")
        bad.bias[0] = float("inf")
        bad.bias[3] = float("-inf")
    assert nonfinite_counts(good).tolist() == [0.0] * len(CHECKED_TENSORS)
    assert nonfinite_counts(bad).tolist() == [0.0, 1.0, 0.0, 2.0]
    summary = torch.stack([buffer_summary(good), buffer_summary(bad)])
    assert summary[1, BUFFER_STATS.index("nonfinite_count")].item() == 3.0
    flags = anomaly_flags(summary, torch.stack([nonfinite_counts(good), nonfinite_counts(bad)]))
    by_name = [dict(zip(ANOMALIES, row, strict=True)) for row in flags.tolist()]
    assert all(v == 0.0 for v in by_name[0].values())
    assert by_name[1]["nonfinite_running_var"] == 1.0 and by_name[1]["nonfinite_bias"] == 1.0
    assert by_name[1]["nonfinite_running_mean"] == 0.0 and by_name[1]["nonfinite_weight"] == 0.0


def test_anomaly_bounds() -> None:
    bn = _random_bn(4, 3)
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([1e-9, 1.0, 1.0, 5e6]))
        bn.weight.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))
    summary, nonfinite = buffer_summary(bn)[None], nonfinite_counts(bn)[None]
    flags = dict(zip(ANOMALIES, anomaly_flags(summary, nonfinite, 1e-8, 1e6, 0.5)[0].tolist(), strict=True))
    assert flags["running_var_low"] == flags["running_var_high"] == flags["dead_frac_high"] == 1.0
    relaxed = anomaly_flags(summary, nonfinite, 1e-10, 1e7, 0.8)[0]
    assert relaxed.sum().item() == 0.0
    disabled = anomaly_flags(summary, nonfinite, None, None, None)[0]
    assert disabled.sum().item() == 0.0


def test_all_ranks_max_min_with_a_simulated_second_rank() -> None:
    mine = torch.tensor([[1.0, 5.0], [-3.0, 0.5]])
    theirs = torch.tensor([[2.0, 5.0], [-4.0, 0.0]])

    def reduce_max(payload: torch.Tensor) -> torch.Tensor:
        flat = theirs.reshape(-1)
        return torch.maximum(payload, torch.cat([flat, -flat]))

    mx, mn = all_ranks_max_min(mine, reduce_max)
    assert torch.equal(mx, torch.maximum(mine, theirs))
    assert torch.equal(mn, torch.minimum(mine, theirs))
    assert torch.equal(mx - mn, (mine - theirs).abs())
    # one process: the reduction is the identity and every difference is 0
    mx1, mn1 = all_ranks_max_min(mine, all_reduce_max)
    assert torch.equal(mx1, mine) and torch.equal(mn1, mine)


def test_segments_reduce_each_layer_and_propagate_nan() -> None:
    values = torch.tensor([0.0, 3.0, 1.0, 7.0, 2.0, 2.5])
    segments = Segments([1, 3, 2], torch.device("cpu"))
    assert segments.max(values).tolist() == [0.0, 7.0, 2.5]
    assert segments.min(values).tolist() == [0.0, 1.0, 2.0]
    assert segments.sum(values).tolist() == [0.0, 11.0, 4.5]
    values[4] = float("nan")
    assert math.isnan(segments.max(values)[2].item()) and segments.max(values)[1].item() == 7.0
    with pytest.raises(ValueError, match="sizes"):
        Segments([2, 0], torch.device("cpu"))


def test_configuration_issues_and_layer_discovery() -> None:
    net = nn.Sequential(
        nn.Linear(2, 3),
        nn.BatchNorm1d(3, momentum=None),
        nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False), nn.SyncBatchNorm(3)),
        nn.LayerNorm(3),
        nn.BatchNorm1d(3, momentum=0.0),
    )
    layers = batchnorm_layers(net)
    assert [name for name, _ in layers] == ["1", "2.0", "2.1", "4"]
    assert configuration_issues(layers) == {
        "no_running_stats": ["2.0"],
        "momentum_none": ["1"],
        "momentum_zero": ["4"],
    }


def test_frozen_layers_have_no_configuration_issue() -> None:
    """Lightning's ``BaseFinetuning.freeze_module`` switches tracking off but keeps the buffers; eval mode freezes too:
    such layers use their running statistics in evaluation and their momentum never applies."""
    tracked_off = nn.BatchNorm1d(3, momentum=None)
    tracked_off.track_running_stats = False
    in_eval = nn.BatchNorm1d(3, momentum=0.0).eval()
    built_without = nn.BatchNorm1d(3, track_running_stats=False)
    net = nn.Sequential(tracked_off, in_eval, built_without)
    assert configuration_issues(batchnorm_layers(net)) == {
        "no_running_stats": ["2"],
        "momentum_none": [],
        "momentum_zero": [],
    }
    assert [updates_running_stats(m) for m in net] == [False, False, False]
    in_eval.train()
    tracked_off.track_running_stats = True
    assert [updates_running_stats(m) for m in net] == [True, True, False]
