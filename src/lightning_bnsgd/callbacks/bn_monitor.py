"""``BNStatsMonitor``: BatchNorm health logged to every Lightning logger, with anomaly alerts."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.nn.modules.batchnorm import SyncBatchNorm, _BatchNorm
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_bnsgd._compat import Callback, logging_step, namespace_name, namespace_of
from lightning_bnsgd._validation import check_bool, check_choice, check_int, check_number, check_str, is_int
from lightning_bnsgd.bn.distributed import all_ranks_max_min, all_reduce_max, is_distributed
from lightning_bnsgd.bn.inspect import (
    ANOMALIES,
    BUFFER_STATS,
    GAP_STATS,
    Segments,
    anomaly_flags,
    batch_moments,
    batchnorm_layers,
    configuration_issues,
    gap_summaries,
    summarize_layers,
)
from lightning_bnsgd.callbacks._cadence import LoggingCadence
from lightning_bnsgd.callbacks._log_prefix import resolve_prefixes
from lightning_bnsgd.callbacks._monitor_layout import RANK_STATS, StepLayout, StepValues
from lightning_bnsgd.callbacks._name_patterns import (
    COMPILED_WRAPPER_NAME,
    compile_name_patterns,
    select_layer_names,
    user_module_name,
)
from lightning_bnsgd.callbacks._own_forwards import in_own_forwards
from lightning_bnsgd.callbacks._warn_once import WarnOnce

if TYPE_CHECKING:
    from lightning_bnsgd._compat import LightningModule, Trainer

AnomalyAction = Literal["warn", "raise", "ignore"]
_OWNER = "BNStatsMonitor"
#: ``torch.compiler.set_stance`` (torch >= 2.6): runs compiled code eagerly while its stance is "force_eager".
_SET_STANCE: Any = getattr(torch.compiler, "set_stance", None)
_eager_holders: set[int] = set()  # the monitors that run compiled code eagerly now (the stance is per process)
_eager_stance: Any = None  # the "force_eager" stance set for them; closing it restores the one before
_LEGACY_STATE_KEY = _OWNER  # the checkpoint key of every monitor before `state_key` named its arguments
_ACTIONS = ("warn", "raise", "ignore")
#: Every per-layer statistic ``BNStatsMonitor`` can log (``<log_prefix>/<layer name>/<statistic>``, ``bn/`` by default).
STATS: tuple[str, ...] = (*BUFFER_STATS, *GAP_STATS, "samples_per_channel", *RANK_STATS)
_HISTOGRAM_TENSORS = ("running_mean", "running_var", "weight")
_ANOMALY_TEXT = {
    "nonfinite_running_mean": "NaN/Inf in running_mean",
    "nonfinite_running_var": "NaN/Inf in running_var",
    "nonfinite_weight": "NaN/Inf in weight",
    "nonfinite_bias": "NaN/Inf in bias",
    "running_var_low": "running_var collapsed below min_running_var={bound}",
    "running_var_high": "running_var exploded above max_running_var={bound}",
    "dead_frac_high": "dead-channel fraction above max_dead_fraction={bound}",
}


class BNAnomalyError(RuntimeError):
    """Raised by ``BNStatsMonitor(on_anomaly="raise")`` when a BatchNorm layer is unhealthy.

    Examples:
        >>> str(BNAnomalyError("layer 'net.0': NaN/Inf in running_var at step 50"))
        "layer 'net.0': NaN/Inf in running_var at step 50"
    """


@dataclass
class _Capture:
    """What the forward pre-hook of one layer saw during a monitored training step."""

    samples: int = 0
    batch_stats: bool = False  # the forward normalized with the batch's statistics (train mode or no buffers)
    mean: Tensor | None = None
    var: Tensor | None = None
    running_mean: Tensor | None = None
    running_var: Tensor | None = None


def _freeze_marks(module: _BatchNorm) -> frozenset[str]:
    """How ``module`` is frozen now: ``"eval"`` (eval mode), ``"params"`` (affine parameters without gradients),
    ``"no_track"`` (``track_running_stats=False``, as Lightning's ``BaseFinetuning.freeze_module`` sets it)."""
    marks = set()
    if not module.training:
        marks.add("eval")
    params = [p for p in (module.weight, module.bias) if isinstance(p, Tensor)]
    if params and not any(p.requires_grad for p in params):
        marks.add("params")
    if not module.track_running_stats:
        marks.add("no_track")
    return frozenset(marks)


@dataclass
class _Frozen:
    """A layer seen frozen, with its running statistics at that moment."""

    marks: frozenset[str]
    running_mean: Tensor
    running_var: Tensor

    def released(self, module: _BatchNorm) -> bool:
        """Unfrozen on purpose since: parameters trainable again or tracking switched back on (what
        ``BaseFinetuning.make_trainable`` and ``unfreeze_and_add_param_group`` do). Eval mode alone cannot tell a
        deliberate ``.train()`` from an accidental one, so it never releases."""
        now = _freeze_marks(module)
        return any(mark in self.marks and mark not in now for mark in ("params", "no_track"))


@dataclass
class _Layer:
    name: str
    module: _BatchNorm
    capture: _Capture = field(default_factory=_Capture)
    frozen: _Frozen | None = None


def _check_bounds(
    dead_threshold: object, min_running_var: object, max_running_var: object, max_dead_fraction: object
) -> tuple[float, float | None, float | None, float | None]:
    """The anomaly bounds, checked: a bound that could never flag anything is refused (``None`` turns a check off).

    Examples:
        >>> _check_bounds(0.01, 1e-8, 1e6, None)
        (0.01, 1e-08, 1000000.0, None)
    """
    positive: dict[str, Any] = {"minimum": 0.0, "min_open": True, "owner": _OWNER}
    dead = check_number("dead_threshold", dead_threshold, **positive)
    low = check_number("min_running_var", min_running_var, allow_none=True, **positive)
    high = check_number("max_running_var", max_running_var, allow_none=True, **positive)
    fraction = check_number(
        "max_dead_fraction", max_dead_fraction, 0.0, 1.0, max_open=True, allow_none=True, owner=_OWNER
    )
    if low is not None and high is not None and low >= high:
        raise ValueError(
            f"{_OWNER}: `min_running_var` ({min_running_var!r}) must be below `max_running_var` ({max_running_var!r})."
        )
    return dead, low, high, fraction


def _check_stats(stats: Sequence[str] | None) -> tuple[str, ...]:
    if stats is None:
        return STATS
    if isinstance(stats, str) or not isinstance(stats, Sequence):
        raise TypeError(f"{_OWNER}: `stats` must be a list of statistic names or None, got {stats!r}.")
    unknown = [s for s in stats if s not in STATS]
    if unknown:
        raise ValueError(f"{_OWNER}: `stats` has unknown statistics {unknown}; allowed: {list(STATS)}.")
    return tuple(stats)


class BNStatsMonitor(Callback):
    """Log BatchNorm health every ``log_every_n_steps`` training steps to every logger of the Trainer.

    Per BatchNorm layer it logs ``bn/<layer name>/<statistic>`` (``bn`` is `log_prefix`) for the statistics in `STATS`
    (running statistics, affine parameters, dead-channel fraction, effective gain, the gap between the current
    training batch's statistics and the running ones, samples per channel, and across DDP ranks the largest
    difference of the running statistics), plus a whole-model summary ``bn/summary/...``: the worst layer's
    gaps (``gap_mean_max``, ``gap_var_max``), the total dead-channel fraction (``dead_frac``), the total
    ``nonfinite_count`` and, on multi-device runs, the largest cross-rank differences.

    It monitors exactly the training batches whose ``self.log`` metrics Lightning logs, and logs at the same step, so
    its values line up with the module's own metrics. Steps are counted like the Trainer counts them for its own
    ``log_every_n_steps``: training batches that end with an optimizer step, once per batch whatever the number of
    optimizers (with gradient accumulation, the last micro-batch of each accumulation window; with manual
    optimization, every batch); like Lightning, it also monitors every such batch while the Trainer has been told
    to stop but ``min_steps`` or ``min_epochs`` keep it training. The step logged at is the count of earlier such
    batches (``trainer.global_step - 1`` with one optimizer).

    It is cheap enough to leave on: forward pre-hooks that read the batch statistics are attached only for the
    monitored step and removed right after; every number of that step is computed on the device and moved to
    the host in one transfer; other steps cost nothing. Only rank zero logs. Under ``torch.compile`` a monitored
    step runs the compiled code eagerly (``torch.compiler.set_stance("force_eager")``), so that the hooks see every
    layer and never enter a compiled graph; the other steps run compiled. Forwards that the plugin's callbacks run
    for themselves (``WeightDynamicsMonitor``'s probe) are not recorded.

    Several monitors can share a Trainer, each checkpointed under its own `state_key` and logging under its own
    ``log_prefix``: when two ask for the same one, the later in the callback list logs under ``<log_prefix>_2`` and
    says so at ``setup`` (the two would otherwise write their summaries under one name). A
    checkpointed state that is not the monitor's own (wrong types, a negative count) is named in a warning and
    replaced by a fresh one.

    Each monitored step is also checked for anomalies: NaN/Inf in a buffer or affine parameter,
    ``running_var`` outside ``[min_running_var, max_running_var]``, a dead-channel fraction above
    ``max_dead_fraction``. Misconfigurations get one warning each, at the first training batch: layers without
    running statistics, ``momentum=None`` or ``0`` on layers that update their statistics, and plain BatchNorm
    normalizing with per-device batch statistics on several devices; at the first monitored step, too few
    samples per channel. Layers frozen on purpose (eval mode, ``requires_grad=False`` affine parameters, or
    ``track_running_stats=False`` as Lightning's ``BaseFinetuning.freeze`` sets it) are watched: a warning says
    when their running statistics change anyway. Unfreezing them (``BaseFinetuning.make_trainable``,
    ``BackboneFinetuning``) ends the watch.

    Args:
        log_every_n_steps: monitor every this many training steps (default: the Trainer's ``log_every_n_steps``;
            0 there turns the monitor off).
        include: layer-name patterns to monitor (default: all BatchNorm layers). A pattern is a glob unless it
            starts with ``"re:"``; then it is a regular expression searched in the name. Names are those of
            ``LightningModule.named_modules()`` without the ``_orig_mod`` that ``torch.compile`` adds, e.g.
            ``"net.features.0.norm"``.
        exclude: layer-name patterns to leave out (same syntax), applied after ``include``.
        stats: per-layer statistics to log, from `STATS` (default: all). The summary and the anomaly
            checks are unaffected.
        dead_threshold: a channel is dead when ``|gamma|`` is below this (> 0).
        min_running_var: anomaly when a layer's smallest ``running_var`` is below this (> 0; None: no check).
        max_running_var: anomaly when a layer's largest ``running_var`` is above this (> 0; None: no check).
        max_dead_fraction: anomaly when a layer's dead-channel fraction is above this (in ``[0, 1)``, as a
            fraction can never exceed 1; None: no check).
        on_anomaly: ``"warn"`` (once per layer and kind of anomaly), ``"raise"`` (`BNAnomalyError`) or
            ``"ignore"``.
        min_samples_per_channel: warn when a layer that normalizes with batch statistics gets, at the first
            monitored step, fewer values per channel than this.
        log_histograms: also log histograms of ``running_mean``, ``running_var`` and ``weight`` per layer
            through the ``TensorBoardLogger`` (of either Lightning namespace); other loggers are skipped with
            one warning.
        log_prefix: the first part of every logged name (``<log_prefix>/<layer name>/<statistic>``,
            ``<log_prefix>/summary/...``, the histograms'). A second monitor of the Trainer asking for the same one
            logs under ``<log_prefix>_2`` (said at ``setup``).

    Raises:
        TypeError: for an argument of the wrong type.
        ValueError: for an argument with a value that is not allowed.

    Examples:
        >>> monitor = BNStatsMonitor(log_every_n_steps=10, include="net.features.*", stats=["gap_var_max"])
        >>> monitor.log_every_n_steps, monitor.stats
        (10, ('gap_var_max',))
        >>> BNStatsMonitor(on_anomaly="explode")
        Traceback (most recent call last):
        ...
        ValueError: BNStatsMonitor: `on_anomaly` must be one of ('warn', 'raise', 'ignore'), got 'explode'.
        >>> BNStatsMonitor(max_dead_fraction=1.5)
        Traceback (most recent call last):
        ...
        ValueError: BNStatsMonitor: `max_dead_fraction` must be None or a finite number >= 0.0 and < 1.0, got 1.5.
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        stats: Sequence[str] | None = None,
        dead_threshold: float = 1e-2,
        min_running_var: float | None = 1e-8,
        max_running_var: float | None = 1e6,
        max_dead_fraction: float | None = 0.5,
        on_anomaly: AnomalyAction = "warn",
        min_samples_per_channel: int = 16,
        log_histograms: bool = False,
        log_prefix: str = "bn",
    ) -> None:
        self.log_every_n_steps: int | None = check_int(
            "log_every_n_steps", log_every_n_steps, allow_none=True, owner=_OWNER
        )
        self._include = compile_name_patterns(include, "include", _OWNER)
        self._exclude = compile_name_patterns(exclude, "exclude", _OWNER)
        self.include = include
        self.exclude = exclude
        self.stats: tuple[str, ...] = _check_stats(stats)
        self.dead_threshold, self.min_running_var, self.max_running_var, self.max_dead_fraction = _check_bounds(
            dead_threshold, min_running_var, max_running_var, max_dead_fraction
        )
        self.on_anomaly: AnomalyAction = check_choice("on_anomaly", on_anomaly, _ACTIONS, owner=_OWNER)
        self.min_samples_per_channel: int = check_int(
            "min_samples_per_channel", min_samples_per_channel, 0, owner=_OWNER
        )
        self.log_histograms: bool = check_bool("log_histograms", log_histograms, owner=_OWNER)
        self.log_prefix: str = check_str("log_prefix", log_prefix, owner=_OWNER)
        self._prefix = self.log_prefix  # what the names start with: `log_prefix`, unless another monitor has it

        self._cadence = LoggingCadence(self.log_every_n_steps)
        self._layers: list[_Layer] = []
        self._handles: list[RemovableHandle] = []
        self._monitoring = False  # the current batch is monitored
        self._first_batch = True
        self._samples_checked = False
        self._warned = WarnOnce()
        self._histogram_loggers: list[Any] = []
        self._world_size = 1
        self._is_zero = True
        self._segments: Segments | None = None

    # ------------------------------------------------------------------ fit start
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._cadence.setup(trainer, stage, _OWNER, " (no statistics, no anomaly checks)")
        resolve_prefixes([cb for cb in trainer.callbacks if isinstance(cb, BNStatsMonitor)], _OWNER, self)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._world_size = int(trainer.world_size)
        self._first_batch = True
        self._samples_checked = False
        named = batchnorm_layers(pl_module)
        if _SET_STANCE is None and any(COMPILED_WRAPPER_NAME in name.split(".") for name, _ in named):
            rank_zero_warn(
                f"{_OWNER}: the model has `torch.compile`d modules, and this torch (< 2.6) cannot run them eagerly "
                "for a monitored step (`torch.compiler.set_stance`): compiled code skips the monitor's hooks, so "
                "the batch statistics of those layers (gaps, samples per channel) may be missing."
            )
        found = [(user_module_name(name), m) for name, m in named]  # the user's names, also under torch.compile
        keep = set(select_layer_names([name for name, _ in found], self._include, self._exclude))
        self._layers = [_Layer(name, m) for name, m in found if name in keep]
        self._segments = None
        if not self._layers:
            what = "has no BatchNorm layer" if not found else "has no BatchNorm layer matching `include`/`exclude`"
            rank_zero_warn(f"{_OWNER}: the model {what}; nothing will be monitored.")
            return
        if not trainer.loggers:
            rank_zero_warn(
                f"{_OWNER}: the Trainer has no logger, so no BatchNorm statistics will be logged "
                "(anomaly checks still run)."
            )
        self._histogram_loggers = self._find_histogram_loggers(trainer) if self.log_histograms else []

    def _find_histogram_loggers(self, trainer: Trainer) -> list[Any]:
        """The Trainer's TensorBoard loggers, each recognized in its own Lightning namespace."""
        found, skipped = [], []
        for logger in trainer.loggers:
            if namespace_name(logger) is not None and isinstance(
                logger, namespace_of(logger).loggers.TensorBoardLogger
            ):
                found.append(logger)
            else:
                skipped.append(type(logger).__name__)
        if skipped:
            rank_zero_warn(
                f"{_OWNER}: `log_histograms=True` but {skipped} cannot log histograms; only TensorBoardLogger "
                "gets them."
            )
        return found

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._watch_frozen()

    def _check_configuration(self) -> None:
        """Warn about layer settings that are likely mistakes, as the layers stand at the first training batch."""
        selected = [(x.name, x.module) for x in self._layers]
        issues = configuration_issues(selected)
        if issues["no_running_stats"]:
            rank_zero_warn(
                f"{_OWNER}: BatchNorm layers without running statistics (built with `track_running_stats=False`) "
                f"normalize with batch statistics in evaluation too, so predictions depend on the batch: "
                f"{issues['no_running_stats']}."
            )
        if issues["momentum_none"]:
            rank_zero_warn(
                f"{_OWNER}: BatchNorm layers with `momentum=None` keep a cumulative average that weights every "
                "batch since the start equally, so statistics collected under early weights never fade; use a "
                f"momentum such as 0.1 or recalibrate: {issues['momentum_none']}."
            )
        if issues["momentum_zero"]:
            rank_zero_warn(
                f"{_OWNER}: BatchNorm layers with `momentum=0` never update their running statistics "
                f"(to freeze BatchNorm, keep the layer in eval mode instead): {issues['momentum_zero']}."
            )
        per_device = [
            name
            for name, m in selected
            if not isinstance(m, SyncBatchNorm) and (m.training or not isinstance(m.running_mean, Tensor))
        ]
        if self._world_size > 1 and per_device:
            rank_zero_warn(
                f"{_OWNER}: {len(per_device)} plain BatchNorm layer(s) normalize with batch statistics on "
                f"{self._world_size} devices: each device uses its own batch's. When per-device batches are small, "
                f"use `Trainer(sync_batchnorm=True)` (SyncBatchNorm). Layers: {per_device}."
            )

    def _watch_frozen(self) -> None:
        """Keep the running statistics of layers frozen now that are not watched yet."""
        for layer in self._layers:
            m = layer.module
            if layer.frozen is not None or not isinstance(m.running_mean, Tensor):
                continue
            marks = _freeze_marks(m)
            if marks:
                assert isinstance(m.running_var, Tensor)
                layer.frozen = _Frozen(marks, m.running_mean.detach().clone(), m.running_var.detach().clone())

    # ------------------------------------------------------------------ hooks
    def _make_hook(self, layer: _Layer, keep_running: bool) -> Any:
        def hook(module: _BatchNorm, args: tuple[Any, ...]) -> None:
            if in_own_forwards():  # another plugin callback's forwards (a probe) are not the training batch
                return
            if not args or not isinstance(args[0], Tensor) or args[0].dim() < 2:
                return
            x = args[0]
            cap = layer.capture
            cap.samples = x.numel() // x.shape[1] if x.shape[1] else 0
            rm, rv = module.running_mean, module.running_var
            cap.batch_stats = module.training or not isinstance(rm, Tensor)
            if not isinstance(rm, Tensor) or not isinstance(rv, Tensor) or not (self._is_zero or keep_running):
                return
            with torch.no_grad():
                # the buffers this step normalizes with, before this forward updates them
                cap.running_mean, cap.running_var = rm.detach().clone(), rv.detach().clone()
                if self._is_zero:
                    cap.mean, cap.var, _ = batch_moments(x)

        return hook

    def _attach(self) -> None:
        for layer in self._layers:
            layer.capture = _Capture()
            hook = self._make_hook(layer, keep_running=self._world_size > 1)
            self._handles.append(layer.module.register_forward_pre_hook(hook))

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        _release_eager(self)  # compiled code runs compiled again (once no other monitor needs it eager)

    def _run_eagerly(self) -> None:
        """Run ``torch.compile``d code eagerly for this monitored step, so that the hooks see every layer's input.
        Compiled code does not call hooks added after it was compiled, and a hook compiled into a graph would keep
        running (and be recompiled) on every later step; eager, the compiled graphs stay free of the monitor."""
        _hold_eager(self)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._remove_hooks()
        logged = self._cadence.begin_batch(trainer, batch_idx)
        self._monitoring = False
        if not self._layers:
            return
        if self._first_batch:  # after every on_*_start hook: the layers are as the user and the callbacks set them
            self._first_batch = False
            self._watch_frozen()
            self._check_configuration()
        self._is_zero = bool(trainer.is_global_zero)
        self._monitoring = logged
        if self._monitoring:
            self._watch_frozen()  # layers frozen since the last monitored step
            self._run_eagerly()
            self._attach()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._remove_hooks()
        self._cadence.end_batch()
        if self._monitoring:
            self._monitoring = False
            if not self._samples_checked:
                self._samples_checked = True
                self._check_samples()
            self._monitor_step(trainer)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._remove_hooks()
        self._monitoring = False

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()
        for layer in self._layers:
            layer.frozen = None

    def _check_samples(self) -> None:
        few = [
            f"{x.name} ({x.capture.samples})"
            for x in self._layers
            if x.capture.batch_stats and 0 < x.capture.samples < self.min_samples_per_channel
        ]
        if few:
            rank_zero_warn(
                f"{_OWNER}: BatchNorm layers normalize with batch statistics from fewer than "
                f"min_samples_per_channel={self.min_samples_per_channel} values per channel in a training "
                "batch, so their normalization and running statistics are noisy (larger batches, "
                f"SyncBatchNorm or GroupNorm help): {few}."
            )

    # ------------------------------------------------------------------ the monitored step (on the device)
    def _monitor_step(self, trainer: Trainer) -> None:
        layers = self._layers
        device = next(
            (t.device for t in (layers[0].module.running_mean, layers[0].module.weight) if isinstance(t, Tensor)),
            torch.device("cpu"),
        )
        if self._segments is None or self._segments.ids.device != device:
            self._segments = Segments([x.module.num_features for x in layers], device)
        summary, nonfinite = summarize_layers([x.module for x in layers], self.dead_threshold, device, self._segments)
        flags = anomaly_flags(summary, nonfinite, self.min_running_var, self.max_running_var, self.max_dead_fraction)
        frozen = self._frozen_changes(device)
        rank_diff = None
        if self._world_size > 1:
            rank_diff, flags, frozen = self._across_ranks(trainer, flags, frozen, device)
        histograms: list[Tensor] = []
        sizes: list[tuple[str, str, int]] = []
        if self._histogram_loggers and self._is_zero:
            for x in layers:
                for name in _HISTOGRAM_TENSORS:
                    t = getattr(x.module, name, None)
                    if isinstance(t, Tensor):
                        histograms.append(t.detach())
                        sizes.append((x.name, name, t.numel()))
        layout = StepLayout(len(layers), rank_diff is not None, tuple(sizes))
        packed = layout.pack(summary, self._gaps(device), rank_diff, flags, frozen, histograms)
        self._report(trainer, layout.unpack(packed.cpu()))  # the one device-to-host transfer of this step

    def _gaps(self, device: torch.device) -> Tensor:
        """``(layers, len(GAP_STATS))`` batch-versus-running gaps; NaN rows for layers whose input was not seen."""
        layers = self._layers
        gaps = torch.full((len(layers), len(GAP_STATS)), math.nan, device=device)
        captured = [i for i, x in enumerate(layers) if x.capture.mean is not None]
        if not captured:
            return gaps
        caps = [layers[i].capture for i in captured]
        flat = [
            torch.cat([getattr(c, name).to(device) for c in caps])
            for name in ("mean", "var", "running_mean", "running_var")
        ]
        assert self._segments is not None
        everything = len(captured) == len(layers)
        segments = self._segments if everything else Segments([layers[i].module.num_features for i in captured], device)
        eps = torch.tensor([float(layers[i].module.eps) for i in captured], device=device)[segments.ids]
        gaps[captured] = gap_summaries(flat[0], flat[1], flat[2], flat[3], eps, segments)
        return gaps

    def _frozen_changes(self, device: torch.device) -> Tensor:
        """1.0 for each watched frozen layer whose running statistics changed since it was seen frozen."""
        changed = torch.zeros(len(self._layers), device=device)
        for i, layer in enumerate(self._layers):
            snap, m = layer.frozen, layer.module
            if snap is None:
                continue
            if snap.released(m):
                layer.frozen = None  # unfrozen on purpose: stop watching (watched again if frozen again)
                continue
            assert isinstance(m.running_mean, Tensor) and isinstance(m.running_var, Tensor)
            moved = (m.running_mean != snap.running_mean).any() | (m.running_var != snap.running_var).any()
            changed[i] = moved.to(device=device, dtype=torch.float32)
        return changed

    def _across_ranks(
        self, trainer: Trainer, flags: Tensor, frozen: Tensor, device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One all-reduce: per-layer cross-rank spread of the buffers used, and flags raised on any rank."""
        with_stats = [i for i, x in enumerate(self._layers) if isinstance(x.module.running_mean, Tensor)]
        means = [_buffer_used(self._layers[i], "running_mean").to(device) for i in with_stats]
        varis = [_buffer_used(self._layers[i], "running_var").to(device) for i in with_stats]
        sizes = [t.numel() for t in means]
        n_buf = sum(sizes)
        # payload: [running_mean of every layer | running_var of every layer | flags | frozen]
        payload = torch.cat([*means, *varis, flags.flatten().float(), frozen.float()])
        mx, mn = all_ranks_max_min(payload, self._reduce_max(trainer))
        spread = (mx - mn).float()
        rank_diff = torch.full((len(self._layers), len(RANK_STATS)), math.nan, device=device)
        if sizes:
            segments = Segments(sizes, device)
            rank_diff[with_stats, 0] = segments.max(spread[:n_buf])
            rank_diff[with_stats, 1] = segments.max(spread[n_buf : 2 * n_buf])
        any_flags = mx[2 * n_buf : 2 * n_buf + flags.numel()].view_as(flags)
        return rank_diff, any_flags, mx[2 * n_buf + flags.numel() :]

    @staticmethod
    def _reduce_max(trainer: Trainer) -> Any:
        if is_distributed():
            return all_reduce_max
        return lambda t: trainer.strategy.reduce(t, reduce_op="max")

    # ------------------------------------------------------------------ on the host: warn, raise, log
    def _report(self, trainer: Trainer, values: StepValues) -> None:
        step = logging_step(trainer)  # where this batch's `self.log` metrics go
        self._warn_frozen_changes(values.frozen_changed, step)
        self._handle_anomalies(values.flags, step)
        if not trainer.is_global_zero:
            return
        metrics = self._metrics(values)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        for layer, name, hist in values.histograms:
            hist = hist[torch.isfinite(hist)]
            if hist.numel():
                for logger in self._histogram_loggers:
                    logger.experiment.add_histogram(f"{self._prefix}/{layer}/{name}", hist.numpy(), global_step=step)

    def _metrics(self, values: StepValues) -> dict[str, float]:
        """``<log_prefix>/<layer>/<statistic>`` for the selected statistics each layer has, and the
        ``<log_prefix>/summary/...`` values."""
        selected, prefix = set(self.stats), self._prefix
        metrics: dict[str, float] = {}
        worst: dict[str, float] = {}
        nonfinite, dead, channels = 0.0, 0.0, 0
        for i, layer in enumerate(self._layers):
            m = layer.module
            has_running, has_affine = isinstance(m.running_mean, Tensor), isinstance(m.weight, Tensor)
            row: dict[str, float] = dict(zip(BUFFER_STATS, values.summary[i], strict=True))
            if layer.capture.mean is not None:
                row.update(zip(GAP_STATS, values.gaps[i], strict=True))
            if layer.capture.samples:
                row["samples_per_channel"] = float(layer.capture.samples)
            if values.rank_diff is not None and has_running:
                row.update(zip(RANK_STATS, values.rank_diff[i], strict=True))
            for key in ("gap_mean_max", "gap_var_max", *RANK_STATS):
                if key in row:
                    worst[key] = _nanmax(worst.get(key, -math.inf), row[key])
            nonfinite += row["nonfinite_count"]
            if has_affine:
                dead += row["dead_frac"] * m.num_features
                channels += m.num_features
            for key, value in row.items():
                absent = (key.startswith(("running_", "gain_")) and not has_running) or (
                    key.startswith(("weight_", "bias_", "dead_")) and not has_affine
                )
                if key in selected and not absent:
                    metrics[f"{prefix}/{layer.name}/{key}"] = value
        metrics[f"{prefix}/summary/nonfinite_count"] = nonfinite
        if channels:
            metrics[f"{prefix}/summary/dead_frac"] = dead / channels
        metrics.update({f"{prefix}/summary/{key}": value for key, value in worst.items()})
        return metrics

    def _warn_frozen_changes(self, changed: list[float], step: int) -> None:
        where = " on at least one rank" if self._world_size > 1 else ""
        for layer, flag in zip(self._layers, changed, strict=True):
            if flag <= 0 or layer.frozen is None or not self._warned.first(layer.name, "frozen"):
                continue
            marks = layer.frozen.marks
            how = " and ".join(
                text
                for mark, text in (("eval", "in eval mode"), ("params", "with `requires_grad=False` affine parameters"))
                if mark in marks
            )
            if "eval" in marks:
                cause = (
                    "it ran in train mode in a training step since: something called `.train()` on it or on a "
                    "parent module. Keep it in eval mode, e.g. call `.eval()` on it in `on_train_epoch_start`, "
                    "after any code that calls `.train()`."
                )
            else:
                cause = (
                    "it is in train mode and tracks running statistics, so every training step updates them; "
                    "`requires_grad=False` freezes only gamma and beta. Call `.eval()` on it in "
                    "`on_train_epoch_start`, or freeze it with `BaseFinetuning.freeze(..., train_bn=False)`."
                )
            rank_zero_warn(
                f"{_OWNER}: BatchNorm layer {layer.name!r} was frozen ({how or 'tracking off'}) but its running "
                f"statistics changed by step {step}{where}: {cause}"
            )

    def _handle_anomalies(self, flag_rows: list[list[float]], step: int) -> None:
        if self.on_anomaly == "ignore":
            return
        where = " on at least one rank" if self._world_size > 1 else ""
        bounds = {
            "running_var_low": self.min_running_var,
            "running_var_high": self.max_running_var,
            "dead_frac_high": self.max_dead_fraction,
        }
        problems = []
        for layer, row in zip(self._layers, flag_rows, strict=True):
            for kind, flag in zip(ANOMALIES, row, strict=True):
                if flag > 0:
                    text = _ANOMALY_TEXT[kind].format(bound=bounds.get(kind))
                    problems.append((layer.name, kind, f"layer {layer.name!r}: {text} at step {step}{where}"))
        if problems and self.on_anomaly == "raise":
            raise BNAnomalyError(f"{_OWNER} found BatchNorm anomalies: " + "; ".join(p[2] for p in problems))
        for name, kind, message in problems:
            self._warned.warn(name, kind, f"{_OWNER}: {message} (warned once per layer and kind).")

    # ------------------------------------------------------------------ checkpointing
    @property
    @override
    def state_key(self) -> str:
        """The key of this monitor's state in a checkpoint: the class name and the arguments that tell monitors of
        one Trainer apart (which layers, how often, under which names), so several monitors are each saved and
        restored as their own.

        Examples:
            >>> BNStatsMonitor(include="backbone.*", log_prefix="bn_backbone").state_key
            "BNStatsMonitor{'include': 'backbone.*', 'exclude': None, 'log_every_n_steps': None, 'log_prefix': 'bn_backbone'}"
        """  # noqa: E501
        return self._generate_state_key(
            include=self.include,
            exclude=self.exclude,
            log_every_n_steps=self.log_every_n_steps,
            log_prefix=self.log_prefix,
        )

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Restore from a checkpoint written before monitors had their own `state_key` (saved under the class
        name), when the checkpoint has nothing under this monitor's key."""
        states = checkpoint.get("callbacks")
        if not isinstance(states, dict) or self.state_key in states or _LEGACY_STATE_KEY not in states:
            return
        rank_zero_info(
            f"{_OWNER}: restoring the state saved under the checkpoint's older key {_LEGACY_STATE_KEY!r} "
            f"(this monitor's key is {self.state_key!r})."
        )
        self.load_state_dict(copy.deepcopy(states[_LEGACY_STATE_KEY]))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "warned": self._warned.state(),
            "log_every_n_steps": self.log_every_n_steps,
            "batches_stepped": self._cadence.stepped,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what `state_dict` returned. A state that is not this monitor's (a value of the wrong type, a
        negative count) is not used: each such entry is named in a warning and replaced by a fresh one (no warnings
        given yet; the step count read from the Trainer)."""
        self._warned = WarnOnce()
        self._cadence.restore(self._cadence.stepped)  # no count to check the Trainer's against
        if not isinstance(state_dict, dict):
            _warn_bad_state(self.state_key, None, state_dict, "a dict as written by `state_dict()`", _NO_STATE)
            return
        warned = state_dict.get("warned", [])
        try:
            self._warned = WarnOnce.load(warned, owner=_OWNER)
        except ValueError:
            _warn_bad_state(self.state_key, "warned", warned, "[layer, kind] string pairs", _NO_WARNED)
        batches = state_dict.get("batches_stepped")
        if isinstance(batches, int) and is_int(batches) and batches >= 0:
            self._cadence.restore(batches, where=f"{_OWNER}: the checkpoint's state {self.state_key!r}")
        elif batches is not None:
            _warn_bad_state(self.state_key, "batches_stepped", batches, "an integer >= 0", _NO_COUNT)


_NO_STATE = "nothing of it is used: warnings may repeat, and the step count comes from the Trainer"
_NO_WARNED = "warnings already given may be given again"
_NO_COUNT = "the step count comes from the Trainer"


def _warn_bad_state(state_key: str, key: str | None, value: object, allowed: str, fallback: str) -> None:
    what = f"`{key}`" if key else "state"
    rank_zero_warn(
        f"{_OWNER}: the checkpoint's {what} of {state_key!r} must be {allowed}, got {value!r}; it is ignored: "
        f"{fallback}."
    )


def _hold_eager(holder: object) -> None:
    """Make compiled code run eagerly until `_release_eager` is called for every holder (monitors of one Trainer
    hold and release in any order; the stance before the first hold comes back after the last release)."""
    global _eager_stance
    if _SET_STANCE is None or id(holder) in _eager_holders:
        return
    if not _eager_holders:
        _eager_stance = _SET_STANCE("force_eager")
    _eager_holders.add(id(holder))


def _release_eager(holder: object) -> None:
    global _eager_stance
    if id(holder) not in _eager_holders:
        return
    _eager_holders.discard(id(holder))
    if not _eager_holders and _eager_stance is not None:
        stance, _eager_stance = _eager_stance, None
        stance.__exit__(None, None, None)


def _buffer_used(layer: _Layer, name: str) -> Tensor:
    """The buffer as the monitored step's forward saw it (captured by the hook), else its current value."""
    captured = getattr(layer.capture, name)
    if isinstance(captured, Tensor):
        return captured.detach().float().flatten()
    current = getattr(layer.module, name)
    assert isinstance(current, Tensor)
    return current.detach().float().flatten()


def _nanmax(a: float, b: float) -> float:
    """Maximum that propagates NaN, so a broken layer shows in the summary."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


__all__ = ["STATS", "BNAnomalyError", "BNStatsMonitor"]
