"""Finding BatchNorm layers and summarizing their buffers and affine parameters, for many layers at once.

Pure torch (no Lightning import). Every summary is computed on the layer's device and returned as a tensor, so
a caller can stack the numbers of all layers and move them to the host in one transfer; nothing here calls
``.item()`` or otherwise synchronizes with the device.

For many layers at once, `summarize_layers` returns the values named by `BUFFER_STATS` and `gap_summaries`
those named by `GAP_STATS`, each as one ``(layers, values)`` tensor computed with a fixed number of kernels
(`Segments` reduces the layers' concatenated channels segment by segment):

* ``running_mean_mean`` / ``running_mean_absmean``: mean over channels of ``running_mean`` and of its absolute
  value;
* ``running_var_min`` / ``running_var_mean`` / ``running_var_max``: over channels of ``running_var``;
* ``weight_mean`` / ``weight_std`` and ``bias_mean`` / ``bias_std``: the affine parameters over channels
  (population standard deviation, so one channel gives 0);
* ``dead_frac``: share of channels whose ``|weight|`` is below a threshold;
* ``gain_mean`` / ``gain_max``: the effective gain ``|weight| / sqrt(running_var + eps)`` (``|weight|`` is 1
  without affine parameters);
* ``nonfinite_count``: NaN or Inf entries in ``running_mean``, ``running_var``, ``weight`` and ``bias``
  together;
* ``gap_mean_mean`` / ``gap_mean_max``: per channel ``|batch_mean - running_mean| / sqrt(running_var + eps)``;
* ``gap_var_mean`` / ``gap_var_max``: per channel ``|log(batch_var / running_var)|``, where ``batch_var`` is
  the unbiased variance (the quantity ``running_var`` estimates).

Values a layer cannot have (no running statistics, no affine parameters) are NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

#: Names of the values returned by `summarize_layers`, in order.
BUFFER_STATS: tuple[str, ...] = (
    "running_mean_mean",
    "running_mean_absmean",
    "running_var_min",
    "running_var_mean",
    "running_var_max",
    "weight_mean",
    "weight_std",
    "bias_mean",
    "bias_std",
    "dead_frac",
    "gain_mean",
    "gain_max",
    "nonfinite_count",
)
#: Names of the values returned by `gap_summaries`, in order.
GAP_STATS: tuple[str, ...] = ("gap_mean_mean", "gap_mean_max", "gap_var_mean", "gap_var_max")
#: Names of the per-tensor NaN/Inf counts returned by `summarize_layers`, in order.
CHECKED_TENSORS: tuple[str, ...] = ("running_mean", "running_var", "weight", "bias")
#: Names of the anomaly flags returned by `anomaly_flags`, in order.
ANOMALIES: tuple[str, ...] = (
    "nonfinite_running_mean",
    "nonfinite_running_var",
    "nonfinite_weight",
    "nonfinite_bias",
    "running_var_low",
    "running_var_high",
    "dead_frac_high",
)


def batchnorm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """All BatchNorm layers of ``model`` (every ``_BatchNorm`` subclass), in registration order, with names.

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.BatchNorm2d(4))
        >>> [name for name, _ in batchnorm_layers(net)]
        ['1', '3']
    """
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def _wide(t: Tensor) -> Tensor:
    """``t`` detached, in float32 or wider (float64 stays float64)."""
    t = t.detach()
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _has_running_stats(layer: _BatchNorm) -> bool:
    return isinstance(layer.running_mean, Tensor) and isinstance(layer.running_var, Tensor)


def _device_of(layer: _BatchNorm) -> torch.device:
    for t in (layer.running_mean, layer.weight):
        if isinstance(t, Tensor):
            return t.device
    return torch.device("cpu")


class Segments:
    """Consecutive segments of a flat tensor (one per layer, ``sizes[i]`` channels each) and their reductions.

    The reductions run as a few whole-tensor kernels, however many segments there are; a segment holding a NaN
    reduces to NaN.

    Examples:
        >>> seg = Segments([2, 3], torch.device("cpu"))
        >>> v = torch.tensor([1.0, 5.0, 2.0, 0.0, 4.0])
        >>> seg.mean(v).tolist(), seg.max(v).tolist(), seg.min(v).tolist()
        ([3.0, 2.0], [5.0, 4.0], [1.0, 0.0])
    """

    def __init__(self, sizes: Sequence[int], device: torch.device) -> None:
        if any(n < 1 for n in sizes):
            raise ValueError(f"`sizes` must all be >= 1, got {list(sizes)}.")
        self.sizes = [int(n) for n in sizes]
        counts = torch.tensor(self.sizes, device=device)
        self.ids = torch.repeat_interleave(torch.arange(len(self.sizes), device=device), counts)
        self.counts = counts

    def sum(self, values: Tensor) -> Tensor:
        """Per-segment sums along the last dimension: ``(C,) -> (L,)`` or ``(R, C) -> (R, L)``."""
        out = torch.zeros((*values.shape[:-1], len(self.sizes)), dtype=values.dtype, device=values.device)
        return out.index_add_(values.dim() - 1, self.ids, values)

    def mean(self, values: Tensor) -> Tensor:
        """Per-segment means along the last dimension."""
        return self.sum(values) / self.counts.to(values.dtype)

    def max(self, values: Tensor) -> Tensor:
        """Per-segment maxima along the last dimension (NaN where a segment holds a NaN)."""
        out = torch.full((*values.shape[:-1], len(self.sizes)), -math.inf, dtype=values.dtype, device=values.device)
        out = out.scatter_reduce_(values.dim() - 1, self.ids.expand_as(values), values, "amax", include_self=True)
        has_nan = self.sum(torch.isnan(values).to(values.dtype)) > 0
        return out.masked_fill_(has_nan, math.nan)

    def min(self, values: Tensor) -> Tensor:
        """Per-segment minima along the last dimension (NaN where a segment holds a NaN)."""
        return -self.max(-values)


def _flat(
    layers: Sequence[_BatchNorm], name: str, fill: float, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, list[bool]]:
    """``layer.<name>`` of all layers, concatenated (``fill`` where a layer has none), and which layers have it."""
    parts, present = [], []
    for layer in layers:
        t = getattr(layer, name, None)
        ok = isinstance(t, Tensor) and t.numel() == layer.num_features
        present.append(ok)
        if ok:
            assert isinstance(t, Tensor)
            parts.append(t.detach().to(device=device, dtype=dtype).flatten())
        else:
            parts.append(torch.full((layer.num_features,), fill, dtype=dtype, device=device))
    return torch.cat(parts), present


def _compute_dtype(tensors: Iterable[object]) -> torch.dtype:
    return torch.float64 if any(isinstance(t, Tensor) and t.dtype == torch.float64 for t in tensors) else torch.float32


def batch_moments(x: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean and unbiased variance of a BatchNorm input, in float32 or wider.

    Channels are dimension 1 (as BatchNorm expects); every other dimension is reduced. On CPU the variance is
    computed in two passes (faster there than ``torch.var_mean`` over several dimensions, and as accurate).

    Returns:
        ``(mean, var, samples)``: tensors of shape ``(C,)`` and the number of values per channel (a Python
        int, known from the shape without a device sync).

    Examples:
        >>> mean, var, n = batch_moments(torch.tensor([[1.0, 10.0], [3.0, 30.0]]))
        >>> mean.tolist(), var.tolist(), n
        ([2.0, 20.0], [2.0, 200.0], 2)
    """
    if x.dim() < 2:
        raise ValueError(f"`x` must have a channel dimension (at least 2 dims), got shape {tuple(x.shape)}.")
    samples = x.numel() // x.shape[1] if x.shape[1] else 0
    dims = [0, *range(2, x.dim())]
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        wide = _wide(x)
        if wide.device.type == "cpu":
            mean = wide.mean(dims, keepdim=True)
            var = (wide - mean).square_().sum(dims) / max(samples - 1, 0)
            mean = mean.flatten()
        else:
            var, mean = torch.var_mean(wide, dim=dims, correction=1)
    return mean, var, samples


def normalized_shift(mean: Tensor, var: Tensor, ref_mean: Tensor, ref_var: Tensor, eps: Tensor | float) -> Tensor:
    """How far per-channel statistics are from reference ones, per channel, as ``(2, C)`` rows.

    The rows are ``|mean - ref_mean| / sqrt(ref_var + eps)`` (the shift in units of the reference standard deviation)
    and ``|log((var + eps) / (ref_var + eps))|`` (the log-ratio of the variances BatchNorm would divide by).

    The one definition behind the monitor's batch-versus-running gaps and ``recalibrate_bn``'s shifts.

    Examples:
        >>> normalized_shift(torch.ones(1), torch.ones(1), torch.zeros(1), torch.ones(1), 0.0).tolist()
        [[1.0], [0.0]]
    """
    return torch.stack(
        [(mean - ref_mean).abs() / torch.sqrt(ref_var + eps), torch.log((var + eps) / (ref_var + eps)).abs()]
    )


def gap_summaries(
    batch_mean: Tensor,
    batch_var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: Tensor,
    segments: Segments,
) -> Tensor:
    """The batch-versus-running gap of several layers at once: ``(L, len(GAP_STATS))``.

    All inputs are the layers' per-channel values concatenated (``eps`` repeated per channel). Per channel, the
    mean gap is ``|batch_mean - running_mean| / sqrt(running_var + eps)`` (the shift in units of the running
    standard deviation) and the variance gap is ``|log((batch_var + eps) / (running_var + eps))|`` (the ratio of
    the variances BatchNorm divides by in train and in eval mode; ``eps`` keeps a dead channel, whose variances
    are both 0, at gap 0 instead of NaN); each is summarized as mean and max over the layer's channels. Both are 0
    when the running statistics equal the batch statistics.

    Examples:
        >>> seg = Segments([1, 1], torch.device("cpu"))
        >>> ones = torch.ones(2)
        >>> gaps = gap_summaries(ones, ones, torch.tensor([1.0, 0.0]), torch.tensor([1.0, 10.0]), 0 * ones, seg)
        >>> [[round(v, 4) for v in row] for row in gaps.tolist()]
        [[0.0, 0.0, 0.0, 0.0], [0.3162, 0.3162, 2.3026, 2.3026]]
    """
    dtype = _compute_dtype([batch_mean, batch_var, running_mean, running_var])
    bm, bv, rm, rv, e = (t.detach().to(dtype) for t in (batch_mean, batch_var, running_mean, running_var, eps))
    gaps = normalized_shift(bm, bv, rm, rv, e)
    means, maxes = segments.mean(gaps), segments.max(gaps)
    return torch.stack([means[0], maxes[0], means[1], maxes[1]], dim=1).float()


def summarize_layers(
    layers: Sequence[_BatchNorm],
    dead_threshold: float = 1e-2,
    device: torch.device | None = None,
    segments: Segments | None = None,
) -> tuple[Tensor, Tensor]:
    """Summaries of the running statistics and affine parameters of several layers, vectorized over layers.

    Args:
        layers: BatchNorm layers.
        dead_threshold: a channel is dead when ``|weight|`` is below this.
        device: where to compute (default: the first layer's device).
        segments: ``Segments`` of the layers' channel counts on ``device``, to reuse across calls (default:
            built here).

    Returns:
        ``(summary, nonfinite)``: float32 tensors of shapes ``(L, len(BUFFER_STATS))`` and
        ``(L, len(CHECKED_TENSORS))`` (NaN/Inf counts per tensor). Summary values a layer cannot have are NaN:
        the ``running_*`` and ``gain_*`` values without running statistics, the ``weight_*``, ``bias_*`` and
        ``dead_frac`` values without affine parameters (then the gain uses ``|weight| = 1``).

    Examples:
        >>> bn = nn.BatchNorm1d(4, eps=0.0)
        >>> bn.running_var.fill_(4.0)
        tensor([4., 4., 4., 4.])
        >>> summary, nonfinite = summarize_layers([bn, nn.BatchNorm1d(2, affine=False)])
        >>> s = dict(zip(BUFFER_STATS, summary[0].tolist(), strict=True))
        >>> s["running_var_mean"], s["weight_std"], s["dead_frac"], s["gain_max"]
        (4.0, 0.0, 0.0, 0.5)
        >>> summary[1, BUFFER_STATS.index("weight_mean")].isnan().item(), nonfinite.shape
        (True, torch.Size([2, 4]))
    """
    if not layers:
        return torch.zeros(0, len(BUFFER_STATS)), torch.zeros(0, len(CHECKED_TENSORS))
    device = device if device is not None else _device_of(layers[0])
    dtype = _compute_dtype(t for m in layers for t in (m.running_mean, m.running_var, m.weight, m.bias))
    if segments is None:
        segments = Segments([m.num_features for m in layers], device)
    rm, has_rm = _flat(layers, "running_mean", 0.0, dtype, device)
    rv, has_rv = _flat(layers, "running_var", 1.0, dtype, device)
    w, has_w = _flat(layers, "weight", 1.0, dtype, device)
    b, has_b = _flat(layers, "bias", 0.0, dtype, device)
    eps = torch.tensor([float(m.eps) for m in layers], dtype=dtype, device=device)[segments.ids]
    # A few whole-tensor kernels for all layers: rows of per-channel values, reduced per segment at once.
    nonfinite = segments.sum((~torch.isfinite(torch.stack([rm, rv, w, b]))).to(dtype)).T
    gain = w.abs() / torch.sqrt(rv + eps)
    dead = (w.abs() < dead_threshold).to(dtype)
    means = segments.mean(torch.stack([rm, rm.abs(), rv, w, b, dead, gain]))
    spread = torch.stack([w, b]) - means[3:5][:, segments.ids]
    stds = torch.sqrt(segments.mean(spread.square()))
    extremes = segments.max(torch.stack([rv, gain, -rv]))
    columns = {
        "running_mean_mean": means[0],
        "running_mean_absmean": means[1],
        "running_var_min": -extremes[2],
        "running_var_mean": means[2],
        "running_var_max": extremes[0],
        "weight_mean": means[3],
        "weight_std": stds[0],
        "bias_mean": means[4],
        "bias_std": stds[1],
        "dead_frac": means[5],
        "gain_mean": means[6],
        "gain_max": extremes[1],
        "nonfinite_count": nonfinite.sum(dim=1),
    }
    summary = torch.stack([columns[name] for name in BUFFER_STATS], dim=1)
    running = [a and c for a, c in zip(has_rm, has_rv, strict=True)]
    affine = [a and c for a, c in zip(has_w, has_b, strict=True)]
    return _mask_missing(summary, running, affine).float(), nonfinite.float()


def _mask_missing(summary: Tensor, running: list[bool], affine: list[bool]) -> Tensor:
    """``summary`` with NaN in the values a layer cannot have (no running statistics, no affine parameters)."""
    if all(running) and all(affine):  # known on the host: no device work in the usual case
        return summary
    missing = [
        [
            (name.startswith(("running_", "gain_")) and not has_running)
            or (name.startswith(("weight_", "bias_", "dead_")) and not has_affine)
            for name in BUFFER_STATS
        ]
        for has_running, has_affine in zip(running, affine, strict=True)
    ]
    mask = torch.tensor(missing, device=summary.device)
    return torch.where(mask, torch.full_like(summary, math.nan), summary)


def anomaly_flags(
    summary: Tensor,
    nonfinite: Tensor,
    min_running_var: float | None = None,
    max_running_var: float | None = None,
    max_dead_frac: float | None = None,
) -> Tensor:
    """Anomaly flags (1.0 or 0.0) of several layers, one column per name in `ANOMALIES`.

    Args:
        summary: ``(L, len(BUFFER_STATS))``, as returned by `summarize_layers`.
        nonfinite: ``(L, len(CHECKED_TENSORS))``, as returned by `summarize_layers`.
        min_running_var: flag layers whose smallest ``running_var`` is below this (None: never).
        max_running_var: flag layers whose largest ``running_var`` is above this (None: never).
        max_dead_frac: flag layers whose ``dead_frac`` is above this (None: never).

    Examples:
        >>> bn = nn.BatchNorm1d(2)
        >>> bn.running_var[0] = 1e-9
        >>> flags = anomaly_flags(*summarize_layers([bn]), min_running_var=1e-6)
        >>> dict(zip(ANOMALIES, flags[0].tolist()))["running_var_low"]
        1.0
    """
    col = {name: i for i, name in enumerate(BUFFER_STATS)}
    zeros = torch.zeros(summary.shape[0], dtype=torch.bool, device=summary.device)
    low = summary[:, col["running_var_min"]] < min_running_var if min_running_var is not None else zeros
    high = summary[:, col["running_var_max"]] > max_running_var if max_running_var is not None else zeros
    dead = summary[:, col["dead_frac"]] > max_dead_frac if max_dead_frac is not None else zeros
    flags = torch.cat([nonfinite.to(summary.device) > 0, low[:, None], high[:, None], dead[:, None]], dim=1)
    return flags.float()


def updates_running_stats(layer: _BatchNorm) -> bool:
    """Whether a forward of ``layer`` now would update its running statistics (train mode, tracking, buffers).

    Examples:
        >>> bn = nn.BatchNorm1d(2)
        >>> updates_running_stats(bn), updates_running_stats(bn.eval())
        (True, False)
        >>> bn.train().track_running_stats = False  # what Lightning's ``BaseFinetuning.freeze_module`` does
        >>> updates_running_stats(bn)
        False
    """
    return layer.training and layer.track_running_stats and _has_running_stats(layer)


def configuration_issues(layers: Sequence[tuple[str, _BatchNorm]]) -> dict[str, list[str]]:
    """Layer names with a BatchNorm configuration that is likely a mistake, by issue.

    Keys:

    * ``"no_running_stats"``: the layer has no running statistics (built with ``track_running_stats=False``), so
      evaluation normalizes with batch statistics too. A layer whose ``track_running_stats`` was switched off
      later keeps its buffers and uses them in evaluation (Lightning's ``BaseFinetuning.freeze_module`` does
      this): not an issue.
    * ``"momentum_none"``: a layer that updates its running statistics (`updates_running_stats`) with
      ``momentum=None``, a cumulative average that weights every batch since the start equally, so statistics
      collected under early weights never fade.
    * ``"momentum_zero"``: a layer that runs in train mode with ``momentum=0``: its running statistics never change.

    Layers that do not update their running statistics (eval mode, tracking off) are frozen on purpose: their
    momentum does not matter.

    Examples:
        >>> net = nn.Sequential(
        ...     nn.BatchNorm1d(2, momentum=None),
        ...     nn.BatchNorm1d(2, momentum=0.0),
        ...     nn.BatchNorm1d(2, track_running_stats=False),
        ...     nn.BatchNorm1d(2, momentum=None).eval(),
        ... )
        >>> configuration_issues(batchnorm_layers(net))
        {'no_running_stats': ['2'], 'momentum_none': ['0'], 'momentum_zero': ['1']}
    """
    issues: dict[str, list[str]] = {"no_running_stats": [], "momentum_none": [], "momentum_zero": []}
    for name, layer in layers:
        if not _has_running_stats(layer):
            issues["no_running_stats"].append(name)
        elif not updates_running_stats(layer):
            continue
        elif layer.momentum is None:
            issues["momentum_none"].append(name)
        elif layer.momentum == 0:
            issues["momentum_zero"].append(name)
    return issues
