"""Per-channel running moments (count, mean, M2) with exact merges across batches and processes.

A batch of ``n`` values per channel with mean ``m`` and unbiased variance ``v`` is summarized by
``(n, m, M2)`` with ``M2 = v * (n - 1)``, the sum of squared deviations from the mean. Two summaries merge
exactly (Chan, Golub & LeVeque 1979):

``n = na + nb``, ``mean = ma + d * nb / n``, ``M2 = M2a + M2b + d**2 * na * nb / n`` with ``d = mb - ma``.

So the count-weighted mean and the unbiased variance of the union, between-batch variance included, come out
of any split of the data. The merges below are pairwise (a balanced tree), which keeps float32 accurate where
float64 is not available (MPS); everywhere else the accumulation runs in float64. Pure torch, no Lightning.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_bnsgd.bn.distributed import comm_device, world_size

Moments = tuple[Tensor, Tensor, Tensor]


def accumulation_dtype(device: torch.device | str | None) -> torch.dtype:
    """The dtype used to accumulate moments on ``device``: float64, or float32 where float64 is unsupported.

    Examples:
        >>> accumulation_dtype("cpu"), accumulation_dtype("mps")
        (torch.float64, torch.float32)
    """
    kind = torch.device(device).type if device is not None else "cpu"
    return torch.float32 if kind == "mps" else torch.float64


def moments_from_batch_stats(count: Tensor | float, mean: Tensor, var: Tensor, unbiased: bool = True) -> Moments:
    """Turn a batch's per-channel mean and variance into ``(count, mean, M2)``.

    Args:
        count: values per channel in the batch: a scalar, one per leading index of ``mean`` (shape
            ``mean.shape[:-1]``), or one per channel (the shape of ``mean``).
        mean: per-channel mean, shape ``(..., C)``.
        var: per-channel variance of the same shape (unbiased, as BatchNorm stores it, unless
            ``unbiased=False``).
        unbiased: whether ``var`` divides by ``count - 1`` (else by ``count``).

    Examples:
        >>> x = torch.tensor([[1.0], [2.0], [4.0]], dtype=torch.float64)
        >>> n, m, m2 = moments_from_batch_stats(3, x.mean(0), x.var(0))
        >>> float(n), round(float(m), 6), round(float(m2), 6)
        (3.0, 2.333333, 4.666667)
    """
    n = torch.as_tensor(count, dtype=mean.dtype, device=mean.device)
    scale = _per_channel((n - 1).clamp_min(0) if unbiased else n, mean)
    # a single value per channel has no spread (its "unbiased variance" is NaN): M2 = 0
    return n, mean, torch.where(scale > 0, var * scale, torch.zeros_like(var))


def _per_channel(count: Tensor, like: Tensor) -> Tensor:
    """``count`` broadcastable against ``like``: a trailing channel dimension is added unless it has one."""
    return count if count.dim() == like.dim() else count.unsqueeze(-1)


def chan_merge(a: Moments, b: Moments) -> Moments:
    """Merge two moment summaries exactly.

    Counts have the shape of ``mean`` without its last (channel) dimension, or the shape of ``mean`` itself
    (one count per channel, for summaries of several layers side by side).

    Zero counts are allowed (an empty side leaves the other unchanged, and two empty sides give zeros).

    Examples:
        >>> x = torch.arange(10, dtype=torch.float64).unsqueeze(1)
        >>> a = moments_from_batch_stats(4, x[:4].mean(0), x[:4].var(0))
        >>> b = moments_from_batch_stats(6, x[4:].mean(0), x[4:].var(0))
        >>> n, m, m2 = chan_merge(a, b)
        >>> float(n), float(m), float(m2 / (n - 1)), float(x.var())
        (10.0, 4.5, 9.166666666666666, 9.166666666666666)
    """
    na, ma, m2a = a
    nb, mb, m2b = b
    n = na + nb
    safe = n.clamp_min(1)
    delta = mb - ma
    weight_b = _per_channel(nb / safe, delta)
    cross = _per_channel(na * nb / safe, delta)
    return n, ma + delta * weight_b, m2a + m2b + delta * delta * cross


def merge_moments(count: Tensor, mean: Tensor, m2: Tensor) -> Moments:
    """Merge ``B`` summaries along dim 0 with a balanced tree of Chan merges (stable in float32 too).

    Args:
        count: shape ``(B,)``, or ``(B, C)`` for one count per channel.
        mean: shape ``(B, C)``.
        m2: shape ``(B, C)``.

    Returns:
        ``(count, mean, M2)`` of the union, shapes ``()`` (``(C,)`` for per-channel counts), ``(C,)``, ``(C,)``.

    Examples:
        >>> x = torch.randn(50, 3, dtype=torch.float64)
        >>> parts = [x[:7], x[7:8], x[8:30], x[30:]]
        >>> counts = torch.tensor([float(len(p)) for p in parts], dtype=torch.float64)
        >>> means = torch.stack([p.mean(0) for p in parts])
        >>> m2s = torch.stack([(p - p.mean(0)).pow(2).sum(0) for p in parts])
        >>> n, m, m2 = merge_moments(counts, means, m2s)
        >>> bool(torch.allclose(m, x.mean(0))), bool(torch.allclose(m2 / (n - 1), x.var(0)))
        (True, True)
    """
    if count.shape[0] == 0:
        channels = mean.shape[-1]
        zeros = torch.zeros(channels, dtype=mean.dtype, device=mean.device)
        return count.new_zeros(count.shape[1:]), zeros, zeros.clone()
    while count.shape[0] > 1:
        pairs = count.shape[0] // 2
        even = slice(0, 2 * pairs, 2)
        odd = slice(1, 2 * pairs, 2)
        n, m, s = chan_merge((count[even], mean[even], m2[even]), (count[odd], mean[odd], m2[odd]))
        if count.shape[0] % 2:
            n = torch.cat([n, count[-1:]])
            m = torch.cat([m, mean[-1:]])
            s = torch.cat([s, m2[-1:]])
        count, mean, m2 = n, m, s
    return count[0], mean[0], m2[0]


def merge_batch_stats(count: Tensor, mean: Tensor, var: Tensor) -> Moments:
    """Merge ``R`` batch summaries (count, mean, unbiased variance) along dim 0 into the union's ``(count, mean, M2)``.

    In float64 it takes two passes over the records: the count-weighted mean first, then
    ``M2 = sum((n - 1) * var) + sum(n * (mean_r - mean)**2)``, whose second term is centred, so nothing cancels.
    In float32 (devices without float64) it uses the balanced tree of Chan merges (`merge_moments`).

    Args:
        count: shape ``(R,)``, or ``(R, C)`` for one count per channel. Records with count 0 may hold anything
            (NaN included) and add nothing.
        mean: shape ``(R, C)``.
        var: shape ``(R, C)``, unbiased (as BatchNorm stores it; a record of one value adds no spread).

    Returns:
        ``(count, mean, M2)``, shapes ``()`` (``(C,)`` for per-channel counts), ``(C,)``, ``(C,)``.

    Examples:
        >>> x = torch.randn(30, 2, dtype=torch.float64)
        >>> parts = [x[:1], x[1:12], x[12:]]
        >>> n, m, m2 = merge_batch_stats(
        ...     torch.tensor([1.0, 11.0, 18.0], dtype=torch.float64),
        ...     torch.stack([p.mean(0) for p in parts]),
        ...     torch.stack([p.var(0) if len(p) > 1 else torch.full((2,), float("nan")) for p in parts]),
        ... )
        >>> float(n), bool(torch.allclose(m, x.mean(0))), bool(torch.allclose(m2 / (n - 1), x.var(0)))
        (30.0, True, True)
    """
    n = _per_channel(count, mean)
    mean = torch.where(n > 0, mean, torch.zeros_like(mean))
    if mean.dtype != torch.float64:
        return merge_moments(*moments_from_batch_stats(count, mean, torch.where(n > 0, var, torch.zeros_like(var))))
    within = torch.where(n > 1, var * (n - 1), torch.zeros_like(var))
    total = count.sum(0)
    centre = (n * mean).sum(0) / _per_channel(total, mean[0]).clamp_min(1)
    spread = mean - centre
    return total, centre, within.sum(0) + (n * spread * spread).sum(0)


def variance_from_moments(count: Tensor, m2: Tensor, unbiased: bool = True) -> Tensor:
    """Per-channel variance from ``(count, M2)``, clamped at >= 0 (zeros where ``count`` is too small).

    Examples:
        >>> variance_from_moments(torch.tensor(5.0), torch.tensor([8.0, -1e-9]))
        tensor([2., 0.])
    """
    denom = count - 1 if unbiased else count
    return (m2 / denom.clamp_min(1)).clamp_min(0)


def all_gather_moments(moments: list[Moments], group: dist.ProcessGroup | None = None) -> list[Moments]:
    """Merge per-rank summaries exactly across the processes of ``group``; every rank gets identical results.

    All layers travel in one flat ``all_gather``; each rank then merges the gathered summaries in rank order
    with the same arithmetic, so the results are bitwise equal on every rank. Without an initialized process
    group the input is returned unchanged.

    Args:
        moments: one ``(count, mean, M2)`` per layer, all of the same dtype and device.
        group: the process group (default: the world).

    Examples:
        >>> n, m, s = all_gather_moments([(torch.tensor(2.0), torch.zeros(3), torch.ones(3))])[0]
        >>> float(n), m.tolist()
        (2.0, [0.0, 0.0, 0.0])
    """
    world = world_size(group)
    if not moments or world == 1:
        return moments
    device = moments[0][1].device
    flat = torch.cat([torch.cat([n.reshape(1), m, s]) for n, m, s in moments]).to(comm_device(group))
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat, group=group)
    table = torch.stack(gathered).to(device)  # (world, total)
    merged: list[Moments] = []
    offset = 0
    for _, m, _ in moments:
        channels = m.shape[-1]
        count = table[:, offset]
        mean = table[:, offset + 1 : offset + 1 + channels]
        m2 = table[:, offset + 1 + channels : offset + 1 + 2 * channels]
        merged.append(merge_moments(count, mean, m2))
        offset += 1 + 2 * channels
    return merged
