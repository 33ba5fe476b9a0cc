"""``recalibrate_bn``: exact BatchNorm population statistics from data, in any PyTorch loop.

How it works (mode ``"train"``): every target BatchNorm layer gets ``momentum = 1.0`` for the duration, so
after each forward its ``running_mean``/``running_var`` hold exactly that batch's mean and unbiased variance,
computed by BatchNorm's own kernel. One copy per forward reads them for all layers at once (`collector`), and
the records are merged in float64 with Chan's formula, which adds the between-batch variance back. The result
equals what the layer would store after one forward of all its inputs concatenated, whatever the batch sizes,
their order or the split of the data over processes (`passes`). Each forward ends after the last target layer.
Mode ``"sequential"`` estimates the layers one at a time in forward order, each while all earlier layers already
use their new statistics in eval mode, and stops each forward right after the last call of the layer being
estimated. Every call of a layer that runs several times per forward counts; for such models the passes are
repeated until no layer's statistics move, since a later call may depend on a layer estimated after it.

Pure torch (no Lightning import).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import UninitializedBuffer

from lightning_bnsgd._validation import check_callable, check_choice, check_int
from lightning_bnsgd.bn._host import to_host
from lightning_bnsgd.bn._modes import preserved_modes, set_attribute
from lightning_bnsgd.bn._sequential import SequentialCollector
from lightning_bnsgd.bn.batches import ForwardFn as ForwardFn
from lightning_bnsgd.bn.batches import batch_size_of as batch_size_of
from lightning_bnsgd.bn.batches import default_forward as default_forward
from lightning_bnsgd.bn.batches import take_samples as take_samples
from lightning_bnsgd.bn.batches import takes_two_positional
from lightning_bnsgd.bn.buffers import FlatBuffers
from lightning_bnsgd.bn.collector import StatsCollector
from lightning_bnsgd.bn.distributed import agree_on_failure, broadcast_from_zero, gather_ints, world_size
from lightning_bnsgd.bn.inspect import batchnorm_layers, normalized_shift
from lightning_bnsgd.bn.moments import Moments, all_gather_moments, variance_from_moments
from lightning_bnsgd.bn.passes import PassRunner, PassStats

Mode = Literal["train", "sequential"]
DropoutMode = Literal["eval", "train"]
NonFinite = Literal["raise", "skip"]
MODES: tuple[str, ...] = get_args(Mode)
DROPOUT_MODES: tuple[str, ...] = get_args(DropoutMode)
NONFINITE_ACTIONS: tuple[str, ...] = get_args(NonFinite)
_EPS = 1e-5
#: `RecalibrationReport.skipped`'s reason for a BatchNorm layer in eval mode in a model in train mode.
_FROZEN = "eval mode (frozen)"
#: Mode "sequential" with layers called several times per forward: a round of passes that moves no layer's
#: statistics by more than this (`statistics_shift`, per channel) ends the rounds.
_SETTLED = 1e-5


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
        num_batches: forwards per pass on this process (a one-sample batch joined to its neighbour makes one).
        passes: passes over the data (1 in mode ``"train"``, one per layer in mode ``"sequential"``).
        stopped_by: ``"data"`` (the batches ran out), ``"num_samples"`` or ``"num_batches"`` (the budget was
            reached); ``"data"`` with a budget set means the data was shorter than the budget.
        nonfinite_batches: batches with NaN/Inf statistics left out (``nonfinite="skip"``), summed over
            processes.
        world_size: number of processes whose data was merged.
        shift: per recalibrated layer, how far its statistics moved.
        samples_per_rank: samples used by each process (first pass), in rank order.
        joined_batches: one-sample batches joined to a neighbouring batch (BatchNorm cannot take a lone sample in
            train mode), over all processes; their samples are included exactly.
        left_out_samples: lone samples left out because there was no batch to join them to (data of one
            sample), over all processes.
        agreement: how the processes agreed on the forwards: ``"local"`` (one process), ``"planned"`` (once, from
            the loaders' lengths) or ``"per_batch"`` (before every forward: a loader without a length, or
            SyncBatchNorm).
        data: where the batches came from, in the words of the caller that set it (``BNRecalibration`` does, e.g.
            ``"test data (the test dataloader, labels unused)"``); ``None`` from ``recalibrate_bn`` itself.

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
    samples_per_rank: list[int] = field(default_factory=list)
    joined_batches: int = 0
    left_out_samples: int = 0
    agreement: str = "local"
    data: str | None = None

    def max_shift(self) -> tuple[float, float]:
        """The largest ``(mean, var)`` shift over the recalibrated layers (zeros when there are none)."""
        if not self.shift:
            return 0.0, 0.0
        return max(s.mean for s in self.shift.values()), max(s.var for s in self.shift.values())

    def _record_pass(self, stats: PassStats) -> None:
        self.num_batches, self.num_samples, self.stopped_by = stats.forwards, stats.samples, stats.stopped_by
        self.samples_per_rank, self.agreement = stats.samples_per_rank, stats.agreement
        self.joined_batches, self.left_out_samples = stats.joined, stats.left_out


def validate_recalibration_args(
    owner: str,
    *,
    num_samples: object,
    mode: object,
    dropout: object,
    nonfinite: object,
    forward_fn: object,
    called_as: str = "forward_fn(model, batch)",
    hint: str = "",
) -> None:
    """The checks ``recalibrate_bn`` and ``BNRecalibration`` share; errors name ``owner``.

    ``num_samples`` must be ``None`` or at least 2 (a variance needs two samples, and BatchNorm refuses a lone
    sample in train mode). ``forward_fn`` must take two positional arguments (``called_as`` says how it is called;
    ``hint`` ends the message when it cannot).

    Examples:
        >>> validate_recalibration_args(
        ...     "BNRecalibration", num_samples=1, mode="train", dropout="eval", nonfinite="raise", forward_fn=None
        ... )
        Traceback (most recent call last):
        ...
        ValueError: BNRecalibration: `num_samples` must be None or an integer >= 2, got 1.
    """
    check_int("num_samples", num_samples, minimum=2, allow_none=True, owner=owner)
    check_choice("mode", mode, MODES, owner=owner)
    check_choice("dropout", dropout, DROPOUT_MODES, owner=owner)
    check_choice("nonfinite", nonfinite, NONFINITE_ACTIONS, owner=owner)
    fn = check_callable("forward_fn", forward_fn, called_as, owner=owner)
    if fn is not None and not takes_two_positional(fn):
        raise TypeError(
            f"{owner}: `forward_fn` is called as `{called_as}` (two positional arguments), but {forward_fn!r} "
            f"cannot take them.{hint}"
        )


@dataclass(frozen=True)
class _Run:
    """The inputs of one ``recalibrate_bn`` call."""

    model: nn.Module
    batches: Iterable[Any]
    forward_fn: ForwardFn
    device: torch.device | None
    num_samples: int | None
    num_batches: int | None
    mode: str
    dropout: str
    nonfinite: str

    def runner(self, collector: StatsCollector, learn: bool) -> PassRunner:
        """A runner for one pass whose forwards go through ``collector``."""

        def forward(batch: Any) -> None:
            collector.forward(lambda: self.forward_fn(self.model, batch), batch, learn)

        return PassRunner(
            self.batches, self.device, self.num_batches, self.num_samples, forward, lockstep=collector.lockstep
        )


@dataclass
class _Outcome:
    """What a mode computed: the merged summary of every target layer (over all processes) and its bookkeeping."""

    moments: list[Moments]
    first_pass: PassStats
    passes: int
    nonfinite_batches: int
    order: list[int]  # target indices in the order they were estimated


def _select_targets(model: nn.Module, report: RecalibrationReport) -> list[tuple[str, _BatchNorm]]:
    """The BatchNorm layers to recalibrate; the others go to ``report.skipped`` with the reason.

    In a model in train mode, BatchNorm layers in eval mode are frozen and left alone. A model in eval mode (as
    after ``model.eval()``, where every layer is in eval mode and no frozen layer can be told apart) is
    recalibrated as a whole, as ``torch.optim.swa_utils.update_bn`` does: every layer that tracks running
    statistics.
    """
    whole = not model.training
    targets = []
    for name, layer in batchnorm_layers(model):
        if not layer.track_running_stats or layer.running_mean is None or layer.running_var is None:
            report.skipped[name] = "track_running_stats=False"
        elif isinstance(layer.running_mean, UninitializedBuffer):
            raise ValueError(
                f"recalibrate_bn: the lazy BatchNorm layer {name!r} is not materialized yet; run one forward "
                "of the model first."
            )
        elif layer.running_mean.is_meta:
            raise ValueError(
                f"recalibrate_bn: the BatchNorm layer {name!r} of `model` is on the meta device (its buffers have "
                "a shape but no storage); materialize the model first (e.g. `model.to_empty(device=...)` and load "
                "its weights)."
            )
        elif not layer.training and not whole:
            report.skipped[name] = _FROZEN
        else:
            targets.append((name, layer))
    return targets


def all_frozen(model: nn.Module) -> list[str]:
    """The names of the frozen BatchNorm layers, when they are the only ones ``recalibrate_bn`` could recalibrate.

    These are the layers ``recalibrate_bn`` would leave alone as frozen; it then refuses the call. Empty when some layer
    would be recalibrated, or when the model has no BatchNorm layer that tracks running statistics.

    Examples:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> all_frozen(net)
        []
        >>> _ = net[1].eval()  # frozen, in a model in train mode
        >>> all_frozen(net)
        ['1']
    """
    report = RecalibrationReport(mode="train")
    try:
        if _select_targets(model, report):
            return []
    except ValueError:  # a layer recalibrate_bn refuses: it says so itself
        return []
    return [name for name, reason in report.skipped.items() if reason == _FROZEN]


def _nothing_to_do(report: RecalibrationReport) -> None:
    """Warn when the model has no layer that could ever be recalibrated; raise when all of them are frozen."""
    frozen = [name for name, reason in report.skipped.items() if reason == _FROZEN]
    if frozen:
        raise ValueError(
            f"recalibrate_bn: every BatchNorm layer of `model` that tracks running statistics is in eval mode in a "
            f"model in train mode, which recalibrate_bn treats as frozen and leaves alone ({frozen}), so nothing "
            "would change and the model's statistics were left unchanged. Put the layers to recalibrate in train "
            "mode for the call (`layer.train()`), or pass the model in eval mode (`model.eval()`) to recalibrate "
            "every BatchNorm layer as torch's update_bn does (each module's mode is restored afterwards)."
        )
    if not report.skipped:
        warnings.warn("recalibrate_bn: the model has no BatchNorm layer; nothing to do.", UserWarning, stacklevel=3)
    else:
        warnings.warn(
            f"recalibrate_bn: no BatchNorm layer to recalibrate (skipped: {report.skipped}).", UserWarning, stacklevel=3
        )


@contextlib.contextmanager
def _recalibration_state(model: nn.Module, layers: list[_BatchNorm], dropout: str) -> Iterator[FlatBuffers]:
    """Set up the layers for recalibration; on exit restore modes, momentum and, unless committed, statistics.

    A model in eval mode runs as after ``model.train()`` (then ``dropout`` applies), as in torch's ``update_bn``.

    The layers' own buffers are swapped out for the duration (`FlatBuffers`), so they are never touched before
    the final commit: any exception, ``KeyboardInterrupt`` included, leaves them exactly as they were.
    """
    momenta = [layer.momentum for layer in layers]
    buffers = FlatBuffers(layers)
    try:
        with torch.no_grad(), buffers.installed(), preserved_modes(model) as modules:
            if not model.training:
                for module in modules:
                    set_attribute(module, "training", True)
            if dropout == "eval":
                for module in modules:
                    if not isinstance(module, _BatchNorm):
                        set_attribute(module, "training", False)
            for layer in layers:
                set_attribute(layer, "momentum", 1.0)
            yield buffers
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            set_attribute(layer, "momentum", momentum)


def _flushed(collector: StatsCollector) -> Exception | None:
    """Merge the pass's last records (`StatsCollector.flush`); returns the error it raised, if any.

    The error is for `_check_nonfinite` to raise on every process (it comes after the pass's last agreement: the others
    are on their way there).
    """
    try:
        collector.flush()
    except Exception as err:
        return err
    return None


def _check_nonfinite(collector: StatsCollector, nonfinite: str, pass_start: int, error: Exception | None) -> int:
    """Count forwards with NaN/Inf statistics over all processes; raise on every process if ``"raise"``.

    ``error``: what this process's last flush of the pass raised (or ``None``). Every process takes this step, after
    every pass that reached a layer, failed or not: if one failed, every process raises here (`agree_on_failure`).
    """
    count, first = 0, -1
    if error is None:
        bad = collector.bad_forwards()
        count = int(bad.numel())
        first = int(bad[0]) - pass_start if count else -1
    total = sum(row[0] for row in agree_on_failure([count], error, "recalibrate_bn"))
    if total and nonfinite == "raise":
        where = f"batch {first} on this process" if count else "another process"
        raise ValueError(
            f"recalibrate_bn: {total} batch(es) gave NaN/Inf BatchNorm statistics (first: {where}); the "
            "model's statistics were left unchanged. Check the data (NaN/Inf inputs) or the weights, or pass "
            "`nonfinite='skip'` to leave such batches out."
        )
    return total


def _finalize(collector: StatsCollector, indices: list[int]) -> list[Moments]:
    """Merged summaries of the given layers over all processes (bitwise identical on every process)."""
    local = collector.results(indices)
    if world_size() == 1:
        return local
    plain = [k for k, i in enumerate(indices) if not collector.synced[i]]
    for k, moments in zip(plain, all_gather_moments([local[k] for k in plain]), strict=True):
        local[k] = moments
    for k, i in enumerate(indices):
        if collector.synced[i]:  # already global: make it bitwise identical everywhere
            count, mean, m2 = local[k]
            flat = broadcast_from_zero(torch.cat([count.reshape(1), mean, m2]))
            channels = mean.shape[0]
            local[k] = (flat[0], flat[1 : 1 + channels], flat[1 + channels :])
    return local


def _train_mode(run: _Run, collector: StatsCollector) -> _Outcome:
    for layer in collector.layers:
        layer.training = True
    stats = run.runner(collector, learn=True).run()
    error = _flushed(collector)
    collector.close()
    bad = _check_nonfinite(collector, run.nonfinite, 0, error)
    indices = list(range(len(collector.layers)))
    return _Outcome(_finalize(collector, indices), stats, 1, bad, indices)


def _sequential_mode(run: _Run, collector: SequentialCollector) -> _Outcome:
    """Estimate the layers one pass each, in forward order, every earlier layer in eval mode with its new statistics.

    When some layer runs several times in one forward (a siamese branch, a head shared across feature maps), a
    later call's input may depend on layers estimated after it; the passes are then repeated, all layers in eval
    mode with their latest statistics, until a round changes none of them (``_SETTLED``): then every layer holds
    the statistics of all its calls' inputs at inference.
    """
    layers = collector.layers
    done: dict[int, Moments] = {}
    order: list[int] = []
    tally = _PassTally()
    for layer in layers:
        layer.training = False
    while len(done) < len(layers):
        result = _layer_pass(run, collector, set(done), None, tally)
        if result is None:  # no layer left that the forward reaches
            break
        done[result[0]] = result[1]
        order.append(result[0])
    repeated = any(row[0] for row in gather_ints([int(collector.repeated_layers())]))
    rounds = 1
    while repeated and order:
        if rounds > len(order):
            raise ValueError(
                f'recalibrate_bn: mode="sequential" did not settle in {rounds} rounds over the layers: a BatchNorm '
                "layer that runs several times in one forward gets inputs that depend on its own statistics (a "
                'block applied to its own output). The model\'s statistics were left unchanged; use mode="train".'
            )
        moved = 0.0
        for index in order:
            result = _layer_pass(run, collector, set(done), index, tally)
            if result is None:
                raise RuntimeError(
                    f'recalibrate_bn: mode="sequential": a later pass over the data did not reach the BatchNorm '
                    f"layer it estimates ({index}); the model's statistics were left unchanged."
                )
            moved = max(moved, _moved(done[index], result[1]))
            done[index] = result[1]
        rounds += 1
        repeated = moved > _SETTLED
    assert tally.first is not None
    empty = collector.results(list(range(len(layers))))  # zeros for the layers never reached
    return _Outcome([done.get(i, empty[i]) for i in range(len(layers))], tally.first, tally.passes, tally.bad, order)


@dataclass
class _PassTally:
    """Bookkeeping over the passes of mode "sequential"."""

    first: PassStats | None = None
    passes: int = 0
    bad: int = 0


def _layer_pass(
    run: _Run, collector: SequentialCollector, estimated: set[int], target: int | None, tally: _PassTally
) -> tuple[int, Moments] | None:
    """One pass estimating ``target`` (or the first layer reached that is not in ``estimated``).

    Its new statistics are installed, so later passes see them. ``None`` when the forwards reached no such layer.
    """
    collector.open_layer_pass(estimated, target)
    start = collector.forward_index
    stats = run.runner(collector, learn=False).run()
    error = _flushed(collector)
    tally.first, tally.passes = tally.first or stats, tally.passes + 1
    index = collector.close_layer_pass()  # which layer the forwards reached: the flush does not change it
    if world_size() > 1:  # a process that forwarded nothing (an empty shard, no share of the budget) takes it too
        index = _agreed_layer(index, error)
    if index is None:
        if error is not None:  # no layer reached: nothing was recorded, so the flush had nothing to fail on
            raise error
        return None
    tally.bad = max(tally.bad, _check_nonfinite(collector, run.nonfinite, start, error))
    collector.clear_bad()
    moments = _finalize(collector, [index])[0]
    count, mean, m2 = moments
    if float(count) > 0:  # later layers see this layer's new statistics
        layer = collector.layers[index]
        layer.running_mean.copy_(mean)  # type: ignore[union-attr]
        layer.running_var.copy_(variance_from_moments(count, m2))  # type: ignore[union-attr]
    return index, moments


def _agreed_layer(index: int | None, error: Exception | None) -> int | None:
    """The layer a layer pass estimated, agreed by every process (``None`` on every process when none reached one).

    It is the layer the processes whose forwards reached a layer claimed. A process whose forwards reached none (it
    had no sample to use in the pass) estimates the same layer from no samples of its own, so every process takes
    the same collectives after the pass. ``error`` (this process's flush failure, when its forwards reached no
    layer) is raised on every process here.
    """
    rows = agree_on_failure([-1 if index is None else index], error if index is None else None, "recalibrate_bn")
    claimed = {row[0] for row in rows if row[0] >= 0}
    if len(claimed) > 1:
        raise ValueError(
            f'recalibrate_bn: mode="sequential": the processes estimated different BatchNorm layers in one pass '
            f"(layer indices {sorted(claimed)}): their models must run the same layers in the same order; the "
            "model's statistics were left unchanged."
        )
    return claimed.pop() if claimed else None


def _moved(old: Moments, new: Moments) -> float:
    """How far a layer's statistics moved between two estimates: the largest per-channel shift (`statistics_shift`)."""
    if float(old[0]) <= 0 or float(new[0]) <= 0:
        return 0.0 if float(old[0]) == float(new[0]) else float("inf")
    shift = _channel_shift(old[1], variance_from_moments(old[0], old[2]), new[1], variance_from_moments(new[0], new[2]))
    return float(shift.max()) if shift.numel() else 0.0


def _write_back(outcome: _Outcome, names: list[str], buffers: FlatBuffers, report: RecalibrationReport) -> None:
    """Commit the new statistics into the layers' own buffers and record each recalibrated layer's shift."""
    # one host read, also for layers on several devices (to_host gathers them on the first one's device)
    counts = [float(n) for n in to_host([outcome.moments[i][0].reshape(()) for i in outcome.order], torch.float64)]
    reached = [i for i, n in zip(outcome.order, counts, strict=True) if n > 0]
    for i, n in zip(outcome.order, counts, strict=True):
        if n <= 0:
            report.skipped.setdefault(names[i], "not reached by the forward")
    if not reached:
        raise ValueError(
            f"recalibrate_bn: no sample reached the BatchNorm layers: {_why_no_sample(report)}; the model's "
            "statistics were left unchanged."
        )
    sizes = [buffers.sizes[i] for i in reached]
    parts = [outcome.moments[i] for i in reached]
    device = parts[0][1].device
    if any(part[1].device != device for part in parts):  # layers on several devices
        device = torch.device("cpu")
        parts = [(n.to(device), m.to(device), s.to(device)) for n, m, s in parts]
    size_t = torch.tensor(sizes, device=device)
    layer_of = torch.repeat_interleave(torch.arange(len(reached), device=device), size_t)
    count = torch.stack([part[0].reshape(()) for part in parts])[layer_of]
    mean = torch.cat([part[1] for part in parts])
    var = variance_from_moments(count, torch.cat([part[2] for part in parts]))
    old_mean, old_var = buffers.originals_flat(reached, device)
    per_channel = _channel_shift(old_mean, old_var, mean, var)
    sums = per_channel.new_zeros(2, len(reached)).index_add_(1, layer_of, per_channel)
    shifts = (sums / size_t.to(sums.dtype)).T.cpu().tolist()
    buffers.commit(reached, mean, var)
    for i, shift in zip(reached, shifts, strict=True):
        report.layers.append(names[i])
        report.shift[names[i]] = LayerShift(mean=shift[0], var=shift[1])


def _why_no_sample(report: RecalibrationReport) -> str:
    """Why no sample reached a target layer, from what the (first) pass did (the same on every process)."""
    if report.left_out_samples and not report.num_samples:
        return (
            f"`batches` held {report.left_out_samples} sample(s) in all, with no second sample to join "
            "(BatchNorm needs at least 2 samples to compute a variance); pass at least 2 samples"
        )
    if report.num_samples == 0:
        return "`batches` was empty (no batch, or batches of 0 samples)"
    used = "batches" if report.num_samples is None else f"{report.num_samples} samples"
    return (
        f"the forwards of {used} ran no BatchNorm layer of `model`; check that `forward_fn` runs the model on the batch"
    )


def _channel_shift(old_mean: Tensor, old_var: Tensor, new_mean: Tensor, new_var: Tensor) -> Tensor:
    """`normalized_shift` of the old statistics from the new ones, in float64 with BatchNorm's default eps."""
    return normalized_shift(old_mean.double(), old_var.double().clamp_min(0), new_mean.double(), new_var.double(), _EPS)


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
    return _channel_shift(old_mean, old_var, new_mean, new_var).mean(dim=-1)


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
    lazy layers, user subclasses) that track running statistics and, in a model in train mode, are in train mode.
    Afterwards each one holds the count-weighted mean and the unbiased variance (between-batch variance included)
    of everything it saw, as if all batches had been one. In a model in train mode, BatchNorm layers in eval mode
    are frozen and left exactly as they were; when every one is frozen nothing could change, which is an error. A
    model in eval mode (``model.training`` is False, as after ``model.eval()``) is recalibrated as
    ``torch.optim.swa_utils.update_bn`` does it: as after ``model.train()``, every BatchNorm layer that tracks
    running statistics (``dropout`` then applies). ``track_running_stats=False`` layers and other normalizations
    are left exactly as they were. Parameters are never touched; every module's
    ``training`` flag, each layer's ``momentum`` and ``num_batches_tracked`` are restored; on any exception
    (KeyboardInterrupt included) the original statistics come back and the exception propagates.

    Each forward ends after the last target layer it reaches (nothing after it changes the statistics). A batch
    with a single sample is joined to its neighbour (BatchNorm refuses a lone sample in train mode).

    When ``torch.distributed`` is initialized, call it on every process, each with its own data (shards may
    differ in length): all processes end with identical buffers equal to a one-process run over the union of
    their data. When every process's ``batches`` has a length and the model has no SyncBatchNorm, the processes
    agree once at the start; otherwise before every forward, and with SyncBatchNorm a process whose data has run
    out forwards an empty batch until all are done, so the collectives never hang.

    Args:
        model: the model; it is not moved (put it on ``device`` yourself).
        batches: an iterable of batches (a DataLoader, a list, a generator). Mode ``"sequential"`` iterates it
            once per layer, so it must be re-iterable (not an iterator).
        num_samples: stop after this many samples (leading dimension; summed over processes when distributed,
            split between them in rank order). The last batch is cut so that exactly ``num_samples`` samples are
            used, never to a single sample. ``None``: no limit; otherwise at least 2.
        num_batches: stop after this many forwards (per process). ``None``: no limit.
        forward_fn: ``forward_fn(model, batch)`` runs one forward (its return value is ignored). Default: a
            tensor batch is passed as ``model(batch)``, a tuple/list as ``model(batch[0])``.
        mode: ``"train"`` (one pass, all target layers in train mode: precise BN) or ``"sequential"`` (one
            pass per layer in forward order, earlier layers already in eval mode with their new statistics; every
            call of a layer that runs several times per forward counts, and for such models the passes are
            repeated until no layer's statistics move: each layer then holds the statistics of all its calls'
            inputs at inference; a layer whose input depends on its own statistics is an error).
        dropout: ``"eval"`` runs every non-BatchNorm module in eval mode (dropout off, so the statistics match
            inference); ``"train"`` keeps the model's own modes.
        device: move every tensor of each batch to this device first.
        nonfinite: ``"raise"`` refuses batches with NaN/Inf statistics (nothing is changed); ``"skip"`` leaves
            them out.

    Returns:
        A ``RecalibrationReport``.

    Raises:
        ValueError: for invalid arguments, when no sample reached the layers, when every BatchNorm layer of a
            model in train mode is frozen, or for non-finite statistics.
        TypeError: for batches the default forward cannot handle, a one-shot iterator in sequential mode, or a
            ``forward_fn`` that cannot be called as ``forward_fn(model, batch)`` (before any forward).

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
    run = _make_run(model, batches, num_samples, num_batches, forward_fn, mode, dropout, device, nonfinite)
    report = RecalibrationReport(mode=mode, world_size=world_size())
    targets = _select_targets(model, report)
    if not targets:
        _nothing_to_do(report)
        return report
    names = [name for name, _ in targets]
    layers = [layer for _, layer in targets]
    with _recalibration_state(model, layers, run.dropout) as buffers:
        reset = run.nonfinite == "skip"
        sequential = SequentialCollector(layers, buffers, reset) if run.mode == "sequential" else None
        collector = sequential or StatsCollector(layers, buffers, reset)
        try:
            outcome = _train_mode(run, collector) if sequential is None else _sequential_mode(run, sequential)
        finally:
            collector.close()
        report._record_pass(outcome.first_pass)
        report.passes, report.nonfinite_batches = outcome.passes, outcome.nonfinite_batches
        _write_back(outcome, names, buffers, report)
    return report


def _make_run(
    model: nn.Module,
    batches: Iterable[Any],
    num_samples: int | None,
    num_batches: int | None,
    forward_fn: ForwardFn | None,
    mode: str,
    dropout: str,
    device: torch.device | str | None,
    nonfinite: str,
) -> _Run:
    """Check ``recalibrate_bn``'s arguments (whatever the caller passed: the types are not trusted) and bundle them."""
    owner = "recalibrate_bn"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: `model` must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(batches, Iterable):
        raise TypeError(f"{owner}: `batches` must be an iterable of batches, got {type(batches).__name__}.")
    validate_recalibration_args(
        owner, num_samples=num_samples, mode=mode, dropout=dropout, nonfinite=nonfinite, forward_fn=forward_fn
    )
    check_int("num_batches", num_batches, minimum=1, allow_none=True, owner=owner)
    torch_device = _check_device(device, owner)
    if mode == "sequential" and iter(batches) is batches:
        raise TypeError(
            f'{owner}: mode="sequential" iterates the batches once per layer: pass a re-iterable (a DataLoader, a '
            f"list), not a one-shot iterator ({type(batches).__name__})."
        )
    return _Run(
        model=model,
        batches=batches,
        forward_fn=forward_fn if forward_fn is not None else default_forward,
        device=torch_device,
        num_samples=num_samples,
        num_batches=num_batches,
        mode=str(mode),
        dropout=str(dropout),
        nonfinite=str(nonfinite),
    )


def _check_device(device: object, owner: str) -> torch.device | None:
    """``device`` as a ``torch.device`` (``None`` stays ``None``); a clear error for anything else or ``meta``."""
    if device is None:
        return None
    try:
        resolved = torch.device(device)  # type: ignore[call-overload]
    except (TypeError, RuntimeError, ValueError) as err:
        raise ValueError(
            f"{owner}: `device` must be None, a torch.device or a device string such as 'cpu' or 'cuda:0', got "
            f"{device!r} ({err})."
        ) from None
    if resolved.type == "meta":
        raise ValueError(
            f"{owner}: `device` must be a device with data, got {device!r}: meta tensors have a shape but no "
            "values, so there are no statistics to compute from them."
        )
    return resolved


__all__ = [
    "DropoutMode",
    "LayerShift",
    "Mode",
    "NonFinite",
    "RecalibrationReport",
    "all_frozen",
    "recalibrate_bn",
    "statistics_shift",
    "validate_recalibration_args",
]
