"""Per-channel moments: Chan merge, pairwise merge (per-layer and per-channel counts), variance, all-gather."""

from __future__ import annotations

import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_bnsgd.bn.moments import (
    accumulation_dtype,
    all_gather_moments,
    chan_merge,
    merge_batch_stats,
    merge_moments,
    moments_from_batch_stats,
    variance_from_moments,
)


def _summaries(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    counts = torch.tensor([float(len(p)) for p in parts], dtype=torch.float64)
    means = torch.stack([p.mean(0) for p in parts])
    m2 = torch.stack([(p - p.mean(0)).pow(2).sum(0) for p in parts])
    return counts, means, m2


def _split(x: torch.Tensor, cuts: list[int]) -> list[torch.Tensor]:
    edges = [0, *sorted(set(cuts)), len(x)]
    return [x[a:b] for a, b in itertools.pairwise(edges) if b > a]


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=120),
    cuts=st.lists(st.integers(min_value=1, max_value=119), max_size=12),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_merge_of_any_split_equals_whole(n: int, cuts: list[int], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64) * 3 + 5
    x = x[x[:, 0].argsort()]  # sorted: large between-batch variance
    parts = _split(x, [c for c in cuts if c < n])
    count, mean, m2 = merge_moments(*_summaries(parts))
    assert float(count) == n
    torch.testing.assert_close(mean, x.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(variance_from_moments(count, m2), x.var(0), rtol=1e-10, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=120),
    cuts=st.lists(st.integers(min_value=1, max_value=119), max_size=12),
    seed=st.integers(min_value=0, max_value=10_000),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_batch_stats_merge_of_any_split_equals_whole(n: int, cuts: list[int], seed: int, dtype: torch.dtype) -> None:
    """Records as BatchNorm leaves them (mean, unbiased variance; NaN for a lone value), empty records holding
    NaN, per-record and per-channel counts: the two-pass float64 merge and the float32 tree both give the union."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64) * 3 + 5
    x = x[x[:, 0].argsort()]
    parts = _split(x, [c for c in cuts if c < n])
    nan = torch.full((3,), float("nan"), dtype=torch.float64)
    counts = torch.tensor([float(len(p)) for p in parts] + [0.0], dtype=torch.float64)
    means = torch.stack([p.mean(0) for p in parts] + [nan])
    variances = torch.stack([p.var(0) if len(p) > 1 else nan for p in parts] + [nan])
    tolerance = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    for count_arg in (counts, counts.unsqueeze(1).expand(-1, 3)):
        count, mean, m2 = merge_batch_stats(count_arg.to(dtype), means.to(dtype), variances.to(dtype))
        assert torch.all(count == n)
        torch.testing.assert_close(mean.double(), x.mean(0), **tolerance)
        torch.testing.assert_close(variance_from_moments(count, m2).double(), x.var(0), **tolerance)


def test_chan_merge_handles_empty_sides() -> None:
    x = torch.randn(10, 2, dtype=torch.float64)
    full = moments_from_batch_stats(10, x.mean(0), x.var(0))
    empty = (torch.tensor(0.0, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), torch.zeros(2))
    for merged in (chan_merge(full, empty), chan_merge(empty, full)):
        torch.testing.assert_close(merged[1], full[1])
        torch.testing.assert_close(merged[2], full[2].double())
    n, m, s = chan_merge(empty, empty)
    assert float(n) == 0 and torch.all(m == 0) and torch.all(s == 0)


def test_single_value_batches_have_zero_m2() -> None:
    x = torch.arange(6, dtype=torch.float64).view(6, 1)
    nan = torch.full((6, 1), float("nan"), dtype=torch.float64)  # unbiased variance of one value: undefined
    count, mean, m2 = merge_moments(*moments_from_batch_stats(torch.ones(6, dtype=torch.float64), x, nan))
    torch.testing.assert_close(mean, x.mean(0))
    torch.testing.assert_close(variance_from_moments(count, m2), x.var(0))


def test_pairwise_merge_is_accurate_in_float32() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 4, generator=gen, dtype=torch.float64) * 0.01 + 1000.0
    parts = list(torch.split(x, 7))
    counts, means, m2 = (t.float() for t in _summaries(parts))
    n, m, s = merge_moments(counts, means, m2)
    assert m.dtype == torch.float32
    torch.testing.assert_close(m.double(), x.mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(variance_from_moments(n, s).double(), x.var(0), rtol=1e-3, atol=0)


def test_per_channel_counts_merge_layers_side_by_side() -> None:
    """Two layers (2 and 3 channels) in one flat row per batch; a zero count leaves a batch out of its layer."""
    x = torch.randn(30, 2, dtype=torch.float64)
    y = torch.randn(12, 3, dtype=torch.float64) + 4.0
    parts_x = [x[:10], torch.zeros(0, 2, dtype=torch.float64), x[10:]]
    parts_y = [y[:5], y[5:], torch.full((0, 3), float("nan"), dtype=torch.float64)]
    counts = torch.tensor([[10.0] * 2 + [5.0] * 3, [0.0] * 2 + [7.0] * 3, [20.0] * 2 + [0.0] * 3], dtype=torch.float64)
    means = torch.stack(
        [
            torch.cat([a.mean(0) if len(a) else torch.zeros(2), b.mean(0) if len(b) else torch.zeros(3)])
            for a, b in zip(parts_x, parts_y, strict=True)
        ]
    ).double()
    variances = torch.stack(
        [
            torch.cat([a.var(0) if len(a) > 1 else torch.zeros(2), b.var(0) if len(b) > 1 else torch.zeros(3)])
            for a, b in zip(parts_x, parts_y, strict=True)
        ]
    ).double()
    n, m, s = merge_moments(*moments_from_batch_stats(counts, means, variances))
    assert n.tolist() == [30.0, 30.0, 12.0, 12.0, 12.0]
    torch.testing.assert_close(m, torch.cat([x.mean(0), y.mean(0)]))
    torch.testing.assert_close(variance_from_moments(n, s), torch.cat([x.var(0), y.var(0)]))
    torch.testing.assert_close(
        variance_from_moments(n, s, unbiased=False), torch.cat([x.var(0, unbiased=False), y.var(0, unbiased=False)])
    )


def test_variance_is_clamped_and_guarded() -> None:
    out = variance_from_moments(torch.tensor(1.0), torch.tensor([-1e-12, 3.0]))
    assert torch.all(out >= 0)
    assert torch.isfinite(out).all()


def test_accumulation_dtype() -> None:
    assert accumulation_dtype(None) == torch.float64
    assert accumulation_dtype(torch.device("cpu")) == torch.float64
    assert accumulation_dtype("mps") == torch.float32


def test_all_gather_without_process_group_is_identity() -> None:
    moments = [(torch.tensor(3.0), torch.ones(2), torch.zeros(2))]
    assert all_gather_moments(moments) is moments
