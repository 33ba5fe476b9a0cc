"""``BNStatsMonitor``: BatchNorm health logged to every Lightning logger, with anomaly alerts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn
from torch import Tensor
from torch.nn.modules.batchnorm import SyncBatchNorm, _BatchNorm
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_bnsgd._compat import Callback, LightningModule, Trainer, loggers
from lightning_bnsgd._validation import check_choice, check_int
from lightning_bnsgd.bn.inspect import (
    ANOMALIES,
    BUFFER_STATS,
    GAP_STATS,
    Segments,
    all_ranks_max_min,
    all_reduce_max,
    anomaly_flags,
    batch_moments,
    batchnorm_layers,
    compile_name_patterns,
    configuration_issues,
    gap_summaries,
    segment_max,
    select_layer_names,
    summarize_layers,
)

AnomalyAction = Literal["warn", "raise", "ignore"]
_ACTIONS = ("warn", "raise", "ignore")
#: Cross-rank statistics (logged on multi-device runs only).
RANK_STATS: tuple[str, ...] = ("rank_diff_running_mean_max", "rank_diff_running_var_max")
#: Every per-layer statistic ``BNStatsMonitor`` can log (``bn/<layer name>/<statistic>``).
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
    mean: Tensor | None = None
    var: Tensor | None = None
    running_mean: Tensor | None = None
    running_var: Tensor | None = None


@dataclass
class _Layer:
    name: str
    module: _BatchNorm
    capture: _Capture = field(default_factory=_Capture)


def _check_bound(name: str, value: object, allow_none: bool = True) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        allowed = "a finite number >= 0 or None" if allow_none else "a finite number >= 0"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")
    return float(value)


class BNStatsMonitor(Callback):
    """Log BatchNorm health every ``logging_interval`` optimizer steps to every logger of the Trainer.

    Per BatchNorm layer it logs ``bn/<layer name>/<statistic>`` for the statistics in `STATS`
    (running statistics, affine parameters, dead-channel fraction, effective gain, the gap between the current
    training batch's statistics and the running ones, samples per channel, and across DDP ranks the largest
    difference of the running statistics), plus a whole-model summary ``bn/summary/...``: the worst layer's
    gaps (``gap_mean_max``, ``gap_var_max``), the total dead-channel fraction (``dead_frac``), the total
    ``nonfinite_count`` and, on multi-device runs, the largest cross-rank differences.

    It is cheap enough to leave on: forward pre-hooks that read the batch statistics are attached only for the
    monitored step and removed right after; every number of that step is computed on the device and moved to
    the host in one transfer; other steps cost nothing. Only rank zero logs.

    Each monitored step is also checked for anomalies: NaN/Inf in a buffer or affine parameter,
    ``running_var`` outside ``[min_running_var, max_running_var]``, a dead-channel fraction above
    ``max_dead_fraction``. Misconfigurations get one warning each: at fit start ``track_running_stats=False``,
    ``momentum=None`` or ``0`` and plain BatchNorm on several devices; at the first monitored step too few
    samples per channel; at every monitored step BatchNorm layers meant to be frozen (in eval mode, or with
    frozen affine parameters, when training starts) whose running statistics have changed since.

    Args:
        logging_interval: monitor every this many optimizer steps (default: the Trainer's
            ``log_every_n_steps``).
        include: layer-name patterns to monitor (default: all BatchNorm layers). A pattern is a glob unless it
            starts with ``"re:"``; then it is a regular expression searched in the name. Names are those of
            ``LightningModule.named_modules()``, e.g. ``"net.features.0.norm"``.
        exclude: layer-name patterns to leave out (same syntax), applied after ``include``.
        stats: per-layer statistics to log, from `STATS` (default: all). The summary and the anomaly
            checks are unaffected.
        dead_threshold: a channel is dead when ``|gamma|`` is below this.
        min_running_var: anomaly when a layer's smallest ``running_var`` is below this (None: no check).
        max_running_var: anomaly when a layer's largest ``running_var`` is above this (None: no check).
        max_dead_fraction: anomaly when a layer's dead-channel fraction is above this (None: no check).
        on_anomaly: ``"warn"`` (once per layer and kind of anomaly), ``"raise"`` (`BNAnomalyError`) or
            ``"ignore"``.
        min_samples_per_channel: warn when a layer's batch statistics at the first monitored step come from
            fewer values per channel than this.
        log_histograms: also log histograms of ``running_mean``, ``running_var`` and ``weight`` per layer
            through loggers that support them (TensorBoard); other loggers are skipped with one warning.

    Raises:
        ValueError: for invalid arguments.

    Examples:
        >>> monitor = BNStatsMonitor(logging_interval=10, include="net.features.*", stats=["gap_var_max"])
        >>> monitor.logging_interval, monitor.stats
        (10, ('gap_var_max',))
        >>> BNStatsMonitor(on_anomaly="explode")
        Traceback (most recent call last):
        ...
        ValueError: `on_anomaly` must be one of ('warn', 'raise', 'ignore'), got 'explode'.
    """

    def __init__(
        self,
        logging_interval: int | None = None,
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
    ) -> None:
        check_int("logging_interval", logging_interval, allow_none=True)
        self._include = compile_name_patterns(include, "include")
        self._exclude = compile_name_patterns(exclude, "exclude")
        if stats is not None:
            if isinstance(stats, str) or not isinstance(stats, Sequence):
                raise ValueError(f"`stats` must be a list of statistic names or None, got {stats!r}.")
            unknown = [s for s in stats if s not in STATS]
            if unknown:
                raise ValueError(f"`stats` has unknown statistics {unknown}; allowed: {list(STATS)}.")
        check_choice("on_anomaly", on_anomaly, _ACTIONS)
        if (
            isinstance(min_samples_per_channel, bool)
            or not isinstance(min_samples_per_channel, int)
            or min_samples_per_channel < 0
        ):
            raise ValueError(f"`min_samples_per_channel` must be an integer >= 0, got {min_samples_per_channel!r}.")
        if not isinstance(log_histograms, bool):
            raise TypeError(f"`log_histograms` must be a bool, got {log_histograms!r}.")
        self.dead_threshold = _check_bound("dead_threshold", dead_threshold, allow_none=False)
        self.min_running_var = _check_bound("min_running_var", min_running_var)
        self.max_running_var = _check_bound("max_running_var", max_running_var)
        self.max_dead_fraction = _check_bound("max_dead_fraction", max_dead_fraction)
        if (
            self.min_running_var is not None
            and self.max_running_var is not None
            and self.min_running_var >= self.max_running_var
        ):
            raise ValueError(
                f"`min_running_var` ({min_running_var!r}) must be below `max_running_var` ({max_running_var!r})."
            )
        self.logging_interval = logging_interval
        self.include = include
        self.exclude = exclude
        self.stats: tuple[str, ...] = tuple(stats) if stats is not None else STATS
        self.on_anomaly: AnomalyAction = on_anomaly
        self.min_samples_per_channel = min_samples_per_channel
        self.log_histograms = log_histograms

        self._interval = logging_interval or 1
        self._layers: list[_Layer] = []
        self._handles: list[RemovableHandle] = []
        self._monitoring = False
        self._first_batch = True
        self._samples_checked = False
        self._frozen: dict[str, tuple[Tensor, Tensor]] = {}
        self._warned: set[tuple[str, str]] = set()
        self._histogram_loggers: list[Any] = []
        self._world_size = 1
        self._is_zero = True
        self._segments: Segments | None = None

    # ------------------------------------------------------------------ fit-start checks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._interval = self.logging_interval or max(int(trainer.log_every_n_steps), 1)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._world_size = int(trainer.world_size)
        self._first_batch = True
        self._samples_checked = False
        self._frozen = {}
        found = batchnorm_layers(pl_module)
        keep = set(select_layer_names([name for name, _ in found], self._include, self._exclude))
        selected = [(name, m) for name, m in found if name in keep]
        self._layers = [_Layer(name, m) for name, m in selected]
        self._segments = None
        if not self._layers:
            what = "has no BatchNorm layer" if not found else "has no BatchNorm layer matching `include`/`exclude`"
            rank_zero_warn(f"BNStatsMonitor: the model {what}; nothing will be monitored.")
            return
        if not trainer.loggers:
            rank_zero_warn(
                "BNStatsMonitor: the Trainer has no logger, so no BatchNorm statistics will be logged "
                "(anomaly checks still run)."
            )
        issues = configuration_issues(selected)
        if issues["no_running_stats"]:
            rank_zero_warn(
                "BNStatsMonitor: BatchNorm layers with `track_running_stats=False` normalize with batch "
                "statistics in evaluation too, so predictions depend on the batch: "
                f"{issues['no_running_stats']}."
            )
        if issues["momentum_none"]:
            rank_zero_warn(
                "BNStatsMonitor: BatchNorm layers with `momentum=None` keep a cumulative average over all "
                "batches, dominated by early weights; use a momentum such as 0.1 or recalibrate: "
                f"{issues['momentum_none']}."
            )
        if issues["momentum_zero"]:
            rank_zero_warn(
                "BNStatsMonitor: BatchNorm layers with `momentum=0` never update their running statistics "
                f"(to freeze BatchNorm, keep the layer in eval mode instead): {issues['momentum_zero']}."
            )
        plain = [name for name, m in selected if not isinstance(m, SyncBatchNorm)]
        if self._world_size > 1 and plain:
            rank_zero_warn(
                f"BNStatsMonitor: {len(plain)} plain BatchNorm layer(s) run on {self._world_size} devices: "
                "each device normalizes with its own batch statistics. When per-device batches are small, use "
                f"`Trainer(sync_batchnorm=True)` (SyncBatchNorm). Layers: {plain}."
            )
        self._histogram_loggers = []
        if self.log_histograms:
            skipped = []
            for logger in trainer.loggers:
                if isinstance(logger, loggers.TensorBoardLogger):
                    self._histogram_loggers.append(logger)
                else:
                    skipped.append(type(logger).__name__)
            if skipped:
                rank_zero_warn(
                    f"BNStatsMonitor: `log_histograms=True` but {skipped} cannot log histograms; only "
                    "TensorBoardLogger gets them."
                )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remember_frozen(eval_only=False)

    def _remember_frozen(self, eval_only: bool) -> None:
        """Snapshot the buffers of layers meant to be frozen (eval mode, or affine parameters not trained)."""
        for layer in self._layers:
            m = layer.module
            if layer.name in self._frozen or not isinstance(m.running_mean, Tensor):
                continue
            params = [p for p in (m.weight, m.bias) if isinstance(p, Tensor)]
            frozen_params = bool(params) and not any(p.requires_grad for p in params)
            if not m.training or (frozen_params and not eval_only):
                assert isinstance(m.running_var, Tensor)
                self._frozen[layer.name] = (m.running_mean.detach().clone(), m.running_var.detach().clone())

    # ------------------------------------------------------------------ hooks
    def _is_monitored_batch(self, trainer: Trainer, batch_idx: int) -> bool:
        accumulate = max(int(trainer.accumulate_grad_batches), 1)
        total = trainer.num_training_batches
        steps = (batch_idx + 1) % accumulate == 0 or (
            isinstance(total, int) and not math.isinf(total) and batch_idx + 1 >= total
        )
        return bool(steps) and (trainer.global_step + 1) % self._interval == 0

    def _make_hook(self, layer: _Layer, keep_running: bool) -> Any:
        def hook(module: _BatchNorm, args: tuple[Any, ...]) -> None:
            if not args or not isinstance(args[0], Tensor) or args[0].dim() < 2:
                return
            x = args[0]
            cap = layer.capture
            cap.samples = x.numel() // x.shape[1] if x.shape[1] else 0
            rm, rv = module.running_mean, module.running_var
            if not isinstance(rm, Tensor) or not isinstance(rv, Tensor):
                return
            if not (self._is_zero or keep_running):
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

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._remove_hooks()
        self._monitoring = False
        if not self._layers:
            return
        if self._first_batch:  # after every on_*_start hook: layers the user put in eval mode count as frozen
            self._first_batch = False
            self._remember_frozen(eval_only=True)
        self._is_zero = bool(trainer.is_global_zero)
        self._monitoring = self._is_monitored_batch(trainer, batch_idx)
        if self._monitoring:
            self._attach()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._remove_hooks()
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
        self._frozen = {}

    def _check_samples(self) -> None:
        few = [
            f"{layer.name} ({layer.capture.samples})"
            for layer in self._layers
            if 0 < layer.capture.samples < self.min_samples_per_channel
        ]
        if few:
            rank_zero_warn(
                "BNStatsMonitor: BatchNorm layers compute batch statistics from fewer than "
                f"min_samples_per_channel={self.min_samples_per_channel} values per channel in a training "
                "batch, so their normalization and running statistics are noisy (larger batches, "
                f"SyncBatchNorm or GroupNorm help): {few}."
            )

    # ------------------------------------------------------------------ the monitored step
    def _monitor_step(self, trainer: Trainer) -> None:
        layers = self._layers
        device = next(
            (t.device for t in (layers[0].module.running_mean, layers[0].module.weight) if isinstance(t, Tensor)),
            torch.device("cpu"),
        )
        n_layers = len(layers)
        threshold = float(self.dead_threshold or 0.0)
        if self._segments is None or self._segments.ids.device != device:
            self._segments = Segments([x.module.num_features for x in layers], device)
        summary, nonfinite = summarize_layers([x.module for x in layers], threshold, device, self._segments)
        gaps = torch.full((n_layers, len(GAP_STATS)), math.nan, device=device)
        captured = [i for i, x in enumerate(layers) if x.capture.mean is not None]
        if captured:
            caps = [layers[i].capture for i in captured]
            flat = [
                torch.cat([getattr(c, name).to(device) for c in caps])  # type: ignore[union-attr]
                for name in ("mean", "var", "running_mean", "running_var")
            ]
            everything = len(captured) == n_layers
            segments = (
                self._segments if everything else Segments([layers[i].module.num_features for i in captured], device)
            )
            eps = torch.tensor([float(layers[i].module.eps) for i in captured], device=device)[segments.ids]
            gaps[captured] = gap_summaries(flat[0], flat[1], flat[2], flat[3], eps, segments)
        flags = anomaly_flags(summary, nonfinite, self.min_running_var, self.max_running_var, self.max_dead_fraction)
        frozen_changed = torch.zeros(n_layers, device=device)
        for i, x in enumerate(layers):
            snap = self._frozen.get(x.name)
            if snap is not None:
                rm, rv = x.module.running_mean, x.module.running_var
                assert isinstance(rm, Tensor) and isinstance(rv, Tensor)
                changed = (rm.detach() != snap[0]).any() | (rv.detach() != snap[1]).any()
                frozen_changed[i] = changed.to(device=device, dtype=torch.float32)
        parts = [summary.flatten(), gaps.flatten()]
        rank_diff: Tensor | None = None
        if self._world_size > 1:
            with_stats = [x for x in layers if isinstance(x.module.running_mean, Tensor)]
            means = [_buffer_used(x, "running_mean").to(device) for x in with_stats]
            varis = [_buffer_used(x, "running_var").to(device) for x in with_stats]
            sizes = [t.numel() for t in means]
            payload = torch.cat([*means, *varis, flags.flatten(), frozen_changed])
            mx, mn = all_ranks_max_min(payload, self._reduce_max(trainer))
            spread = (mx - mn).float()
            n_buf = sum(sizes)
            rank_diff = torch.full((n_layers, 2), math.nan, device=device)
            if sizes:
                index = [i for i, x in enumerate(layers) if isinstance(x.module.running_mean, Tensor)]
                rank_diff[index, 0] = segment_max(spread[:n_buf], sizes)
                rank_diff[index, 1] = segment_max(spread[n_buf : 2 * n_buf], sizes)
            flags = mx[2 * n_buf : 2 * n_buf + flags.numel()].view_as(flags)
            frozen_changed = mx[2 * n_buf + flags.numel() :]
            parts.append(rank_diff.flatten())
        parts += [flags.flatten().float(), frozen_changed.float()]
        hist_sizes: list[tuple[str, str, int]] = []
        if self._histogram_loggers and self._is_zero:
            for x in layers:
                for name in _HISTOGRAM_TENSORS:
                    t = getattr(x.module, name, None)
                    if isinstance(t, Tensor):
                        parts.append(t.detach().float().flatten().to(device))
                        hist_sizes.append((x.name, name, t.numel()))
        # The one device-to-host transfer of this step.
        host = torch.cat([p.to(dtype=torch.float32) for p in parts]).cpu()
        self._report(trainer, host, rank_diff is not None, hist_sizes)

    @staticmethod
    def _reduce_max(trainer: Trainer) -> Any:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return all_reduce_max
        return lambda t: trainer.strategy.reduce(t, reduce_op="max")

    def _report(self, trainer: Trainer, host: Tensor, has_rank: bool, hist_sizes: list[tuple[str, str, int]]) -> None:
        n = len(self._layers)
        chunks = [n * len(BUFFER_STATS), n * len(GAP_STATS), n * 2 if has_rank else 0, n * len(ANOMALIES), n]
        chunks.append(host.numel() - sum(chunks))
        summary, gaps, ranks, flags, frozen, hist = host.split(chunks)
        summary_rows = summary.view(n, -1).tolist()
        gap_rows = gaps.view(n, -1).tolist()
        rank_rows = ranks.view(n, 2).tolist() if has_rank else None
        flag_rows = flags.view(n, -1).tolist()
        step = int(trainer.global_step)
        self._handle_anomalies(flag_rows, frozen.tolist(), step)
        if not trainer.is_global_zero:
            return
        selected = set(self.stats)
        metrics: dict[str, float] = {}
        worst_gap_mean, worst_gap_var, nonfinite_total = -math.inf, -math.inf, 0.0
        dead_channels, affine_channels = 0.0, 0
        worst_rank = [-math.inf, -math.inf]
        for i, layer in enumerate(self._layers):
            values: dict[str, float] = dict(zip(BUFFER_STATS, summary_rows[i], strict=True))
            if layer.capture.mean is not None:
                values.update(zip(GAP_STATS, gap_rows[i], strict=True))
                worst_gap_mean = _nanmax(worst_gap_mean, values["gap_mean_max"])
                worst_gap_var = _nanmax(worst_gap_var, values["gap_var_max"])
            if layer.capture.samples:
                values["samples_per_channel"] = float(layer.capture.samples)
            if rank_rows is not None and isinstance(layer.module.running_mean, Tensor):
                values.update(zip(RANK_STATS, rank_rows[i], strict=True))
                worst_rank = [_nanmax(w, v) for w, v in zip(worst_rank, rank_rows[i], strict=False)]
            nonfinite_total += values["nonfinite_count"]
            if isinstance(layer.module.weight, Tensor):
                dead_channels += values["dead_frac"] * layer.module.num_features
                affine_channels += layer.module.num_features
            has_running = isinstance(layer.module.running_mean, Tensor)
            has_affine = isinstance(layer.module.weight, Tensor)
            for key, value in values.items():
                if key not in selected:
                    continue
                if (key.startswith(("running_", "gain_")) and not has_running) or (
                    key.startswith(("weight_", "bias_", "dead_")) and not has_affine
                ):
                    continue
                metrics[f"bn/{layer.name}/{key}"] = value
        metrics["bn/summary/nonfinite_count"] = nonfinite_total
        if affine_channels:
            metrics["bn/summary/dead_frac"] = dead_channels / affine_channels
        if worst_gap_mean > -math.inf:
            metrics["bn/summary/gap_mean_max"] = worst_gap_mean
        if worst_gap_var > -math.inf:
            metrics["bn/summary/gap_var_max"] = worst_gap_var
        if rank_rows is not None:
            for key, value in zip(RANK_STATS, worst_rank, strict=False):
                if value > -math.inf:
                    metrics[f"bn/summary/{key}"] = value
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if hist_sizes:
            self._log_histograms(hist, hist_sizes, step)

    def _log_histograms(self, hist: Tensor, sizes: list[tuple[str, str, int]], step: int) -> None:
        for (layer, name, _), values in zip(sizes, hist.split([s for _, _, s in sizes]), strict=False):
            values = values[torch.isfinite(values)]
            if not values.numel():
                continue
            for logger in self._histogram_loggers:
                logger.experiment.add_histogram(f"bn/{layer}/{name}", values.numpy(), global_step=step)

    def _handle_anomalies(self, flag_rows: list[list[float]], frozen: list[float], step: int) -> None:
        where = " on at least one rank" if self._world_size > 1 else ""
        for layer, changed in zip(self._layers, frozen, strict=False):
            if changed > 0 and (layer.name, "frozen") not in self._warned:
                self._warned.add((layer.name, "frozen"))
                rank_zero_warn(
                    f"BNStatsMonitor: BatchNorm layer {layer.name!r} was meant to be frozen (eval mode or "
                    "frozen affine parameters when training started) but its running statistics changed by "
                    f"step {step}{where}: it runs in train mode during training steps. Keep it in eval mode "
                    "during training (e.g. call `.eval()` on it in `on_train_epoch_start`, after any code "
                    "that calls `.train()` on the model)."
                )
        if self.on_anomaly == "ignore":
            return
        bounds = {
            "running_var_low": self.min_running_var,
            "running_var_high": self.max_running_var,
            "dead_frac_high": self.max_dead_fraction,
        }
        problems = []
        for layer, row in zip(self._layers, flag_rows, strict=False):
            for kind, flag in zip(ANOMALIES, row, strict=False):
                if flag > 0:
                    text = _ANOMALY_TEXT[kind].format(bound=bounds.get(kind))
                    problems.append((layer.name, kind, f"layer {layer.name!r}: {text} at step {step}{where}"))
        if not problems:
            return
        if self.on_anomaly == "raise":
            raise BNAnomalyError("BNStatsMonitor found BatchNorm anomalies: " + "; ".join(p[2] for p in problems))
        for name, kind, message in problems:
            if (name, kind) not in self._warned:
                self._warned.add((name, kind))
                rank_zero_warn(f"BNStatsMonitor: {message} (warned once per layer and kind).")

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"warned": sorted([list(w) for w in self._warned]), "logging_interval": self.logging_interval}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._warned = {(str(a), str(b)) for a, b in state_dict.get("warned", [])}


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
