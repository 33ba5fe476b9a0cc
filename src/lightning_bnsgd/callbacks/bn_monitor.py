"""``BNStatsMonitor``: BatchNorm health logged to every Lightning logger, with anomaly alerts."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_bnsgd._compat import Callback, logging_step
from lightning_bnsgd._validation import check_bool, check_choice, check_int, check_number, check_str, is_int
from lightning_bnsgd.bn._host import to_host
from lightning_bnsgd.bn.distributed import all_ranks_max_min, all_reduce_max, is_distributed
from lightning_bnsgd.bn.inspect import (
    BUFFER_STATS,
    GAP_STATS,
    Segments,
    anomaly_flags,
    batch_moments,
    batchnorm_layers,
    summarize_layers,
)
from lightning_bnsgd.callbacks._bn_checks import (
    anomaly_problems,
    histogram_loggers,
    warn_configuration,
    warn_few_samples,
)
from lightning_bnsgd.callbacks._bn_layers import (
    SET_STANCE,
    Layer,
    attach_hooks,
    frozen_changes,
    remove_hooks,
    warn_frozen_changes,
    watch_frozen,
)
from lightning_bnsgd.callbacks._bn_step import across_ranks, batch_gaps, step_metrics
from lightning_bnsgd.callbacks._cadence import LoggingCadence
from lightning_bnsgd.callbacks._log_prefix import resolve_prefixes
from lightning_bnsgd.callbacks._monitor_layout import RANK_STATS, StepValues
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
_LEGACY_STATE_KEY = _OWNER  # the checkpoint key of every monitor before `state_key` named its arguments
_ACTIONS: tuple[str, ...] = get_args(AnomalyAction)
#: Every per-layer statistic ``BNStatsMonitor`` can log (``<log_prefix>/<layer name>/<statistic>``, ``bn/`` by default).
STATS: tuple[str, ...] = (*BUFFER_STATS, *GAP_STATS, "samples_per_channel", *RANK_STATS)
_HISTOGRAM_TENSORS = ("running_mean", "running_var", "weight")


class BNAnomalyError(RuntimeError):
    """Raised by ``BNStatsMonitor(on_anomaly="raise")`` when a BatchNorm layer is unhealthy.

    Examples:
        >>> str(BNAnomalyError("layer 'net.0': NaN/Inf in running_var at step 50"))
        "layer 'net.0': NaN/Inf in running_var at step 50"
    """


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
            "log_every_n_steps", log_every_n_steps, minimum=1, allow_none=True, owner=_OWNER
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
            "min_samples_per_channel", min_samples_per_channel, minimum=0, owner=_OWNER
        )
        self.log_histograms: bool = check_bool("log_histograms", log_histograms, owner=_OWNER)
        self.log_prefix: str = check_str("log_prefix", log_prefix, owner=_OWNER)
        self._prefix = self.log_prefix  # what the names start with: `log_prefix`, unless another monitor has it

        self._cadence = LoggingCadence(self.log_every_n_steps)
        self._layers: list[Layer] = []
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
        if SET_STANCE is None and any(COMPILED_WRAPPER_NAME in name.split(".") for name, _ in named):
            rank_zero_warn(
                f"{_OWNER}: the model has `torch.compile`d modules, and this torch (< 2.6) cannot run them eagerly "
                "for a monitored step (`torch.compiler.set_stance`): compiled code skips the monitor's hooks, so "
                "the batch statistics of those layers (gaps, samples per channel) may be missing."
            )
        found = [(user_module_name(name), m) for name, m in named]  # the user's names, also under torch.compile
        keep = set(select_layer_names([name for name, _ in found], self._include, self._exclude))
        self._layers = [Layer(name, m) for name, m in found if name in keep]
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
        self._histogram_loggers = histogram_loggers(trainer) if self.log_histograms else []

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        watch_frozen(self._layers)

    # ------------------------------------------------------------------ hooks
    def _make_hook(self, layer: Layer, keep_running: bool) -> Any:
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

    def _remove_hooks(self) -> None:
        remove_hooks(self, self._handles)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._remove_hooks()
        logged = self._cadence.begin_batch(trainer, batch_idx)
        self._monitoring = False
        if not self._layers:
            return
        if self._first_batch:  # after every on_*_start hook: the layers are as the user and the callbacks set them
            self._first_batch = False
            watch_frozen(self._layers)
            warn_configuration([(x.name, x.module) for x in self._layers], self._world_size)
        self._is_zero = bool(trainer.is_global_zero)
        self._monitoring = logged
        if self._monitoring:
            watch_frozen(self._layers)  # layers frozen since the last monitored step
            keep_running = self._world_size > 1
            self._handles = attach_hooks(self, self._layers, lambda layer: self._make_hook(layer, keep_running))

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
                warn_few_samples(self._layers, self.min_samples_per_channel)
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
        frozen = frozen_changes(layers, device)
        rank_diff = None
        if self._world_size > 1:
            reduce_max = _reduce_max(trainer)
            rank_diff, flags, frozen = across_ranks(
                layers, flags, frozen, device, lambda t: all_ranks_max_min(t, reduce_max)
            )
        histograms: list[Tensor] = []
        names: list[tuple[str, str]] = []
        if self._histogram_loggers and self._is_zero:
            for x in layers:
                for name in _HISTOGRAM_TENSORS:
                    t = getattr(x.module, name, None)
                    if isinstance(t, Tensor):
                        histograms.append(t.detach())
                        names.append((x.name, name))
        gaps = batch_gaps(layers, self._segments, device)
        # the one device-to-host transfer of this step
        summary, gaps, rank_diff, flags, frozen, histograms = to_host(
            (summary, gaps, rank_diff, flags, frozen, histograms)
        )
        named = [(layer, name, h) for (layer, name), h in zip(names, histograms, strict=True)]
        self._report(trainer, StepValues.from_host(summary, gaps, rank_diff, flags, frozen, named))

    # ------------------------------------------------------------------ on the host: warn, raise, log
    def _report(self, trainer: Trainer, values: StepValues) -> None:
        step = logging_step(trainer)  # where this batch's `self.log` metrics go
        where = " on at least one rank" if self._world_size > 1 else ""
        warn_frozen_changes(self._layers, values.frozen_changed, step, where, self._warned, _OWNER)
        if self.on_anomaly != "ignore":
            bounds = {
                "running_var_low": self.min_running_var,
                "running_var_high": self.max_running_var,
                "dead_frac_high": self.max_dead_fraction,
            }
            problems = anomaly_problems(self._layers, values.flags, step, where, bounds)
            if problems and self.on_anomaly == "raise":
                raise BNAnomalyError(f"{_OWNER} found BatchNorm anomalies: " + "; ".join(p[2] for p in problems))
            for name, kind, message in problems:
                self._warned.warn(name, kind, f"{_OWNER}: {message} (warned once per layer and kind).")
        if not trainer.is_global_zero:
            return
        metrics = step_metrics(self._layers, values, self.stats, self._prefix)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        for layer, name, hist in values.histograms:
            hist = hist[torch.isfinite(hist)]
            if hist.numel():
                for logger in self._histogram_loggers:
                    logger.experiment.add_histogram(f"{self._prefix}/{layer}/{name}", hist.numpy(), global_step=step)

    # ------------------------------------------------------------------ checkpointing
    @property
    @override
    def state_key(self) -> str:
        """The key of this monitor's state in a checkpoint.

        The class name and the arguments that tell monitors of one Trainer apart (which layers, how often, under which
        names), so several monitors are each saved and restored as their own.

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
        """Restore from a checkpoint written before monitors had their own `state_key` (saved under the class name).

        It does so only when the checkpoint has nothing under this monitor's key.
        """
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
        """Restore what `state_dict` returned.

        A state that is not this monitor's (a value of the wrong type, a negative count) is not used: each such entry is
        named in a warning and replaced by a fresh one (no warnings given yet; the step count read from the Trainer).
        """
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
        if is_int(batches) and batches >= 0:
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


def _reduce_max(trainer: Trainer) -> Any:
    if is_distributed():
        return all_reduce_max
    return lambda t: trainer.strategy.reduce(t, reduce_op="max")


__all__ = ["STATS", "BNAnomalyError", "BNStatsMonitor"]
