"""``recalibrate_bn``: exact BatchNorm population statistics from data, in any PyTorch loop.

How it works (mode ``"train"``): every target BatchNorm layer gets ``momentum = 1.0`` for the duration, so
after each forward its ``running_mean``/``running_var`` hold exactly that batch's mean and unbiased variance,
computed by BatchNorm's own kernel. A forward hook copies them (one small stack per layer and batch, no extra
pass over the activations) together with the batch's per-channel element count, and the copies are merged in
float64 with Chan's formula, which adds the between-batch variance back. The result equals what the
layer would store after one forward of all its inputs concatenated, whatever the batch sizes, their order or
the split of the data over processes. Mode ``"sequential"`` estimates the layers one at a time in forward
order, each while all earlier layers already use their new statistics in eval mode, and stops each forward
right after the layer being estimated.

Pure torch (no Lightning import).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import UninitializedBuffer

from lightning_bnsgd._validation import check_choice, check_int
from lightning_bnsgd.bn.inspect import batchnorm_layers
from lightning_bnsgd.bn.moments import (
    Moments,
    accumulation_dtype,
    all_gather_moments,
    merge_moments,
    variance_from_moments,
)

Mode = Literal["train", "sequential"]
DropoutMode = Literal["eval", "train"]
NonFinite = Literal["raise", "skip"]
ForwardFn = Callable[[nn.Module, Any], Any]
MODES = ("train", "sequential")
DROPOUT_MODES = ("eval", "train")
NONFINITE_ACTIONS = ("raise", "skip")
#: Forwards whose statistics are kept on the device before they are merged into the running moments.
_FLUSH_EVERY = 64
_EPS = 1e-5


class _StopForward(BaseException):
    """Ends a forward early from a forward hook (a BaseException: ``except Exception`` won't catch it)."""


@dataclass
class LayerShift:
    """How far one layer's statistics moved.

    Attributes:
        mean: mean over channels of ``|new_mean - old_mean| / sqrt(new_var + eps)``.
        var: mean over channels of ``|log(new_var + eps) - log(old_var + eps)|``.
    """

    mean: float
    var: float


@dataclass
class RecalibrationReport:
    """What ``recalibrate_bn`` did.

    Attributes:
        mode: ``"train"`` or ``"sequential"``.
        layers: names of the recalibrated layers, in the order they were estimated (forward order when
            sequential, registration order otherwise).
        skipped: BatchNorm layers left unchanged, name -> reason.
        num_samples: samples used per pass (summed over processes when distributed; ``None`` when the batches
            have no tensor to count).
        num_batches: forwards per pass on this process.
        passes: passes over the data (1 in mode ``"train"``, one per layer in mode ``"sequential"``).
        stopped_by: ``"data"`` (the batches ran out), ``"num_samples"`` or ``"num_batches"`` (the budget was
            reached); ``"data"`` with a budget set means the data was shorter than the budget.
        nonfinite_batches: batches with NaN/Inf statistics left out (``nonfinite="skip"``), summed over
            processes.
        world_size: number of processes whose data was merged.
        shift: per recalibrated layer, how far its statistics moved.

    Examples:
        >>> report = RecalibrationReport(mode="train")
        >>> report.max_shift()
        (0.0, 0.0)
    """

    mode: str
    layers: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    num_samples: int | None = 0
    num_batches: int = 0
    passes: int = 0
    stopped_by: str = "data"
    nonfinite_batches: int = 0
    world_size: int = 1
    shift: dict[str, LayerShift] = field(default_factory=dict)

    def max_shift(self) -> tuple[float, float]:
        """The largest ``(mean, var)`` shift over the recalibrated layers (zeros when there are none)."""
        if not self.shift:
            return 0.0, 0.0
        return max(s.mean for s in self.shift.values()), max(s.var for s in self.shift.values())


# ---------------------------------------------------------------------------------------------------- batches


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run ``model(batch)`` for a tensor, ``model(batch[0])`` for a tuple or list; anything else is an error.

    Examples:
        >>> default_forward(nn.Identity(), (torch.ones(2), torch.zeros(2)))
        tensor([1., 1.])
    """
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    raise TypeError(
        f"recalibrate_bn cannot feed a batch of type {type(batch).__name__} to the model: batches must be "
        "a tensor (passed as model(x)) or a non-empty tuple/list (passed as model(batch[0])); for anything "
        "else pass `forward_fn=lambda model, batch: ...`."
    )


def batch_size_of(batch: Any) -> int | None:
    """Leading dimension of the batch's first tensor (depth-first through mappings, sequences), or ``None``.

    Examples:
        >>> batch_size_of({"x": torch.zeros(5, 3), "y": torch.zeros(5)}), batch_size_of("text")
        (5, None)
    """
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        items: Iterable[Any] = batch.values()
    elif isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        items = batch
    else:
        return None
    for item in items:
        size = batch_size_of(item)
        if size is not None:
            return size
    return None


def take_samples(batch: Any, k: int, size: int) -> Any:
    """The first ``k`` samples of a batch: every tensor whose leading dimension is ``size`` is cut to ``k``.

    Examples:
        >>> x, y = take_samples((torch.arange(6).view(3, 2), torch.arange(3)), 2, 3)
        >>> x.tolist(), y.tolist()
        ([[0, 1], [2, 3]], [0, 1])
    """
    return apply_to_collection(batch, Tensor, lambda t: t[:k] if t.dim() > 0 and t.shape[0] == size else t)


def _move(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    return apply_to_collection(batch, Tensor, lambda t: t.to(device, non_blocking=True))


# ---------------------------------------------------------------------------------------------- distributed


def _distributed_world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _comm_device() -> torch.device:
    backend = str(dist.get_backend())
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_ints(values: list[int]) -> list[list[int]]:
    """All ranks' ``values`` (one list per rank), through one small all_reduce."""
    world, rank = dist.get_world_size(), dist.get_rank()
    table = torch.zeros(world, len(values), dtype=torch.float64, device=_comm_device())
    table[rank] = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(table)
    return [[int(v) for v in row] for row in table.tolist()]


def _is_synced(layer: _BatchNorm) -> bool:
    """Whether ``layer`` is a SyncBatchNorm that will synchronize its batch statistics across processes."""
    if not isinstance(layer, nn.SyncBatchNorm) or not (dist.is_available() and dist.is_initialized()):
        return False
    group = layer.process_group if layer.process_group is not None else dist.group.WORLD
    return dist.get_world_size(group) > 1


# ------------------------------------------------------------------------------------------------- collector


class _Collector:
    """Forward hooks that copy each target layer's batch statistics, and their exact merge."""

    def __init__(self, layers: list[_BatchNorm], reset_after_read: bool) -> None:
        self.layers = layers
        self.reset_after_read = reset_after_read
        self.synced = [_is_synced(layer) for layer in layers]
        device = layers[0].running_mean.device if layers and layers[0].running_mean is not None else None
        self.dtype = accumulation_dtype(device)
        self.forward_index = 0
        self.flushed_until = 0
        self.pass_start = 0  # forward index where the current pass began
        # per layer: pending (forward index, count, stacked [mean; var]) records and merged summaries
        self.pending: list[list[tuple[int, int | Tensor, Tensor]]] = [[] for _ in layers]
        self.merged: list[list[Moments]] = [[] for _ in layers]
        self.bad: list[Tensor] = []  # per flushed chunk: which forwards had non-finite statistics
        self.stop_after: int | None = None  # layer index whose forward hook ends the forward (sequential)
        self.claim: Callable[[int], None] | None = None

    def hooks(self, pre: bool) -> list[torch.utils.hooks.RemovableHandle]:
        handles = []
        for i, layer in enumerate(self.layers):
            if pre:
                handles.append(layer.register_forward_pre_hook(self._pre_hook(i)))
            handles.append(layer.register_forward_hook(self._hook(i)))
        return handles

    def _pre_hook(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if self.claim is not None:
                self.claim(index)

        return hook

    def _hook(self, index: int) -> Callable[..., None]:
        layer = self.layers[index]
        synced = self.synced[index]

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not module.training:
                return
            inp = args[0]
            count: int | Tensor = inp.numel() // layer.num_features
            assert layer.running_mean is not None and layer.running_var is not None
            stats = torch.stack((layer.running_mean, layer.running_var))
            if synced:  # the kernel already merged all processes: count their elements too
                total = torch.tensor([float(count)], dtype=torch.float64, device=_comm_device())
                dist.all_reduce(total, group=layer.process_group)
                count = total.to(stats.device)
            self.pending[index].append((self.forward_index, count, stats))
            if self.reset_after_read:  # a non-finite batch must not poison the next one (0 * NaN = NaN)
                layer.running_mean.zero_()
                layer.running_var.fill_(1.0)
            if self.stop_after == index:
                raise _StopForward

        return hook

    def end_forward(self) -> None:
        self.forward_index += 1
        if self.forward_index - self.flushed_until >= _FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        """Merge the pending records; forwards with any non-finite statistic are marked and left out."""
        start, end = self.flushed_until, self.forward_index
        self.flushed_until = end
        if end == start:
            return
        stacked: list[tuple[Tensor, Tensor, Tensor] | None] = []
        bad: Tensor | None = None
        for records in self.pending:
            if not records:
                stacked.append(None)
                continue
            idx = torch.tensor([r[0] - start for r in records], dtype=torch.long)
            stats = torch.stack([r[2] for r in records]).to(self.dtype)  # (R, 2, C)
            if bad is None:
                bad = torch.zeros(end - start, dtype=self.dtype, device=stats.device)
            idx = idx.to(stats.device)
            rec_bad = (~torch.isfinite(stats).flatten(1).all(dim=1)).to(self.dtype)
            bad.index_add_(0, idx, rec_bad)
            stacked.append((idx, stats, self._counts(records, stats.device)))
        for i, item in enumerate(stacked):
            self.pending[i] = []
            if item is None:
                continue
            assert bad is not None
            idx, stats, counts = item
            keep = bad[idx] == 0
            counts = torch.where(keep, counts, torch.zeros_like(counts))
            mean = torch.where(keep.unsqueeze(-1), stats[:, 0], torch.zeros_like(stats[:, 0]))
            var = torch.where(keep.unsqueeze(-1), stats[:, 1], torch.zeros_like(stats[:, 1]))
            m2 = var * (counts - 1).clamp_min(0).unsqueeze(-1)
            self.merged[i].append(merge_moments(counts, mean, m2))
        if bad is not None:
            self.bad.append(bad > 0)

    def _counts(self, records: list[tuple[int, int | Tensor, Tensor]], device: torch.device) -> Tensor:
        values = [r[1] for r in records]
        if all(isinstance(v, int) for v in values):
            return torch.tensor(values, dtype=self.dtype).to(device)
        return torch.cat([torch.as_tensor(v, dtype=self.dtype, device=device).reshape(1) for v in values])

    def result(self, index: int) -> Moments:
        """This process's merged summary of layer ``index`` (zeros when it saw nothing)."""
        parts = self.merged[index]
        layer = self.layers[index]
        assert layer.running_mean is not None
        if not parts:
            zeros = torch.zeros(layer.num_features, dtype=self.dtype, device=layer.running_mean.device)
            return zeros.new_zeros(()), zeros, zeros.clone()
        count = torch.stack([p[0] for p in parts])
        return merge_moments(count, torch.stack([p[1] for p in parts]), torch.stack([p[2] for p in parts]))

    def bad_forwards(self) -> Tensor:
        """Indices (on this process) of the forwards with non-finite statistics."""
        if not self.bad:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([b.cpu() for b in self.bad]).nonzero().flatten()


# --------------------------------------------------------------------------------------------------- passes


@dataclass
class _PassResult:
    forwards: int = 0
    samples: int | None = 0
    stopped_by: str = "data"


def _run_pass(
    model: nn.Module,
    batches: Iterable[Any],
    forward_fn: ForwardFn,
    device: torch.device | None,
    num_samples: int | None,
    num_batches: int | None,
    collector: _Collector,
    distributed: bool,
) -> _PassResult:
    result = _PassResult()
    collector.pass_start = collector.forward_index
    seen = 0
    countable = True
    iterator: Iterator[Any] = iter(batches)
    end = object()
    while True:
        if num_batches is not None and result.forwards >= num_batches:
            result.stopped_by = "num_batches"
            break
        if num_samples is not None and seen >= num_samples:
            result.stopped_by = "num_samples"
            break
        batch = next(iterator, end)
        size = None if batch is end else batch_size_of(batch)
        if batch is not end and size is None:
            countable = False
            if num_samples is not None:
                raise TypeError(
                    f"`num_samples={num_samples}` needs batches with a tensor whose leading dimension is the "
                    f"batch size; got a batch of type {type(batch).__name__} without one. Use `num_batches`."
                )
        if distributed:  # every process runs the same number of forwards (SyncBatchNorm would hang otherwise)
            table = _gather_ints([0 if batch is end else 1, size or 0])
            if any(row[0] == 0 for row in table):
                break
            step_samples = sum(row[1] for row in table)
        else:
            if batch is end:
                break
            step_samples = size or 0
            if num_samples is not None and size is not None and seen + size > num_samples:
                batch = take_samples(batch, num_samples - seen, size)
                step_samples = num_samples - seen
        with contextlib.suppress(_StopForward):
            forward_fn(model, _move(batch, device))
        collector.end_forward()
        result.forwards += 1
        seen += step_samples
    result.samples = seen if countable else None
    return result


def _check_nonfinite(collector: _Collector, nonfinite: str, distributed: bool) -> int:
    """Raise (on every process) when a forward had non-finite statistics and ``nonfinite="raise"``."""
    bad = collector.bad_forwards()
    count = int(bad.numel())
    first = int(bad[0]) - collector.pass_start if count else -1
    if distributed:
        table = _gather_ints([count])
        total = sum(row[0] for row in table)
    else:
        total = count
    if total and nonfinite == "raise":
        where = f"batch {first} on this process" if count else "another process"
        raise ValueError(
            f"recalibrate_bn: {total} batch(es) gave NaN/Inf BatchNorm statistics (first: {where}); the "
            "model's statistics were left unchanged. Check the data (NaN/Inf inputs) or the weights, or pass "
            "`nonfinite='skip'` to leave such batches out."
        )
    return total


def _finalize(collector: _Collector, indices: list[int], distributed: bool) -> list[Moments]:
    """Merged summaries of the given layers over all processes (identical on every process)."""
    local = [collector.result(i) for i in indices]
    if not distributed:
        return local
    plain = [k for k, i in enumerate(indices) if not collector.synced[i]]
    merged = all_gather_moments([local[k] for k in plain])
    for k, moments in zip(plain, merged, strict=False):
        local[k] = moments
    for k, i in enumerate(indices):
        if collector.synced[i]:  # already global: make it bitwise identical everywhere
            flat = torch.cat([local[k][0].reshape(1), local[k][1], local[k][2]]).to(_comm_device())
            dist.broadcast(flat, src=0)
            flat = flat.to(local[k][1].device)
            c = local[k][1].shape[0]
            local[k] = (flat[0], flat[1 : 1 + c], flat[1 + c :])
    return local


def statistics_shift(old_mean: Tensor, old_var: Tensor, new_mean: Tensor, new_var: Tensor) -> Tensor:
    """How far the statistics ``old`` are from ``new``: a float64 tensor ``[mean_shift, var_shift]``.

    ``mean_shift`` is the channel mean of ``|new_mean - old_mean| / sqrt(new_var + eps)`` and ``var_shift`` the
    channel mean of ``|log(new_var + eps) - log(old_var + eps)|``, with BatchNorm's default ``eps = 1e-5``: the two
    numbers ``LayerShift`` reports for each recalibrated layer.

    Examples:
        >>> shift = statistics_shift(torch.zeros(2), torch.ones(2), torch.ones(2), torch.ones(2))
        >>> [round(v, 4) for v in shift.tolist()]
        [1.0, 0.0]
    """
    new_var = new_var.double()
    mean = ((new_mean.double() - old_mean.double()).abs() / (new_var + _EPS).sqrt()).mean()
    var = ((new_var + _EPS).log() - (old_var.double().clamp_min(0) + _EPS).log()).abs().mean()
    return torch.stack((mean, var))


# ----------------------------------------------------------------------------------------------- public API


def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_samples: int | None = None,
    num_batches: int | None = None,
    forward_fn: ForwardFn | None = None,
    mode: Mode = "train",
    dropout: DropoutMode = "eval",
    device: torch.device | str | None = None,
    nonfinite: NonFinite = "raise",
) -> RecalibrationReport:
    """Recompute the population statistics of ``model``'s BatchNorm layers exactly from ``batches``.

    Target layers are the BatchNorm layers (any ``_BatchNorm`` subclass: 1d/2d/3d, SyncBatchNorm, materialized
    lazy layers, user subclasses) that are in train mode and track running statistics. Afterwards each one
    holds the count-weighted mean and the unbiased variance (between-batch variance included) of everything it
    saw, as if all batches had been one. Layers in eval mode (frozen), ``track_running_stats=False`` layers
    and other normalizations are left exactly as they were. Parameters are never touched; every module's
    ``training`` flag, each layer's ``momentum`` and ``num_batches_tracked`` are restored; on any exception
    (KeyboardInterrupt included) the original statistics come back and the exception propagates.

    When ``torch.distributed`` is initialized, call it on every process: the processes first agree on each
    forward (all run the same number, so SyncBatchNorm cannot hang), then merge their statistics exactly, and
    all end with identical buffers equal to a one-process run over the union of their data.

    Args:
        model: the model; it is not moved (put it on ``device`` yourself).
        batches: an iterable of batches (a DataLoader, a list, a generator). Mode ``"sequential"`` iterates it
            once per layer, so it must be re-iterable (not an iterator).
        num_samples: stop after this many samples (leading dimension; summed over processes when distributed).
            In one process the last batch is cut so that exactly ``num_samples`` samples are used;
            distributed, the last forward is kept whole. ``None``: no limit.
        num_batches: stop after this many forwards (per process). ``None``: no limit.
        forward_fn: ``forward_fn(model, batch)`` runs one forward (its return value is ignored). Default: a
            tensor batch is passed as ``model(batch)``, a tuple/list as ``model(batch[0])``.
        mode: ``"train"`` (one pass, all target layers in train mode: precise BN) or ``"sequential"`` (one
            pass per layer in forward order, earlier layers already in eval mode with their new statistics).
        dropout: ``"eval"`` runs every non-BatchNorm module in eval mode (dropout off, so the statistics match
            inference); ``"train"`` keeps the model's own modes.
        device: move every tensor of each batch to this device first.
        nonfinite: ``"raise"`` refuses batches with NaN/Inf statistics (nothing is changed); ``"skip"`` leaves
            them out.

    Returns:
        A ``RecalibrationReport``.

    Raises:
        ValueError: for invalid arguments, when no sample reached the layers, or for non-finite statistics.
        TypeError: for batches the default forward cannot handle, or a one-shot iterator in sequential mode.

    Examples:
        >>> torch.manual_seed(0) and None
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> data = [torch.randn(n, 3) for n in (8, 5, 2)]
        >>> report = recalibrate_bn(net, data)
        >>> report.layers, report.num_samples, report.num_batches
        (['1'], 15, 3)
        >>> linear = net[0]
        >>> with torch.no_grad():
        ...     h = linear(torch.cat(data))
        >>> bool(torch.allclose(net[1].running_var, h.var(0), rtol=1e-5))
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(batches, Iterable):
        raise TypeError(f"`batches` must be an iterable of batches, got {type(batches).__name__}.")
    num_samples = check_int("num_samples", num_samples, allow_none=True)
    num_batches = check_int("num_batches", num_batches, allow_none=True)
    if forward_fn is not None and not callable(forward_fn):
        raise TypeError(f"`forward_fn` must be callable as forward_fn(model, batch), got {forward_fn!r}.")
    check_choice("mode", mode, MODES)
    check_choice("dropout", dropout, DROPOUT_MODES)
    check_choice("nonfinite", nonfinite, NONFINITE_ACTIONS)
    target_device = torch.device(device) if device is not None else None
    if mode == "sequential" and iter(batches) is batches:
        raise TypeError(
            'mode="sequential" iterates the batches once per layer: pass a re-iterable (a DataLoader, a '
            f"list), not a one-shot iterator ({type(batches).__name__})."
        )

    report = RecalibrationReport(mode=mode, world_size=_distributed_world())
    all_bn = batchnorm_layers(model)
    if not all_bn:
        warnings.warn("recalibrate_bn: the model has no BatchNorm layer; nothing to do.", UserWarning, stacklevel=2)
        return report
    targets: list[tuple[str, _BatchNorm]] = []
    for name, layer in all_bn:
        if not layer.track_running_stats or layer.running_mean is None or layer.running_var is None:
            report.skipped[name] = "track_running_stats=False"
        elif isinstance(layer.running_mean, UninitializedBuffer):
            raise ValueError(
                f"recalibrate_bn: the lazy BatchNorm layer {name!r} is not materialized yet; run one forward "
                "of the model first."
            )
        elif not layer.training:
            report.skipped[name] = "eval mode (frozen)"
        else:
            targets.append((name, layer))
    if not targets:
        warnings.warn(
            f"recalibrate_bn: no BatchNorm layer to recalibrate (skipped: {report.skipped}).",
            UserWarning,
            stacklevel=2,
        )
        return report

    layers = [layer for _, layer in targets]
    names = [name for name, _ in targets]
    flags = {module: module.training for module in model.modules()}
    saved = []
    for layer in layers:
        assert layer.running_mean is not None and layer.running_var is not None
        nbt = layer.num_batches_tracked.clone() if layer.num_batches_tracked is not None else None
        saved.append((layer.running_mean.clone(), layer.running_var.clone(), nbt, layer.momentum))
    distributed = report.world_size > 1
    run = forward_fn if forward_fn is not None else default_forward
    collector = _Collector(layers, reset_after_read=nonfinite == "skip")
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        with torch.no_grad():
            if dropout == "eval":
                for module in flags:
                    if not isinstance(module, _BatchNorm):
                        module.training = False
            for layer in layers:
                layer.momentum = 1.0
                layer.reset_running_stats()
            handles = collector.hooks(pre=mode == "sequential")
            if mode == "train":
                done = _train_mode(model, batches, run, target_device, num_samples, num_batches, collector, report)
            else:
                done = _sequential_mode(
                    model,
                    batches,
                    run,
                    target_device,
                    num_samples,
                    num_batches,
                    collector,
                    report,
                    names,
                    nonfinite,
                )
            report.nonfinite_batches = max(
                report.nonfinite_batches, _check_nonfinite(collector, nonfinite, distributed)
            )
            results = dict(done)
            missing = [i for i in range(len(layers)) if i not in results]
            if missing:
                results.update(zip(missing, _finalize(collector, missing, distributed), strict=False))
            seen_any = False
            shifts = []
            for i, layer in enumerate(layers):
                count, mean, m2 = results[i]
                old_mean, old_var, _, _ = saved[i]
                assert layer.running_mean is not None and layer.running_var is not None
                if float(count) <= 0:
                    layer.running_mean.copy_(old_mean)
                    layer.running_var.copy_(old_var)
                    report.skipped.setdefault(names[i], "not reached by the forward")
                    continue
                seen_any = True
                var = variance_from_moments(count, m2)
                layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
                layer.running_var.copy_(var.to(layer.running_var.dtype))
                shifts.append((names[i], statistics_shift(old_mean, old_var, layer.running_mean, layer.running_var)))
            if not seen_any:
                raise ValueError(
                    "recalibrate_bn: no sample reached the BatchNorm layers (the batches were empty); the "
                    "model's statistics were left unchanged."
                )
            if mode == "train":
                report.layers = [n for n in names if n not in report.skipped]
            if shifts:
                values = torch.stack([s for _, s in shifts]).cpu().tolist()
                report.shift = {
                    name: LayerShift(mean=v[0], var=v[1]) for (name, _), v in zip(shifts, values, strict=False)
                }
    except BaseException:
        with torch.no_grad():
            for layer, (mean, var, _, _) in zip(layers, saved, strict=False):
                assert layer.running_mean is not None and layer.running_var is not None
                layer.running_mean.copy_(mean)
                layer.running_var.copy_(var)
        raise
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for layer, (_, _, nbt, momentum) in zip(layers, saved, strict=False):
                layer.momentum = momentum
                if nbt is not None and layer.num_batches_tracked is not None:
                    layer.num_batches_tracked.copy_(nbt)
        for module, flag in flags.items():
            module.training = flag
    return report


def _train_mode(
    model: nn.Module,
    batches: Iterable[Any],
    run: ForwardFn,
    device: torch.device | None,
    num_samples: int | None,
    num_batches: int | None,
    collector: _Collector,
    report: RecalibrationReport,
) -> dict[int, Moments]:
    for layer in collector.layers:
        layer.training = True
    result = _run_pass(model, batches, run, device, num_samples, num_batches, collector, report.world_size > 1)
    collector.flush()
    report.passes = 1
    report.num_batches, report.num_samples, report.stopped_by = (
        result.forwards,
        result.samples,
        result.stopped_by,
    )
    return {}


def _sequential_mode(
    model: nn.Module,
    batches: Iterable[Any],
    run: ForwardFn,
    device: torch.device | None,
    num_samples: int | None,
    num_batches: int | None,
    collector: _Collector,
    report: RecalibrationReport,
    names: list[str],
    nonfinite: str,
) -> dict[int, Moments]:
    layers = collector.layers
    done: dict[int, Moments] = {}
    distributed = report.world_size > 1
    current: list[int] = []

    def claim(index: int) -> None:
        if not current and index not in done:
            current.append(index)
            collector.stop_after = index
            layers[index].training = True

    for layer in layers:
        layer.training = False
    collector.claim = claim
    for _ in range(len(layers)):
        current.clear()
        collector.stop_after = None
        result = _run_pass(model, batches, run, device, num_samples, num_batches, collector, distributed)
        collector.flush()
        if report.passes == 0:
            report.num_batches, report.num_samples, report.stopped_by = (
                result.forwards,
                result.samples,
                result.stopped_by,
            )
        report.passes += 1
        if not current:  # no layer left that the forward reaches
            break
        index = current[0]
        layer = layers[index]
        layer.training = False
        # stop at the first pass with NaN/Inf (on every process alike), or count the batches left out
        report.nonfinite_batches = max(report.nonfinite_batches, _check_nonfinite(collector, nonfinite, distributed))
        collector.bad.clear()
        count, mean, m2 = _finalize(collector, [index], distributed)[0]
        done[index] = (count, mean, m2)
        assert layer.running_mean is not None and layer.running_var is not None
        if float(count) > 0:  # later layers see this layer's new statistics
            layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
            layer.running_var.copy_(variance_from_moments(count, m2).to(layer.running_var.dtype))
            report.layers.append(names[index])
    collector.claim = None
    collector.stop_after = None
    for i, layer in enumerate(layers):
        if i not in done:
            zeros = torch.zeros(layer.num_features, dtype=collector.dtype)
            done[i] = (zeros.new_zeros(()), zeros, zeros.clone())
    return done


__all__ = [
    "LayerShift",
    "RecalibrationReport",
    "batch_size_of",
    "default_forward",
    "recalibrate_bn",
    "take_samples",
]
