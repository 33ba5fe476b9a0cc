"""Collects the target BatchNorm layers' per-batch statistics during ``recalibrate_bn`` and merges them exactly.

Every target layer runs with ``momentum = 1.0``, so after a forward its ``running_mean``/``running_var`` hold that
batch's mean and unbiased variance, computed by BatchNorm's own kernel. For the duration, the layers' running
buffers are views into one flat tensor (`FlatBuffers`), so one copy per forward reads every layer at once ("fast"
forwards). What a copy cannot know is each layer's element count, which depends only on the input's shape: the
first forward of each new batch shape runs with forward hooks that measure it, and records which layers it
reached and the last one, where later forwards of that shape stop. Hooks also serve the cases a copy cannot: a
layer called several times in one forward and SyncBatchNorm (whose counts are global). Mode ``"sequential"``
records through hooks only (`SequentialCollector`, a subclass).
After each fast forward, the variances left at `NOT_RUN` tell which layers did not run (a layer skipped by the
forward contributes nothing), so a forward that runs a layer its shape's first forward did not reach is an
error, never a wrong count. Records are merged in float64 every `FLUSH_EVERY` forwards. Pure torch, no Lightning.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_bnsgd.bn.buffers import NOT_RUN, FlatBuffers
from lightning_bnsgd.bn.distributed import all_reduce_sum, syncs_across_processes
from lightning_bnsgd.bn.moments import Moments, accumulation_dtype, merge_batch_stats, merge_moments

#: Forwards whose records stay on the device before they are merged.
FLUSH_EVERY = 64


class StopForward(BaseException):
    """Ends a forward early from a forward hook (a BaseException: ``except Exception`` won't catch it)."""


@dataclass(frozen=True)
class ShapePlan:
    """What the first forward of a batch shape taught: element counts per layer and where to stop.

    Attributes:
        counts: per target layer, values per channel in one forward (0 where the forward did not reach it).
        reached: per target layer, whether the forward called it (with no value, a layer may be reached).
        stop: index of the last target layer the forward reaches (the forward ends after it), or ``None``.
        fast: whether later forwards of this shape can be read with one copy (no layer ran twice).
    """

    counts: Tensor
    reached: Tensor
    stop: int | None
    fast: bool


def batch_signature(batch: Any) -> tuple[Any, ...]:
    """The shapes (and dtypes) of every tensor in ``batch``: forwards of equal signature see equal layer shapes.

    Examples:
        >>> batch_signature((torch.zeros(2, 3), {"m": torch.ones(2)}))
        ((torch.Size([2, 3]), torch.float32), (torch.Size([2]), torch.float32))
    """
    found: list[tuple[torch.Size, torch.dtype]] = []
    apply_to_collection(batch, Tensor, lambda t: found.append((t.shape, t.dtype)))
    return tuple(found)


def _run_hooked(run: Callable[[], Any], handles: list[Any]) -> None:
    """``run()`` (a forward that a hook may end early with `StopForward`), then remove the hooks ``handles``."""
    try:
        with contextlib.suppress(StopForward):
            run()
    finally:
        for handle in handles:
            handle.remove()


class StatsCollector:
    """Per-forward records of the target layers' batch statistics and their exact merge (see the module doc).

    Args:
        layers: the target layers.
        buffers: their flat buffers (installed by the caller).
        reset_after_read: reset a layer's statistics after each read through a hook, so that a batch with
            NaN/Inf cannot poison the next one through ``0 * NaN`` (needed when such batches are skipped; fast
            forwards start from armed buffers anyway).
    """

    #: How mode "train" reads the forwards after a batch shape's first one: ``"flat"`` (one copy of the flat
    #: buffers, ending each forward after the last layer: the fast reader) or ``"hooks"`` (a forward hook per layer,
    #: as every shape's first forward is read: the reference the fast reader is tested against). Measured on
    #: ``benchmarks/recalibration.py``: hooks alone cost 1.5x the plain forwards on 100 small BatchNorm layers,
    #: the flat reader 0.96x.
    READER = "flat"

    def __init__(self, layers: list[_BatchNorm], buffers: FlatBuffers, reset_after_read: bool) -> None:
        self.layers = layers
        self.buffers = buffers
        self.reset_after_read = reset_after_read
        self.synced = [syncs_across_processes(layer) for layer in layers]
        #: Some layer synchronizes across processes in its forward (SyncBatchNorm): all processes forward together.
        self.lockstep = any(self.synced)
        self.dtype = accumulation_dtype(buffers.device)
        self.forward_index = 0
        self._window_start = 0
        self._plans: dict[tuple[Any, ...], ShapePlan] = {}
        self._calls: list[tuple[int, int, Tensor, Tensor]] = []  # (forward, layer, count, stats (2, C))
        # fast forwards (one copy reads every layer) need one flat tensor and no SyncBatchNorm (global counts)
        self._readable = buffers.stats is not None and not self.lockstep and self.READER == "flat"
        self._slots = buffers.stats.new_empty((FLUSH_EVERY, *buffers.stats.shape)) if self._readable else None  # type: ignore[union-attr]
        self._slot_tracked = buffers.tracked.new_empty((FLUSH_EVERY, len(layers)))
        self._slot_info: list[tuple[int, ShapePlan]] = []  # (forward, its shape's plan)
        self._counts_any = any(buffers.counted)
        self._sizes = torch.tensor(buffers.sizes, device=buffers.device)
        self._first_channels = torch.tensor(buffers.offsets, device=buffers.device)
        self._counted = torch.tensor(buffers.counted, device=buffers.device)
        self._flat_parts: list[Moments] = []  # per flush of fast forwards: per-channel summaries of all layers
        self._parts: list[list[Moments]] = [[] for _ in layers]  # per layer: summaries of its hooked calls
        self._bad: list[Tensor] = []
        self._stop_hooks: dict[int, Any] = {}
        # the layer whose forward hook ends the forward (hooked forwards), or whose stop hook does (fast forwards)
        self._stop_after: int | None = None

    # ------------------------------------------------------------------------------------------- forwards

    def forward(self, run: Callable[[], Any], batch: Any, learn: bool) -> None:
        """One forward of ``batch`` (``run()`` does it); ``learn``: fast forwards after a shape's first one."""
        signature = batch_signature(batch) if learn else ()
        plan = self._plans.get(signature) if learn else None
        if plan is not None and plan.fast and self._readable:
            self._fast_forward(run, plan)
        else:
            if learn and self.buffers.stats is not None:
                self.buffers.arm()
            pending = len(self._calls)
            calls = self._hooked_forward(run)
            if learn:
                plan = self._plans[signature] = self._plan_from(calls)
                if plan.fast and self._readable and not self.reset_after_read:
                    del self._calls[pending:]  # read this forward like the fast ones: one copy
                    self._save_slot(plan)
        self._next_forward()

    def _next_forward(self) -> None:
        self.forward_index += 1
        if self.forward_index - self._window_start >= FLUSH_EVERY:
            self.flush()

    def _record(self, index: int, inputs: Tensor) -> None:
        """Record the batch statistics the layer's train-mode forward left in its buffers (momentum 1.0)."""
        layer = self.layers[index]
        count = inputs.numel() // layer.num_features
        total = torch.tensor(float(count), dtype=self.dtype, device=self.buffers.view(index).device)
        if self.synced[index]:  # the kernel already merged all processes: count their elements too
            total = all_reduce_sum(total, getattr(layer, "process_group", None))
        stats = torch.stack((layer.running_mean, layer.running_var))  # type: ignore[arg-type]
        self._calls.append((self.forward_index, index, total, stats))
        if self.reset_after_read or count == 0:  # an empty batch leaves NaN behind
            self._reset(index)

    def _fast_forward(self, run: Callable[[], Any], plan: ShapePlan) -> None:
        self.buffers.arm()
        self._stop_after = plan.stop
        if plan.stop is not None and plan.stop not in self._stop_hooks:
            self._stop_hooks[plan.stop] = self.layers[plan.stop].register_forward_hook(self._stop_hook(plan.stop))
        try:
            with contextlib.suppress(StopForward):
                run()
        finally:
            self._stop_after = None
        self._save_slot(plan)

    def _save_slot(self, plan: ShapePlan) -> None:
        assert self._slots is not None and self.buffers.stats is not None
        slot = len(self._slot_info)
        self._slots[slot].copy_(self.buffers.stats)
        if self._counts_any:
            self._slot_tracked[slot].copy_(self.buffers.tracked)
        self._slot_info.append((self.forward_index, plan))

    def _stop_hook(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._stop_after == index:
                raise StopForward

        return hook

    def _hooked_forward(self, run: Callable[[], Any]) -> list[tuple[int, int]]:
        calls: list[tuple[int, int]] = []
        handles = []
        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_hook(self._record_hook(i, calls)))
        _run_hooked(run, handles)
        return calls

    def _record_hook(self, index: int, calls: list[tuple[int, int]]) -> Callable[..., None]:
        layer = self.layers[index]

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not module.training:
                return
            calls.append((index, args[0].numel() // layer.num_features))
            self._record(index, args[0])

        return hook

    def _reset(self, index: int) -> None:
        # the layer's current buffers (a module may have replaced the view: read and reset what it uses)
        layer = self.layers[index]
        layer.running_mean.zero_()  # type: ignore[union-attr]
        layer.running_var.fill_(1.0)  # type: ignore[union-attr]

    def _plan_from(self, calls: list[tuple[int, int]]) -> ShapePlan:
        values = [0] * len(self.layers)
        seen = [index for index, _ in calls]
        for index, count in calls:
            values[index] = count
        counts = torch.tensor(values, dtype=self.dtype, device=self.buffers.device)
        reached = torch.zeros(len(self.layers), dtype=torch.bool, device=self.buffers.device)
        reached[sorted(set(seen))] = True
        fast = len(seen) == len(set(seen)) and self.buffers.intact()
        return ShapePlan(counts=counts, reached=reached, stop=seen[-1] if seen else None, fast=fast)

    def close(self) -> None:
        """Remove the stop hooks."""
        for handle in self._stop_hooks.values():
            handle.remove()
        self._stop_hooks.clear()

    # ---------------------------------------------------------------------------------------------- merging

    def flush(self) -> None:
        """Merge the records of the forwards since the last flush; forwards with NaN/Inf statistics are left out."""
        start, end = self._window_start, self.forward_index
        self._window_start = end
        if end == start:
            return
        bad = torch.zeros(end - start, dtype=torch.long, device=self.buffers.device)
        fast = self._fast_records(start, bad)
        calls = self._call_records(start, bad)
        self._bad.append(bad > 0)
        if fast is not None:
            forwards, counts, stats = fast
            counts = counts * (bad[forwards] == 0).unsqueeze(-1)
            self._flat_parts.append(merge_batch_stats(counts, stats[:, 0], stats[:, 1]))
        for i, (forwards, counts, stats) in calls.items():
            counts = counts * (bad[forwards] == 0).to(counts.device)
            self._parts[i].append(merge_batch_stats(counts, stats[:, 0], stats[:, 1]))

    def _fast_records(self, start: int, bad: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """Forwards, per-channel counts ``(R, C)`` and statistics ``(R, 2, C)`` of the fast forwards.

        Records with count 0 may hold anything. Counts bad ones in ``bad``.
        """
        n = len(self._slot_info)
        if n == 0:
            return None
        if not self.buffers.intact():
            raise RuntimeError(
                "recalibrate_bn: a BatchNorm layer replaced its running_mean/running_var buffer during the forward "
                "(instead of updating it in place); its statistics cannot be read. The model's statistics were "
                "left unchanged."
            )
        assert self._slots is not None
        raw = self._slots[:n]
        ran = (raw[:, 1, self._first_channels] != NOT_RUN).long()  # a NaN variance ran too
        runs = torch.where(self._counted, self._slot_tracked[:n], ran) if self._counts_any else ran
        counts = torch.stack([plan.counts for _, plan in self._slot_info])
        reached = torch.stack([plan.reached for _, plan in self._slot_info])
        forwards = torch.tensor([f - start for f, _ in self._slot_info], dtype=torch.long, device=bad.device)
        self._slot_info.clear()
        if bool(((runs > 1) | ((runs > 0) & ~reached)).any()):
            raise RuntimeError(
                "recalibrate_bn: a BatchNorm layer ran in a forward where the first forward of the same batch "
                "shape did not run it (or ran more than once where it ran once there); its element count is "
                "unknown. The model's statistics were left unchanged."
            )
        counts = (counts * (runs == 1)).repeat_interleave(self._sizes, dim=1)
        stats = raw.to(self.dtype)
        nonfinite = (~torch.isfinite(stats) & (counts > 0).unsqueeze(1)).flatten(1).any(dim=1)
        bad.index_add_(0, forwards, nonfinite.long())
        return forwards, counts, stats

    def _call_records(self, start: int, bad: Tensor) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
        """Per layer: forwards (relative), counts and statistics of the hooked calls; marks bad forwards."""
        by_layer: dict[int, list[tuple[int, Tensor, Tensor]]] = {}
        for forward, index, count, stats in self._calls:
            by_layer.setdefault(index, []).append((forward - start, count, stats))
        self._calls.clear()
        out = {}
        for index, records in by_layer.items():
            forwards = torch.tensor([r[0] for r in records], dtype=torch.long, device=bad.device)
            counts = torch.stack([r[1] for r in records]).to(self.dtype)
            stats = torch.stack([r[2] for r in records]).to(self.dtype)
            nonfinite = (~torch.isfinite(stats)).flatten(1).any(dim=1) & (counts > 0)
            bad.index_add_(0, forwards, nonfinite.long().to(bad.device))
            out[index] = (forwards, counts, stats)
        return out

    def results(self, indices: list[int]) -> list[Moments]:
        """This process's merged summaries of the given layers (zeros for a layer that saw nothing)."""
        flat = None
        if self._flat_parts:
            flat = merge_moments(*(torch.stack(list(p)) for p in zip(*self._flat_parts, strict=True)))
        out = []
        for index in indices:
            parts = list(self._parts[index])
            if flat is not None:
                start, size = self.buffers.offsets[index], self.buffers.sizes[index]
                parts.append((flat[0][start], flat[1][start : start + size], flat[2][start : start + size]))
            if not parts:
                zeros = torch.zeros(self.buffers.sizes[index], dtype=self.dtype, device=self.buffers.view(index).device)
                parts.append((zeros.new_zeros(()), zeros, zeros.clone()))
            out.append(
                parts[0] if len(parts) == 1 else merge_moments(*(torch.stack(p) for p in zip(*parts, strict=True)))
            )
        return out

    def bad_forwards(self) -> Tensor:
        """Indices (on this process) of the forwards with non-finite statistics, since the last `clear_bad`."""
        if not self._bad:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([b.cpu() for b in self._bad]).nonzero().flatten()

    def clear_bad(self) -> None:
        """Forget the bad forwards found so far (mode "sequential" checks them pass by pass)."""
        self._bad.clear()


__all__ = ["StatsCollector"]
