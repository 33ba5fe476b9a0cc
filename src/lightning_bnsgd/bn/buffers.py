"""The target BatchNorm layers' running buffers during ``recalibrate_bn``: views into one flat tensor.

For the duration, every target layer's ``running_mean``/``running_var`` is a view into one ``(2, C_total)``
tensor, so one copy reads all layers' statistics after a forward. Before each forward the flat tensor is "armed":
means 0 and variances -1, a value no real variance takes, so after the forward a layer whose variance is still
-1 did not run (this also clears a NaN a layer may have left, which ``0 * NaN`` would carry into the next batch).

Torch's own BatchNorm forward skips ``num_batches_tracked`` when it is ``None``, and that update costs about a
quarter of a small BatchNorm layer's forward, so those layers run without it for the duration. Layers with a
forward of their own (a subclass, SyncBatchNorm) keep counting, in views of one flat tensor as well, which also
tells when such a layer ran twice in one forward.

The layers' own buffer tensors are put back on exit (they keep their identity for optimizers, DDP and user
references) and are never written before `commit`: leaving the block without a commit restores them as they
were, whatever happened inside. Pure torch, no Lightning.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

#: The variance a layer's flat buffer holds before a forward; after it, a layer still at this value did not run.
NOT_RUN = -1.0


def copy_all(targets: Sequence[Tensor], sources: Sequence[Tensor]) -> None:
    """``target.copy_(source)`` for each pair: one call where torch has ``_foreach_copy_`` and the pairs match.

    Examples:
        >>> a, b = torch.zeros(2), torch.zeros(3)
        >>> copy_all([a, b], [torch.ones(2), torch.full((3,), 2.0)])
        >>> a.tolist(), b.tolist()
        ([1.0, 1.0], [2.0, 2.0, 2.0])
    """
    if len(targets) != len(sources):
        raise ValueError(f"copy_all: {len(targets)} targets but {len(sources)} sources.")
    foreach = getattr(torch, "_foreach_copy_", None)
    if foreach is not None and all(
        t.dtype == s.dtype and t.device == s.device and t.shape == s.shape
        for t, s in zip(targets, sources, strict=True)
    ):
        foreach(list(targets), list(sources))
        return
    for target, source in zip(targets, sources, strict=True):
        target.copy_(source)


def counts_itself(layer: _BatchNorm) -> bool:
    """Whether ``layer`` keeps ``num_batches_tracked`` during recalibration: it has one and a forward of its own.

    torch's BatchNorm forward accepts a ``None`` counter; a subclass's forward may not.

    Examples:
        >>> counts_itself(torch.nn.BatchNorm2d(3)), counts_itself(torch.nn.SyncBatchNorm(3))
        (False, True)
    """
    return layer.num_batches_tracked is not None and type(layer).forward is not _BatchNorm.forward


def _reset_stats(channels: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[running_mean; running_var]`` of ``channels`` channels as ``reset_running_stats`` leaves them, ``(2, C)``."""
    stats = torch.zeros(2, channels, dtype=dtype, device=device)
    stats[1] = 1.0
    return stats


class FlatBuffers:
    """The target layers' running buffers as views into one flat tensor, for the duration of a ``with`` block.

    Args:
        layers: the target layers (every one tracks running statistics).

    Attributes:
        sizes: channels per layer.
        offsets: where each layer's channels start in the flat tensor.
        device: the first layer's device.
        stats: all layers' ``[running_mean; running_var]`` side by side, ``(2, C_total)``; ``None`` when the
            layers live on several devices or dtypes (then each layer gets a ``(2, C)`` tensor of its own and the
            statistics are read through hooks).
        counted: per layer, whether it keeps counting its forwards (`counts_itself`).
        tracked: the counting layers' ``num_batches_tracked``, one per layer (0 for the others).
    """

    def __init__(self, layers: list[_BatchNorm]) -> None:
        self.layers = layers
        self.sizes = [layer.num_features for layer in layers]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(layers))]
        kinds = [(m.running_mean.device, m.running_mean.dtype) for m in layers]  # type: ignore[union-attr]
        self.device = kinds[0][0]
        self.counted = [counts_itself(layer) for layer in layers]
        self.stats: Tensor | None = None
        self._armed: Tensor | None = None
        if len(set(kinds)) == 1:  # statistics as after ``reset_running_stats``: mean 0, variance 1
            self.stats = _reset_stats(sum(self.sizes), *kinds[0])
            self._views = [self.stats[:, o : o + c] for o, c in zip(self.offsets, self.sizes, strict=True)]
            self._armed = torch.stack((torch.zeros_like(self.stats[0]), torch.full_like(self.stats[1], NOT_RUN)))
        else:
            self._views = [_reset_stats(c, *k) for c, k in zip(self.sizes, kinds, strict=True)]
        self.tracked = torch.zeros(len(layers), dtype=torch.long, device=self.device)
        # what each layer's buffers are for the duration (one tensor object each, so identity can be checked)
        self._installed = [
            (v[0], v[1], self.tracked[i] if counted else None)
            for i, (v, counted) in enumerate(zip(self._views, self.counted, strict=True))
        ]
        self._originals: list[tuple[Tensor, Tensor, Tensor | None]] = []

    def arm(self) -> None:
        """Before a forward that is read at once: means 0, variances `NOT_RUN`, counts 0 (needs `stats`)."""
        assert self.stats is not None and self._armed is not None
        self.stats.copy_(self._armed)
        if any(self.counted):
            self.tracked.zero_()

    def view(self, index: int) -> Tensor:
        """Layer ``index``'s ``[running_mean; running_var]`` as a ``(2, C)`` view."""
        return self._views[index]

    @contextlib.contextmanager
    def installed(self) -> Iterator[FlatBuffers]:
        """Swap the views in for the block; the original buffers come back on exit."""
        # Writing ``_buffers`` directly is what ``Module.__setattr__`` does for a registered buffer, at a tenth
        # of the cost (it matters for models with hundreds of BatchNorm layers).
        self._originals = [(m.running_mean, m.running_var, m.num_batches_tracked) for m in self.layers]  # type: ignore[misc]
        try:
            for layer, (mean, var, count) in zip(self.layers, self._installed, strict=True):
                layer._buffers["running_mean"], layer._buffers["running_var"] = mean, var
                if layer.num_batches_tracked is not None:
                    layer._buffers["num_batches_tracked"] = count
            yield self
        finally:
            for layer, (mean, var, tracked) in zip(self.layers, self._originals, strict=True):
                layer._buffers["running_mean"], layer._buffers["running_var"] = mean, var
                if tracked is not None:
                    layer._buffers["num_batches_tracked"] = tracked

    def intact(self) -> bool:
        """Whether every layer still uses its view (a module that replaced its buffer would not be read)."""
        return all(
            layer._buffers.get("running_mean") is mean and layer._buffers.get("running_var") is var
            for layer, (mean, var, _) in zip(self.layers, self._installed, strict=True)
        )

    def originals_flat(self, indices: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
        """The given layers' own means and variances, each concatenated in float64 on ``device``."""
        means = [self._originals[i][0] for i in indices]
        variances = [self._originals[i][1] for i in indices]
        if self.stats is not None and self.device == device:  # one dtype and device: one call each
            return torch.cat(means).double(), torch.cat(variances).double()
        return (
            torch.cat([t.to(device, torch.float64) for t in means]),
            torch.cat([t.to(device, torch.float64) for t in variances]),
        )

    def commit(self, indices: list[int], means: Tensor, variances: Tensor) -> None:
        """Write final statistics into the given layers' original buffers.

        ``means`` and ``variances`` hold the layers' channels one after the other, in the order of ``indices``.
        """
        sizes = [self.sizes[i] for i in indices]
        targets = [self._originals[i][0] for i in indices] + [self._originals[i][1] for i in indices]
        if self.stats is not None:  # one conversion for all layers
            means, variances = (t.to(self.device, self.stats.dtype) for t in (means, variances))
        copy_all(targets, [*means.split(sizes), *variances.split(sizes)])


__all__ = ["FlatBuffers"]
