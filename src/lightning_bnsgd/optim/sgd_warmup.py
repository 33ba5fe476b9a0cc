"""``SGDWarmup``: SGD with the large-batch recipe of Goyal et al. (2017) as one config.

An absolute ``lr``, or ``lr_base`` scaled with the effective batch (linear or square-root rule), per-step gradual
warmup, a decay to ``min_lr``, and no weight decay on normalization parameters and biases.
``SGDWarmup(...).build(module)`` returns what Lightning's ``configure_optimizers`` returns; the pieces are public
pure functions for users who assemble their own optimizer.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

import torch
from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_bnsgd._validation import check_bool, check_choice, check_int, check_number, check_str, is_int
from lightning_bnsgd.optim import _trainer
from lightning_bnsgd.optim._trainer import per_device_batch_size
from lightning_bnsgd.optim.groups import LAZY_WEIGHT_LAYERS, NORM_LAYERS, _scheduler_name, param_groups
from lightning_bnsgd.optim.plan import SCHEDULE_FIELDS, Schedule
from lightning_bnsgd.optim.schedule import RESUME_SCHEDULES, ResumeSchedule, WarmupLR
from lightning_bnsgd.optim.shapes import DECAY_USES, DecayShape, WarmupShape

ScaleRule = Literal["linear", "sqrt"]
SCALE_RULES: tuple[str, ...] = get_args(ScaleRule)

#: Warmup length used when neither ``warmup_epochs`` nor ``warmup_steps`` is set.
DEFAULT_WARMUP_EPOCHS = 1.0


def effective_batch_size(per_device: int, world_size: int = 1, accumulate_grad_batches: int = 1) -> int:
    """Samples per optimizer step: per-device batch x processes (devices x nodes) x gradient accumulation.

    Examples:
        >>> effective_batch_size(64, world_size=2, accumulate_grad_batches=4)
        512
    """
    check_int("per_device", per_device, minimum=1, owner="effective_batch_size")
    check_int("world_size", world_size, minimum=1, owner="effective_batch_size")
    check_int("accumulate_grad_batches", accumulate_grad_batches, minimum=1, owner="effective_batch_size")
    return per_device * world_size * accumulate_grad_batches


def lr_scale(effective_batch: int, lr_base_size: int = 256, rule: str = "linear") -> float:
    """The LR multiplier of a scaling rule: ``effective / lr_base_size`` (linear) or its square root.

    Examples:
        >>> lr_scale(1024), lr_scale(1024, rule="sqrt")
        (4.0, 2.0)
    """
    check_choice("lr_base_scale", rule, SCALE_RULES, owner="lr_scale")
    ratio = effective_batch / lr_base_size
    return ratio if rule == "linear" else math.sqrt(ratio)


@dataclass(frozen=True)
class ResolvedSchedule:
    """An ``SGDWarmup`` made concrete for one run: the peak LR and every length in steps.

    Examples:
        >>> cfg = SGDWarmup(lr_base=0.1, warmup_epochs=2)
        >>> r = cfg.resolve(total_steps=100, steps_per_epoch=10, batch_size=512)
        >>> r.lr, r.warmup_steps, r.total_steps
        (0.2, 20, 100)
    """

    lr: float
    min_lr: float
    effective_batch_size: int | None
    warmup_steps: int
    total_steps: int
    step_size: float
    milestones: list[int]
    steps_per_epoch: int | None = None

    def scheduler_kwargs(self, config: SGDWarmup) -> dict[str, Any]:
        """Keyword arguments of ``WarmupLR`` for this run.

        ``config``'s schedule settings, with this run's lengths, ``min_lr``, step size and milestones (in steps) in
        place of ``config``'s.
        """
        ours = {field.name for field in fields(self)}
        settings = {name: getattr(self if name in ours else config, name) for name in SCHEDULE_FIELDS}
        return {**settings, "resume_schedule": config.resume_schedule}


@dataclass
class SGDWarmup:
    """SGD with per-step warmup and decay, LR scaling with the batch, and no weight decay on norms and biases.

    A plain dataclass: LightningCLI writes it as a nested YAML block, ``dataclasses.asdict`` gives plain
    data and ``SGDWarmup(**asdict(cfg))`` rebuilds it. ``build(module)`` reads the rest (steps, batch,
    devices) from the module's Trainer when ``configure_optimizers`` runs.

    The peak LR follows the convention of timm's training script (pytorch-image-models ``train.py``: ``--lr``,
    ``--lr-base``, ``--lr-base-size``, ``--lr-base-scale``): ``lr`` is the LR itself when given; when it is not,
    ``lr_base`` (the LR for ``lr_base_size`` samples per step) is scaled to the effective batch, per-device batch x
    devices x nodes x ``accumulate_grad_batches``, linearly (``lr_base x effective / lr_base_size``, Goyal et al.'s
    rule) or by the square root. timm's defaults are ``lr_base=0.1`` (Goyal et al.'s ImageNet value) and
    ``lr_base_size=256``, with the square root for Ada*/LAMB optimizers and linear otherwise (here: SGD, linear).
    Our ``lr_base`` default, 0.4, is tuned for the packaged digits job (0.1 at its batch of 64).

    Args:
        lr: the peak LR, used as given (``None``: scale ``lr_base``).
        lr_base: the peak LR for ``lr_base_size`` samples per optimizer step, used when ``lr`` is ``None``.
        lr_base_size: the effective batch ``lr_base`` is meant for.
        lr_base_scale: ``"linear"`` (``lr_base x effective / lr_base_size``) or ``"sqrt"`` (its square root, as
            timm uses for adaptive optimizers).
        momentum: SGD momentum in [0, 1).
        nesterov: Nesterov momentum; applies only when ``momentum > 0`` (with ``momentum=0`` plain SGD runs).
        weight_decay: L2 weight decay of conv/linear weights.
        norm_weight_decay: weight decay of normalization weights/biases and of every bias or other 1-D
            parameter.
        warmup_epochs: warmup length in epochs (may be fractional). Give this or ``warmup_steps``, not both;
            with neither, warmup lasts ``DEFAULT_WARMUP_EPOCHS`` (1) epoch. 0 disables warmup.
        warmup_steps: warmup length in optimizer steps.
        warmup: warmup shape: ``"linear"``, ``"exponential"`` or ``"constant"``.
        warmup_start_factor: the first step runs at this fraction of the peak LR, in (0, 1].
        decay: shape after warmup: ``"cosine"``, ``"linear"``, ``"poly"``, ``"step"``, ``"multistep"``,
            ``"exponential"`` or ``"constant"``.
        min_lr: the LR reached at the last step (absolute, never scaled), at most the peak LR.
        power: exponent of the ``"poly"`` decay.
        gamma: factor in (0, 1] of the ``"step"``, ``"multistep"`` and ``"exponential"`` decays.
        step_size: epochs between two multiplications by ``gamma`` (``"step"``, counted from the end of
            warmup), or the epochs over which the LR falls by ``gamma`` (``"exponential"``).
        milestones: ``"multistep"``: epochs (counted from the start of training, after warmup) at which the LR
            is multiplied by ``gamma``.
        batch_size: per-device batch size used for scaling (default: read from the train dataloader).
        total_steps: optimizer steps of the whole run (default: ``trainer.estimated_stepping_batches``).
        resume_schedule: when a checkpoint's schedule differs from this run's plan (e.g. ``max_epochs`` was raised
            to extend a finished run): ``"checkpoint"`` keeps the checkpoint's and warns, ``"replan"`` uses this
            run's plan from the restored step on.
        name: the scheduler's name in Lightning's ``LearningRateMonitor`` (default ``"lr-SGD"``, or
            ``"lr-SGD-<submodule>"`` when ``build`` is given a submodule or its parameters).

    Raises:
        ValueError: for an invalid field (the message names it, its value and what is allowed).
        TypeError: for a field of the wrong type.

    Examples:
        >>> cfg = SGDWarmup(lr=0.4, warmup_steps=5, total_steps=50)
        >>> out = cfg.build(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
        >>> round(out["optimizer"].param_groups[0]["lr"], 6), out["lr_scheduler"]["interval"]
        (0.04, 'step')
        >>> from dataclasses import asdict
        >>> SGDWarmup(**asdict(cfg)) == cfg
        True
    """

    lr: float | None = None
    lr_base: float = 0.4
    lr_base_size: int = 256
    lr_base_scale: ScaleRule = "linear"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    norm_weight_decay: float = 0.0
    warmup_epochs: float | None = None
    warmup_steps: int | None = None
    warmup: WarmupShape = "linear"
    warmup_start_factor: float = 0.1
    decay: DecayShape = "cosine"
    min_lr: float = 0.0
    power: float = 2.0
    gamma: float = 0.1
    step_size: float = 1.0
    milestones: list[int] | None = None
    batch_size: int | None = None
    total_steps: int | None = None
    resume_schedule: ResumeSchedule = "checkpoint"
    name: str | None = None

    def __post_init__(self) -> None:
        owner = "SGDWarmup"
        check_number("lr", self.lr, 0.0, min_open=True, allow_none=True, owner=owner)
        check_number("lr_base", self.lr_base, 0.0, min_open=True, owner=owner)
        check_int("lr_base_size", self.lr_base_size, minimum=1, owner=owner)
        check_choice("lr_base_scale", self.lr_base_scale, SCALE_RULES, owner=owner)
        check_number("momentum", self.momentum, 0.0, 1.0, max_open=True, owner=owner)
        check_bool("nesterov", self.nesterov, owner=owner)
        check_number("weight_decay", self.weight_decay, 0.0, owner=owner)
        check_number("norm_weight_decay", self.norm_weight_decay, 0.0, owner=owner)
        if self.warmup_epochs is not None and self.warmup_steps is not None:
            raise ValueError(
                f"{owner}: give `warmup_epochs` or `warmup_steps`, not both; got warmup_epochs="
                f"{self.warmup_epochs!r} and warmup_steps={self.warmup_steps!r}."
            )
        check_number("warmup_epochs", self.warmup_epochs, 0.0, allow_none=True, owner=owner)
        settings = {name: getattr(self, name) for name in SCHEDULE_FIELDS}
        schedule = Schedule(**settings, owner=owner, warmup_end=self.warmup_length_epochs(default=0.0))
        self.milestones = list(schedule.milestones) if self.milestones is not None else None
        if self.lr is not None and self.min_lr > self.lr:
            raise ValueError(f"{owner}: `min_lr` must be at most lr={self.lr}, got {self.min_lr!r}.")
        check_int("batch_size", self.batch_size, minimum=1, allow_none=True, owner=owner)
        check_choice("resume_schedule", self.resume_schedule, RESUME_SCHEDULES, owner=owner)
        if self.name is not None:
            check_str("name", self.name, owner=owner)

    def warmup_length_epochs(self, default: float = DEFAULT_WARMUP_EPOCHS) -> float:
        """Warmup length in epochs when it is given in epochs (or by default); ``default`` otherwise.

        Examples:
            >>> SGDWarmup().warmup_length_epochs(), SGDWarmup(warmup_epochs=2.5).warmup_length_epochs()
            (1.0, 2.5)
        """
        if self.warmup_epochs is not None:
            return float(self.warmup_epochs)
        if self.warmup_steps is None:
            return DEFAULT_WARMUP_EPOCHS
        return default

    def _uses(self, name: str) -> bool:
        """Whether the decay shape reads the setting ``name`` (``"step_size"``, ``"milestones"``: in epochs here)."""
        return name in DECAY_USES[self.decay]

    def _needs_epochs(self) -> bool:
        uses_milestones = bool(self.milestones and self._uses("milestones"))
        return self.warmup_steps is None or self._uses("step_size") or uses_milestones

    def _warmup_in_steps(self, total: int, steps_per_epoch: int, debug_run: bool = False) -> int:
        if self.warmup_steps is not None:
            warmup, where = int(self.warmup_steps), f"warmup_steps={self.warmup_steps}"
        else:
            epochs = self.warmup_length_epochs()
            warmup = round(epochs * steps_per_epoch)
            where = f"warmup_epochs={epochs} ({warmup} steps at {steps_per_epoch} steps per epoch)"
        if warmup > total and debug_run:
            return total
        if warmup > total:
            raise ValueError(
                f"Warmup is longer than the run: {where} > total_steps={total}. Shorten the warmup or train longer."
            )
        return warmup

    def peak_lr(self, effective_batch: int | None) -> float:
        """The peak LR for an effective batch: ``lr`` when given, else ``lr_base`` scaled by ``lr_base_scale``.

        Examples:
            >>> SGDWarmup(lr_base=0.4).peak_lr(64), SGDWarmup(lr=0.3).peak_lr(None)
            (0.1, 0.3)
        """
        if self.lr is not None:
            return float(self.lr)
        if effective_batch is None:
            raise ValueError(
                "SGDWarmup scales `lr_base` to the effective batch, but the per-device batch size is unknown (the "
                "module has no Trainer or its train dataloader does not tell it): set SGDWarmup's `batch_size`, "
                "or give the LR itself as `lr`."
            )
        return self.lr_base * lr_scale(effective_batch, self.lr_base_size, self.lr_base_scale)

    def resolve(
        self,
        *,
        total_steps: int | None = None,
        steps_per_epoch: int | None = None,
        batch_size: int | None = None,
        world_size: int = 1,
        accumulate_grad_batches: int = 1,
        debug_run: bool = False,
    ) -> ResolvedSchedule:
        """Make this config concrete for one run (pure: no Trainer needed).

        Args:
            total_steps: optimizer steps of the run (the field ``total_steps`` wins when set).
            steps_per_epoch: optimizer steps per epoch, to convert epoch-valued fields.
            batch_size: per-device batch size (the field ``batch_size`` wins when set).
            world_size: number of processes (devices x nodes).
            accumulate_grad_batches: batches per optimizer step.
            debug_run: the Trainer runs with ``fast_dev_run``: a warmup longer than that short run is cut to it
                instead of being an error, so a debug run works with the real run's config.

        Raises:
            ValueError: when a needed length is unknown (the message says what to set), warmup is longer
                than the run (outside a debug run), or ``min_lr`` exceeds the peak LR.

        Examples:
            >>> r = SGDWarmup(lr_base=0.1, warmup_epochs=1).resolve(
            ...     total_steps=200, steps_per_epoch=20, batch_size=64, world_size=2,
            ...     accumulate_grad_batches=4,
            ... )
            >>> r.effective_batch_size, r.lr, r.warmup_steps
            (512, 0.2, 20)
        """
        total = self.total_steps if self.total_steps is not None else total_steps
        if total is None or not is_int(total) or total < 1:
            raise ValueError(
                f"SGDWarmup cannot tell the number of optimizer steps (got {total!r}): the run is infinite "
                "or its length unknown (e.g. an iterable dataset). Set the Trainer's `max_steps` or "
                "SGDWarmup's `total_steps`."
            )
        if self._needs_epochs() and (steps_per_epoch is None or steps_per_epoch < 1):
            raise ValueError(
                f"SGDWarmup cannot convert epochs to steps (steps per epoch unknown, got "
                f"{steps_per_epoch!r}): set `warmup_steps` instead of `warmup_epochs` and use a decay "
                "without epoch-valued fields, or give the Trainer a sized train dataloader."
            )
        spe = int(steps_per_epoch) if steps_per_epoch else 0
        warmup = self._warmup_in_steps(int(total), spe, debug_run)
        bs = self.batch_size if self.batch_size is not None else batch_size
        effective = None if bs is None else effective_batch_size(int(bs), world_size, accumulate_grad_batches)
        lr = self.peak_lr(effective)
        if self.min_lr > lr:
            raise ValueError(f"SGDWarmup: `min_lr`={self.min_lr} exceeds the peak LR {lr:.6g} of this run.")
        return ResolvedSchedule(
            lr=lr,
            min_lr=float(self.min_lr),
            effective_batch_size=effective,
            warmup_steps=warmup,
            total_steps=int(total),
            step_size=self.step_size * spe if self._uses("step_size") else 1.0,
            milestones=[round(m * spe) for m in self.milestones or []] if self._uses("milestones") else [],
            steps_per_epoch=spe or None,
        )

    def build(self, module: nn.Module, params: nn.Module | Iterable[torch.Tensor] | None = None) -> dict[str, Any]:
        """Build the optimizer and per-step scheduler (call it in ``configure_optimizers``).

        Reads ``module.trainer`` when the module is attached to one: total steps from
        ``trainer.estimated_stepping_batches``, steps per epoch, the train dataloader's batch size, the world
        size and ``accumulate_grad_batches``. A module without a Trainer needs ``total_steps``,
        ``warmup_steps`` and ``lr`` (or ``batch_size``). At the first optimizer step it logs the schedule that runs
        (rank zero), after any checkpoint was restored.

        With several optimizers, build one per part: ``[cfg.build(self, self.generator), cfg.build(self,
        self.discriminator)]``; each scheduler gets its own ``LearningRateMonitor`` name. When the module uses
        manual optimization (or is a plain ``nn.Module``), your code steps the scheduler; a warning says so when an
        epoch's worth of optimizer steps (or, without a Trainer, the warmup's) passed without a scheduler step.

        Args:
            module: the LightningModule (its Trainer is read), or a plain ``nn.Module`` when every length is given.
            params: what to optimize: ``None`` (all of ``module``), a submodule, or an iterable of ``module``'s
                parameters (grouped by their owning layers, see :func:`param_groups`).

        Returns:
            ``{"optimizer": torch.optim.SGD, "lr_scheduler": {"scheduler": WarmupLR, "interval": "step",
            "frequency": 1, "name": ...}}``.

        Raises:
            ValueError: when there is no trainable parameter, or a run length / batch size is unknown (the message
                says why: e.g. a submodule passed as ``module`` has no Trainer).
        """
        if isinstance(params, Iterable) and not isinstance(params, (nn.Module, torch.Tensor)):
            params = list(params)  # read twice below (groups, scheduler name): a generator would be used up
        groups = param_groups(module, self.weight_decay, self.norm_weight_decay, params=params)
        if not any(group["params"] for group in groups):
            raise ValueError(
                f"{type(module).__name__} has no trainable parameters (requires_grad=True) in what SGDWarmup was "
                "given to optimize; SGDWarmup has nothing to optimize."
            )
        resolved = self._resolve_for(module)
        optimizer = torch.optim.SGD(
            groups,
            lr=resolved.lr,
            momentum=self.momentum,
            nesterov=self.nesterov and self.momentum > 0,
            weight_decay=self.weight_decay,
        )
        scheduler = WarmupLR(optimizer, **resolved.scheduler_kwargs(self))
        scheduler._run_step = _trainer.fit_step_of(module)
        name = self.name if self.name is not None else _scheduler_name(module, params)
        _announce_at_first_step(optimizer, scheduler, self._describe_source(resolved))
        if getattr(module, "automatic_optimization", False) is not True:
            _warn_if_never_stepped(optimizer, scheduler, resolved.steps_per_epoch or max(resolved.warmup_steps, 1))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1, "name": name},
        }

    def _resolve_for(self, module: nn.Module) -> ResolvedSchedule:
        trainer = _trainer.trainer_of(module)
        facts = _trainer.trainer_facts(trainer)
        try:
            resolved = self.resolve(**facts)
        except ValueError as err:
            if trainer is not None and _trainer.has_train_data(trainer):
                raise
            cause = _trainer.no_trainer_cause(module) if trainer is None else _trainer.no_data_cause(module)
            raise ValueError(f"{cause} {err}") from err
        run = facts.get("total_steps")
        if self.total_steps is not None and run is not None and resolved.total_steps < run:
            rank_zero_warn(_short_plan_message(resolved, run), category=UserWarning)
        return resolved

    def _describe_source(self, resolved: ResolvedSchedule) -> str:
        batch = resolved.effective_batch_size
        where = f"effective batch {batch if batch is not None else 'unknown'}"
        if self.lr is not None:
            return f"lr={self.lr:g} as given, {where}"
        return f"lr_base={self.lr_base:g} x {batch}/{self.lr_base_size} ({self.lr_base_scale}), {where}"

    def lr_curve(
        self,
        total_steps: int,
        steps_per_epoch: int | None = None,
        batch_size: int | None = None,
        world_size: int = 1,
        accumulate_grad_batches: int = 1,
    ) -> list[float]:
        """The peak-group LR of every optimizer step ``0 .. total_steps - 1`` (for plots and checks).

        Examples:
            >>> cfg = SGDWarmup(lr=1.0, warmup_steps=2, decay="linear")
            >>> [round(v, 3) for v in cfg.lr_curve(5)]
            [0.1, 0.55, 1.0, 0.667, 0.333]
        """
        resolved = self.resolve(
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            batch_size=batch_size,
            world_size=world_size,
            accumulate_grad_batches=accumulate_grad_batches,
        )
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=resolved.lr)
        scheduler = WarmupLR(optimizer, **resolved.scheduler_kwargs(self))
        return [scheduler.factor(t) * resolved.lr for t in range(resolved.total_steps)]


def _announce_at_first_step(optimizer: torch.optim.Optimizer, scheduler: WarmupLR, source: str) -> None:
    """Log the schedule that actually runs (after any checkpoint was restored) once, before the first step."""
    ref = weakref.ref(scheduler)

    def announce(*_: Any) -> None:
        handle.remove()
        sched = ref()
        if sched is None:
            return
        restored = "" if sched.peak_lr == optimizer.defaults["lr"] else " (the checkpoint's)"
        resumed = f"; resumed at step {sched.last_epoch}" if sched.last_epoch > 0 else ""
        rank_zero_info(
            f"SGDWarmup: peak LR {sched.peak_lr:.6g}{restored} ({source}); {sched.schedule.describe()}{resumed}."
        )

    handle = optimizer.register_step_pre_hook(announce)


def _warn_if_never_stepped(optimizer: torch.optim.Optimizer, scheduler: WarmupLR, steps: int) -> None:
    """Warn once when ``steps`` optimizer steps passed while ``scheduler`` never advanced (manual optimization)."""
    ref = weakref.ref(scheduler)
    start = scheduler.last_epoch
    count = 0

    def check(*_: Any) -> None:
        nonlocal count
        count += 1
        sched = ref()
        if sched is None or sched.last_epoch != start:
            handle.remove()
        elif count > steps:
            handle.remove()
            rank_zero_warn(
                f"SGDWarmup: the WarmupLR scheduler was not stepped during the first {steps} optimizer steps (an "
                f"epoch), so the LR is still {optimizer.param_groups[0]['lr']:.6g}, the first warmup step's. With "
                "manual optimization Lightning does not step schedulers: call `sch.step()` after each "
                "`opt.step()`, with `sch` from `self.lr_schedulers()` (docs: usage.md, 'Several optimizers and "
                "manual optimization').",
                category=UserWarning,
            )

    handle = optimizer.register_step_post_hook(check)


def _short_plan_message(resolved: ResolvedSchedule, run: int) -> str:
    """The warning for a ``total_steps`` shorter than the run: what the steps after its end run at."""
    left = run - resolved.total_steps
    at = "LR 0, so they do not train" if resolved.min_lr == 0 else f"min_lr={resolved.min_lr:.6g}"
    return (
        f"SGDWarmup: `total_steps`={resolved.total_steps} is shorter than this run's {run} optimizer steps "
        f"(trainer.estimated_stepping_batches): the schedule ends at step {resolved.total_steps} and the last {left} "
        f"steps run at {at}. Leave `total_steps` unset to plan the schedule over the whole run, or end the run with "
        f"it (Trainer(max_steps={resolved.total_steps}))."
    )


if hasattr(torch.serialization, "add_safe_globals"):  # torch >= 2.4
    # A LightningModule that calls `save_hyperparameters()` with an `optimizer: SGDWarmup` argument puts the
    # SGDWarmup itself into its checkpoints: allow it (a dataclass of plain fields) under `weights_only=True`, torch's
    # default for `torch.load` and so for `Trainer.fit(ckpt_path=...)` and `load_from_checkpoint`.
    torch.serialization.add_safe_globals([SGDWarmup])


__all__ = [
    "DEFAULT_WARMUP_EPOCHS",
    "LAZY_WEIGHT_LAYERS",
    "NORM_LAYERS",
    "SCALE_RULES",
    "ResolvedSchedule",
    "SGDWarmup",
    "effective_batch_size",
    "lr_scale",
    "param_groups",
    "per_device_batch_size",
]
