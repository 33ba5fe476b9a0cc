"""``WeightDynamicsMonitor``: how SGD moves the weights that BatchNorm makes scale-invariant, and the gradient flow."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_bnsgd._compat import Callback, LightningModule, Trainer, logging_step
from lightning_bnsgd._validation import check_bool, check_int, check_number, check_str
from lightning_bnsgd.bn._host import to_host
from lightning_bnsgd.bn.dynamics import (
    ScaleInvarianceReport,
    ScaleInvariantGroup,
    _norm_and_angle,
    effective_lr,
    find_scale_invariant,
    sgd_group_equilibrium,
    weight_layers,
)
from lightning_bnsgd.callbacks._cadence import LoggingCadence
from lightning_bnsgd.callbacks._log_prefix import resolve_prefixes
from lightning_bnsgd.callbacks._name_patterns import compile_name_patterns, select_layer_names
from lightning_bnsgd.callbacks._own_forwards import own_forwards
from lightning_bnsgd.callbacks._warn_once import WarnOnce

_OWNER = "WeightDynamicsMonitor"
#: Per scale-invariant layer: ``<log_prefix>/<layer name>/<statistic>`` (``dynamics/`` by default; ``angular_update_eq``
#: and ``_ratio``: SGD only).
INVARIANT_STATS: tuple[str, ...] = (
    "weight_norm",
    "effective_lr",
    "angular_update",
    "angular_update_eq",
    "angular_update_ratio",
)
#: Per layer with a weight (every conv/linear layer, in forward order): ``dynamics/<layer name>/grad_norm``.
LAYER_STATS: tuple[str, ...] = ("grad_norm",)
_HYPER = ("lr", "weight_decay", "momentum", "nesterov", "dampening", "betas")
#: The keys of `WeightDynamicsMonitor.state_dict`.
_STATE_KEYS = ("warned", "batches", "streaks", "first_inv_norm2")
#: The checkpoint key of the monitor's state before it had a `state_key` of its own (the class name).
_LEGACY_KEY = _OWNER


@dataclass
class _Group:
    """One scale-invariant group being tracked, and what was read at the monitored step's optimizer step."""

    name: str
    params: list[Tensor]
    before: Tensor | None = None
    hyper: dict[str, Any] | None = None


def _first_samples(inputs: Any, limit: int) -> Any:
    """Detached copies of the tensors in ``inputs``, cut to their first ``limit`` samples.

    Only tensors that share the batch dimension of the first tensor are cut; other tensors are copied whole.
    """
    sizes: list[int] = []
    apply_to_collection(inputs, Tensor, lambda t: sizes.append(t.shape[0] if t.dim() else -1))
    batch = sizes[0] if sizes else -1

    def cut(t: Tensor) -> Tensor:
        t = t.detach()
        return (t[:limit] if t.dim() and t.shape[0] == batch else t).clone()

    return apply_to_collection(inputs, Tensor, cut)


class _InputRecorder:
    """Forward hooks that keep the first inputs of some modules and the order in which layers are first called.

    A root's inputs are kept only from a call that runs the ``forward`` the root had when recording started, the
    one a replay calls. Lightning's forward redirection under ``ddp``, ``ddp_spawn``, FSDP and DeepSpeed calls the
    LightningModule with ``training_step``'s arguments ``(batch, batch_idx)`` while its ``forward`` is swapped for
    ``training_step`` (so the wrapper's gradient hooks see the step): those are not inputs ``forward`` takes.
    """

    def __init__(self, roots: dict[str, nn.Module], layers: Iterable[tuple[str, nn.Module]], limit: int) -> None:
        self.limit = limit
        self.inputs: dict[str, tuple[Any, Any]] = {}
        self.order: list[str] = []
        self.handles: list[RemovableHandle] = []
        self.forwards = {name: module.forward for name, module in roots.items()}
        for name, module in roots.items():
            self.handles.append(module.register_forward_pre_hook(self._root_hook(name), with_kwargs=True))
        for name, module in layers:
            self.handles.append(module.register_forward_pre_hook(self._layer_hook(name)))

    def _root_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if name not in self.inputs and module.forward == self.forwards[name]:
                self.inputs[name] = _first_samples((args, kwargs), self.limit)

        return hook

    def _layer_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if name not in self.order:
                self.order.append(name)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _replay(module: nn.Module, inputs: tuple[Any, Any]) -> Any:
    args, kwargs = inputs
    return module(*args, **kwargs)


class WeightDynamicsMonitor(Callback):
    """Log how SGD moves the weights that BatchNorm makes scale-invariant, and the gradient norm of every layer.

    At the first training batch it finds the scale-invariant weights numerically (`find_scale_invariant` on the
    inputs that batch fed to the model: a conv or linear weight, or weight and bias, whose scale the output does
    not depend on because a BatchNorm normalizes it) and records the order in which layers run. Then every
    ``log_every_n_steps`` training steps it reads, at that batch's optimizer step, per scale-invariant layer
    (``dynamics/<layer name>/...``; ``dynamics`` is `log_prefix`):

    * ``weight_norm``: ``||w||`` (weight and bias together when they are invariant together);
    * ``effective_lr``: ``lr / ||w||^2``, the LR that counts for a scale-invariant weight (van Laarhoven 2017;
      Hoffer et al. 2018);
    * ``angular_update``: the angle (radians) between the weight just before and just after that optimizer step;
    * ``angular_update_eq``: the angle per step expected at equilibrium for the param group's current lr, weight
      decay, momentum (and Nesterov), `equilibrium_angular_update` (Wan et al. 2021; Kosson et al. 2023);
      SGD param groups only (groups with ``momentum`` and no ``betas``);
    * ``angular_update_ratio``: measured / expected (1 at equilibrium; SGD with weight decay only);

    and per layer with a weight (every conv and linear layer), ``dynamics/<layer name>/grad_norm``: the norm of the
    weight's gradient before the optimizer step (before gradient clipping), the gradient-flow picture when read in
    forward order (`layer_names`). ``dynamics/summary/grad_norm_ratio`` is the first layer's over the last layer's:
    far below 1 is vanishing, far above 1 exploding gradients toward the input.

    It is cheap: nothing runs between monitored steps; at a monitored step the scale-invariant weights are copied
    once on their device and every number goes to the host in one transfer. Only rank zero computes and logs (the
    weights are the same on every rank), to every logger of the Trainer.

    Warnings (once per layer). The weight rotates more than ``max_angular_update`` radians per step for
    ``patience`` monitored steps in a row: its direction is reshuffled every few steps, so it learns nothing
    stable. When the predicted equilibrium is that high too, weight decay and the LR together are too strong (the
    norm has collapsed, the effective LR ``lr / ||w||^2`` exploded); when it is far lower, the norm is small for
    the LR (an LR too high for this layer, a short warmup, a small initialization). Without weight decay there is
    no equilibrium: the warning comes when ``||w||^2`` has grown more than ``max_norm_growth`` times since the
    first monitored step, so the effective LR has decayed by as much while the LR itself did not tell. An angular
    update far *below* equilibrium is not warned about: a decaying LR, a short run (equilibrium takes about
    ``(1 - momentum) / (2 lr wd)`` steps) or a fitted training set (vanishing gradients) all give it.

    Args:
        log_every_n_steps: monitor every this many training steps (default: the Trainer's ``log_every_n_steps``;
            0 there turns the monitor off): the batches whose ``self.log`` metrics Lightning logs, counted as the
            Trainer counts them (with gradient accumulation, the last micro-batch of every window), logged at the
            same step.
        include: layer-name patterns to monitor (default: all); a glob unless it starts with ``"re:"``.
        exclude: layer-name patterns to leave out, applied after ``include``.
        log_grad_flow: also log ``grad_norm`` for layers that are not scale-invariant (the head, layers without
            BatchNorm) and the summary ratio.
        rtol: output change (relative to a random perturbation's) below which a weight counts as
            scale-invariant (`find_scale_invariant`).
        probe_samples: the probe replays the first training batch cut to this many samples (>= 2; BatchNorm
            needs a few values per channel): a one-off cost of a few forwards of that size at the first step.
        max_angular_update: angle per step (radians, > 0) above which a layer counts as rotating by noise.
        max_norm_growth: without weight decay, warn when ``||w||^2`` grew more than this factor (> 1).
        patience: monitored steps in a row a layer must rotate above ``max_angular_update`` before the warning.
        warn_off_equilibrium: ``False`` disables the equilibrium warnings.
        log_prefix: the first part of every logged name (``<log_prefix>/<layer name>/<statistic>``,
            ``<log_prefix>/summary/grad_norm_ratio``). A second monitor of the Trainer asking for the same one logs
            under ``<log_prefix>_2`` (said at ``setup``: the two would otherwise write their summary under one name).

    Raises:
        ValueError: for invalid arguments (TypeError for a wrong type).

    Examples:
        >>> monitor = WeightDynamicsMonitor(log_every_n_steps=10, include="net.features.*")
        >>> monitor.log_every_n_steps, monitor.max_angular_update
        (10, 0.2)
        >>> WeightDynamicsMonitor(include="backbone.*", log_prefix="dynamics_backbone").state_key  # one of two
        "WeightDynamicsMonitor{'include': 'backbone.*', 'exclude': None, 'log_prefix': 'dynamics_backbone'}"
        >>> WeightDynamicsMonitor(max_norm_growth=0.5)
        Traceback (most recent call last):
        ...
        ValueError: WeightDynamicsMonitor: `max_norm_growth` must be a finite number > 1.0, got 0.5.
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        log_grad_flow: bool = True,
        rtol: float = 1e-2,
        probe_samples: int = 16,
        max_angular_update: float = 0.2,
        max_norm_growth: float = 10.0,
        patience: int = 5,
        warn_off_equilibrium: bool = True,
        log_prefix: str = "dynamics",
    ) -> None:
        self.log_every_n_steps = check_int(
            "log_every_n_steps", log_every_n_steps, minimum=1, allow_none=True, owner=_OWNER
        )
        self._include = compile_name_patterns(include, "include", owner=_OWNER)
        self._exclude = compile_name_patterns(exclude, "exclude", owner=_OWNER)
        self.include = include
        self.exclude = exclude
        self.log_grad_flow = check_bool("log_grad_flow", log_grad_flow, owner=_OWNER)
        self.rtol = check_number("rtol", rtol, 0.0, min_open=True, owner=_OWNER)
        self.max_angular_update = check_number(
            "max_angular_update", max_angular_update, 0.0, min_open=True, owner=_OWNER
        )
        self.max_norm_growth = check_number("max_norm_growth", max_norm_growth, 1.0, min_open=True, owner=_OWNER)
        self.patience = check_int("patience", patience, minimum=1, owner=_OWNER)
        self.probe_samples = check_int("probe_samples", probe_samples, minimum=2, owner=_OWNER)
        self.warn_off_equilibrium = check_bool("warn_off_equilibrium", warn_off_equilibrium, owner=_OWNER)
        self.log_prefix = check_str("log_prefix", log_prefix, owner=_OWNER)
        self._prefix = self.log_prefix  # what the names start with: `log_prefix`, unless another monitor has it

        self.report: ScaleInvarianceReport | None = None
        #: Layers in forward order (the gradient-flow depth axis), filled at the first training batch.
        self.layer_names: list[str] = []
        self._cadence = LoggingCadence(log_every_n_steps)
        self._groups: list[_Group] = []
        self._layers: list[tuple[str, Tensor]] = []
        self._grads: dict[str, Tensor] = {}
        self._recorder: _InputRecorder | None = None
        self._pending = False  # the current batch is monitored
        self._streaks: dict[str, int] = {}
        self._first_inv_norm2: dict[str, float] = {}
        self._warned = WarnOnce()

    # ------------------------------------------------------------------ set-up and detection
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._cadence.setup(trainer, stage, _OWNER)
        resolve_prefixes([cb for cb in trainer.callbacks if isinstance(cb, WeightDynamicsMonitor)], _OWNER, self)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.report, self.layer_names, self._groups, self._layers = None, [], [], []
        self._pending = False
        self._drop_recorder()
        if not trainer.loggers:
            rank_zero_warn(f"{_OWNER}: the Trainer has no logger, so no weight dynamics will be logged.")

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._pending = self._cadence.begin_batch(trainer, batch_idx)
        if not trainer.is_global_zero or self._cadence.interval == 0:
            self._pending = False
            return
        if self.report is None and self._recorder is None:
            layers = weight_layers(pl_module)
            roots = {"": pl_module, **{n: m for n, m in pl_module.named_children() if _owns_any(m, layers)}}
            self._recorder = _InputRecorder(roots, layers, self.probe_samples)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._drop_recorder()  # a run that never stepped the optimizer
        self._grads = {}
        for g in self._groups:
            g.before, g.hyper = None, None

    def _drop_recorder(self) -> None:
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None

    def _detect(self, pl_module: LightningModule) -> None:
        recorder = self._recorder
        assert recorder is not None
        recorder.remove()
        self._recorder = None
        layers = weight_layers(pl_module)
        keep = set(select_layer_names([n for n, _ in layers], self._include, self._exclude))
        report = ScaleInvarianceReport(rtol=self.rtol)
        roots = {"": pl_module} if "" in recorder.inputs else dict(pl_module.named_children())
        called = set(recorder.order)
        for root_name, root in roots.items():
            mine = [(n, m) for n, m in layers if n in keep and _inside(n, root_name)]
            report.rejected.update({n: "not called during the first training step" for n, _ in mine if n not in called})
            mine = [(n, m) for n, m in mine if n in called]
            if not mine:
                continue
            if root_name not in recorder.inputs:
                report.rejected.update({n: "its module was not called with inputs to replay" for n, _ in mine})
                continue
            prefix = f"{root_name}." if root_name else ""
            found = find_scale_invariant(
                root,
                recorder.inputs[root_name],
                _replay,
                layers=[(n[len(prefix) :], m) for n, m in mine],
                rtol=self.rtol,
                mode="as_is",
            )
            report.groups += [_renamed(g, prefix) for g in found.groups]
            report.rejected.update({prefix + n: why for n, why in found.rejected.items()})
        self.report = report
        self._finish_detection(pl_module, recorder.order, keep)

    def _finish_detection(self, pl_module: LightningModule, order: list[str], keep: set[str]) -> None:
        assert self.report is not None
        params = dict(pl_module.named_parameters())
        modules = dict(weight_layers(pl_module))
        self._groups = [_Group(g.name, [params[p] for p in g.params]) for g in self.report.groups]
        self.layer_names = [n for n in order if n in keep and n in modules]
        invariant = {g.name for g in self._groups}
        self._layers = [(n, _weight(modules[n])) for n in self.layer_names if self.log_grad_flow or n in invariant]
        rank_zero_info(_startup_line(self.report.names, list(self.report.rejected), self.log_grad_flow))
        if not self._groups:
            rank_zero_warn(
                f"{_OWNER}: found no scale-invariant weight (no conv/linear weight whose output a BatchNorm in "
                "train mode normalizes); only gradient norms will be logged."
            )

    # ------------------------------------------------------------------ the monitored step
    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        if self._recorder is not None:
            self._safe_detect(pl_module)  # the first step: the forward has run, the weights have not moved yet
        if not self._pending or self.report is None or not trainer.is_global_zero:
            return
        owner = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        with torch.no_grad():
            for g in self._groups:
                if g.before is None and id(g.params[0]) in owner:
                    g.before = torch.cat([p.detach().flatten() for p in g.params])  # a new tensor
                    group = owner[id(g.params[0])]
                    g.hyper = {k: group[k] for k in _HYPER if k in group}
            for name, weight in self._layers:
                if name not in self._grads and id(weight) in owner and weight.grad is not None:
                    self._grads[name] = torch.linalg.vector_norm(weight.grad.detach(), dtype=torch.float64)

    def _safe_detect(self, pl_module: LightningModule) -> None:
        try:
            with own_forwards():  # the probe's forwards stay out of other callbacks' hooks
                self._detect(pl_module)
        except Exception as err:  # never stop training because the probe failed
            self._drop_recorder()
            self.report = ScaleInvarianceReport(rtol=self.rtol)
            rank_zero_warn(f"{_OWNER}: could not probe scale invariance ({type(err).__name__}: {err}).")

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._cadence.end_batch()
        pending, self._pending = self._pending, False
        if pending:
            self._log(trainer)
        for g in self._groups:
            g.before, g.hyper = None, None
        self._grads = {}

    def _log(self, trainer: Trainer) -> None:
        tracked = [g for g in self._groups if g.before is not None]
        grads = [(n, self._grads[n]) for n, _ in self._layers if n in self._grads]
        if not tracked and not grads:
            return
        with torch.no_grad():
            norm_angles = []
            for g in tracked:
                after = g.params[0] if len(g.params) == 1 else torch.cat([p.detach().flatten() for p in g.params])
                assert g.before is not None
                norm_angles.append(_norm_and_angle(g.before, after))
            norm_angles, grad_norms = to_host((norm_angles, [t for _, t in grads]), torch.float64)  # one transfer
        metrics: dict[str, float] = {}
        for g, (norm, angle) in zip(tracked, norm_angles, strict=True):
            metrics.update(self._group_metrics(g, float(norm), float(angle)))
        grad_values = [float(t) for t in grad_norms]
        for (name, _), value in zip(grads, grad_values, strict=True):
            metrics[f"{self._prefix}/{name}/grad_norm"] = value
        if self.log_grad_flow and len(grad_values) > 1 and grad_values[-1] > 0:
            metrics[f"{self._prefix}/summary/grad_norm_ratio"] = grad_values[0] / grad_values[-1]
        step = logging_step(trainer)  # the step of the module's own self.log metrics for this batch
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _group_metrics(self, g: _Group, norm: float, angle: float) -> dict[str, float]:
        assert g.hyper is not None
        lr, prefix = float(g.hyper["lr"]), f"{self._prefix}/{g.name}"
        metrics = {
            f"{prefix}/weight_norm": norm,
            f"{prefix}/effective_lr": effective_lr(lr, norm),
            f"{prefix}/angular_update": angle,
        }
        predicted = sgd_group_equilibrium(g.hyper)
        if predicted is not None:
            metrics[f"{prefix}/angular_update_eq"] = predicted
        if predicted:
            metrics[f"{prefix}/angular_update_ratio"] = angle / predicted
        if self.warn_off_equilibrium and math.isfinite(angle) and norm > 0:
            self._check_equilibrium(g.name, angle, predicted, norm, lr, float(g.hyper.get("weight_decay") or 0.0))
        return metrics

    # ------------------------------------------------------------------ warnings
    def _check_equilibrium(
        self, name: str, angle: float, predicted: float | None, norm: float, lr: float, wd: float
    ) -> None:
        """Count and warn: no weight decay and a fast-growing norm; an angular update above the maximum."""
        if wd == 0.0 and lr > 0.0:
            first = self._first_inv_norm2.setdefault(name, norm**2)
            if norm**2 > self.max_norm_growth * first:
                self._warned.warn(
                    name,
                    "no_decay",
                    f"{_OWNER}: layer {name!r} is scale-invariant and has no weight decay: ||w||^2 grew "
                    f"{norm**2 / first:.1f}x since the first monitored step, so its effective LR lr/||w||^2 fell "
                    "as much and it has almost stopped learning. Give it weight decay (e.g. the conv/linear group "
                    "of SGDWarmup) or raise the LR. (warned once per layer).",
                )
        self._streaks[name] = self._streaks.get(name, 0) + 1 if angle > self.max_angular_update else 0
        if self._streaks[name] < self.patience:
            return
        if predicted is not None and predicted > 0.5 * self.max_angular_update:
            why = (
                f"the equilibrium for this LR and weight decay is {predicted:.3g} rad per step as well: lr x "
                "weight_decay is too high, the norm collapses and the effective LR lr/||w||^2 explodes. Lower the "
                "LR or the weight decay of this layer"
            )
        else:
            eq = f"{predicted:.3g} rad per step" if predicted is not None else "unknown for this optimizer"
            why = (
                f"its norm {norm:.3g} is small for this LR, so its effective LR lr/||w||^2 is huge while the "
                f"equilibrium is {eq} (e.g. an LR too high for this layer, a short warmup or a small "
                "initialization). Lower the LR or lengthen the warmup"
            )
        self._warned.warn(
            name,
            "off_equilibrium",
            f"{_OWNER}: layer {name!r} rotates {angle:.3g} rad per step "
            f"(> max_angular_update={self.max_angular_update:g}) for {self._streaks[name]} monitored steps in a row: "
            f"{why}. (warned once per layer).",
        )

    # ------------------------------------------------------------------ checkpointing
    @property
    @override
    def state_key(self) -> str:
        """The key of this monitor's state in a checkpoint: the class name, the layers it watches and its `log_prefix`.

        Two monitors of different layers (``include="backbone.*"``, ``include="head.*"``) or names in one Trainer are
        thus checkpointed and restored each as its own.
        """
        return self._generate_state_key(include=self.include, exclude=self.exclude, log_prefix=self.log_prefix)

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("callbacks") or {}
        if self.state_key not in states and _LEGACY_KEY in states:  # written before the monitor had a state_key
            rank_zero_info(f"{_OWNER}: restoring the state saved under the checkpoint's key {_LEGACY_KEY!r}.")
            self.load_state_dict(states[_LEGACY_KEY])

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "warned": self._warned.state(),
            "batches": self._cadence.stepped,
            "streaks": dict(self._streaks),
            "first_inv_norm2": dict(self._first_inv_norm2),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state of `state_dict`; keys it lacks (older checkpoints) get their defaults.

        Raises:
            TypeError, ValueError: a state that is not this monitor's (a wrong type, a negative counter, a norm that
                is not a finite positive number), naming the key and the value.
        """
        where = f"{_OWNER} (checkpoint state {self.state_key!r})"
        if not isinstance(state_dict, dict):
            raise TypeError(f"{where}: the state must be a dict, got {type(state_dict).__name__}.")
        unknown = sorted(set(map(str, state_dict)) - set(_STATE_KEYS))
        if unknown:
            rank_zero_warn(f"{where}: ignoring key(s) this monitor does not save: {', '.join(unknown)}.")
        try:
            warned = WarnOnce.load(state_dict.get("warned", []))
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{where}: `warned` must be a list of [layer name, kind] pairs, got {state_dict['warned']!r}."
            ) from err
        batches = check_int("batches", state_dict.get("batches", 0), minimum=0, owner=where)
        streaks = _name_map(state_dict.get("streaks", {}), "streaks", where)
        first = _name_map(state_dict.get("first_inv_norm2", {}), "first_inv_norm2", where)
        streaks = {name: check_int(f"streaks[{name!r}]", v, minimum=0, owner=where) for name, v in streaks.items()}
        first = {
            name: check_number(f"first_inv_norm2[{name!r}]", v, 0.0, min_open=True, owner=where)
            for name, v in first.items()
        }
        self._warned, self._streaks, self._first_inv_norm2 = warned, streaks, first
        self._cadence.restore(batches)


def _name_map(value: object, key: str, where: str) -> dict[str, Any]:
    """A checkpointed ``{layer name: value}`` dict, checked for its shape (the values are checked by the caller)."""
    if not isinstance(value, dict) or not all(isinstance(name, str) for name in value):
        raise TypeError(f"{where}: `{key}` must be a dict from layer names to numbers, got {value!r}.")
    return value


def _startup_line(invariant: list[str], others: list[str], grad_flow: bool) -> str:
    """The line the monitor prints once it knows which layers are scale-invariant.

    Examples:
        >>> for part in _startup_line(["features.0.conv", "features.1.conv"], ["head"], True).split(". "):
        ...     print(part)
        WeightDynamicsMonitor: scale-invariant (a BatchNorm normalizes their output): features.0.conv, features.1.conv: weight norm, effective LR and rotation logged
        Not scale-invariant (normal for a layer whose output no BatchNorm normalizes, such as the head): head: gradient norm logged.
    """  # noqa: E501
    line = f"{_OWNER}: scale-invariant (a BatchNorm normalizes their output): {', '.join(invariant) or 'none'}"
    if invariant:
        line += ": weight norm, effective LR and rotation logged"
    if others:
        logged = "gradient norm logged" if grad_flow else "not logged (log_grad_flow=False)"
        line += (
            ". Not scale-invariant (normal for a layer whose output no BatchNorm normalizes, such as the head): "
            f"{', '.join(others)}: {logged}"
        )
    return line + "."


def _weight(module: nn.Module) -> Tensor:
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight


def _owns_any(module: nn.Module, layers: list[tuple[str, nn.Module]]) -> bool:
    owned = {id(m) for m in module.modules()}
    return any(id(m) in owned for _, m in layers)


def _inside(name: str, root: str) -> bool:
    return not root or name == root or name.startswith(root + ".")


def _renamed(group: ScaleInvariantGroup, prefix: str) -> ScaleInvariantGroup:
    return replace(group, name=prefix + group.name, params=tuple(prefix + p for p in group.params))


__all__ = ["INVARIANT_STATS", "LAYER_STATS", "WeightDynamicsMonitor"]
