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

from lightning_bnsgd._validation import check_int

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
        count: values per channel in the batch (scalar, or one per leading index of ``mean``).
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
    scale = ((n - 1).clamp_min(0) if unbiased else n).unsqueeze(-1)
    # a single value per channel has no spread (its "unbiased variance" is NaN): M2 = 0
    return n, mean, torch.where(scale > 0, var * scale, torch.zeros_like(var))


def chan_merge(a: Moments, b: Moments) -> Moments:
    """Merge two moment summaries exactly; counts have the shape of ``mean`` without its last (channel) dim.

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
    weight_b = (nb / safe).unsqueeze(-1)
    cross = (na * nb / safe).unsqueeze(-1)
    return n, ma + delta * weight_b, m2a + m2b + delta * delta * cross


def merge_moments(count: Tensor, mean: Tensor, m2: Tensor) -> Moments:
    """Merge ``B`` summaries along dim 0 with a balanced tree of Chan merges (stable in float32 too).

    Args:
        count: shape ``(B,)``.
        mean: shape ``(B, C)``.
        m2: shape ``(B, C)``.

    Returns:
        ``(count, mean, M2)`` of the union, shapes ``()``, ``(C,)``, ``(C,)``.

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
        return count.new_zeros(()), zeros, zeros.clone()
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


def variance_from_moments(count: Tensor, m2: Tensor, unbiased: bool = True) -> Tensor:
    """Per-channel variance from ``(count, M2)``, clamped at >= 0 (zeros where ``count`` is too small).

    Examples:
        >>> variance_from_moments(torch.tensor(5.0), torch.tensor([8.0, -1e-9]))
        tensor([2., 0.])
    """
    denom = count - 1 if unbiased else count
    return (m2 / denom.clamp_min(1)).clamp_min(0)


def _comm_device(group: dist.ProcessGroup | None) -> torch.device:
    backend = str(dist.get_backend(group))
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
    if not moments or not (dist.is_available() and dist.is_initialized()):
        return moments
    world = dist.get_world_size(group)
    if world == 1:
        return moments
    device = moments[0][1].device
    flat = torch.cat([torch.cat([n.reshape(1), m, s]) for n, m, s in moments]).to(_comm_device(group))
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


class RunningMoments:
    """Per-channel ``(count, mean, M2)`` accumulated over batches, merged exactly (pairwise Chan merges).

    Args:
        num_channels: number of channels ``C``.
        device: where the moments live.
        dtype: accumulation dtype (default: float64, or float32 where float64 is unsupported).

    Examples:
        >>> x = torch.randn(100, 4, dtype=torch.float64)
        >>> acc = RunningMoments(4)
        >>> for part in (x[:10], x[10:11], x[11:]):
        ...     _ = acc.update(part.shape[0], part.mean(0), part.var(0) if len(part) > 1 else torch.zeros(4))
        >>> bool(torch.allclose(acc.mean, x.mean(0))), bool(torch.allclose(acc.variance(), x.var(0)))
        (True, True)
        >>> int(acc.count)
        100
    """

    def __init__(
        self, num_channels: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        check_int("num_channels", num_channels)
        self.dtype = dtype if dtype is not None else accumulation_dtype(device)
        self.count = torch.zeros((), dtype=self.dtype, device=device)
        self.mean = torch.zeros(num_channels, dtype=self.dtype, device=device)
        self.m2 = torch.zeros(num_channels, dtype=self.dtype, device=device)

    @property
    def moments(self) -> Moments:
        """The summary ``(count, mean, M2)``."""
        return self.count, self.mean, self.m2

    def merge_(self, other: Moments) -> RunningMoments:
        """Merge another summary into this one (in place) and return ``self``."""
        n, m, s = (t.to(device=self.mean.device, dtype=self.dtype) for t in other)
        self.count, self.mean, self.m2 = chan_merge(self.moments, (n, m, s))
        return self

    def update(self, count: Tensor | float, mean: Tensor, var: Tensor) -> RunningMoments:
        """Add one batch given its count, per-channel mean and unbiased variance."""
        mean = mean.to(device=self.mean.device, dtype=self.dtype)
        return self.merge_(moments_from_batch_stats(count, mean, var.to(mean)))

    def update_stacked(self, counts: Tensor, means: Tensor, variances: Tensor) -> RunningMoments:
        """Add ``B`` batches at once: ``counts (B,)``, ``means (B, C)``, unbiased ``variances (B, C)``.

        Batches with count 0 are ignored (their mean and variance must be finite, e.g. zeros).
        """
        means = means.to(device=self.mean.device, dtype=self.dtype)
        return self.merge_(merge_moments(*moments_from_batch_stats(counts.to(means), means, variances.to(means))))

    def variance(self, unbiased: bool = True) -> Tensor:
        """Per-channel variance of everything seen, clamped at >= 0."""
        return variance_from_moments(self.count, self.m2, unbiased)

    def all_gather_(self, group: dist.ProcessGroup | None = None) -> RunningMoments:
        """Replace the summary by the exact merge over all ranks of ``group`` (identical on every rank)."""
        self.count, self.mean, self.m2 = all_gather_moments([self.moments], group)[0]
        return self
