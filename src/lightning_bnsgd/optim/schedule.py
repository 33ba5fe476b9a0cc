"""``WarmupLR``: a per-step warmup + decay learning-rate schedule in closed form.

The LR multiplier at optimizer step ``t`` (0-based) is ``Schedule.factor(t, peak_lr)`` (``optim/plan.py``), a pure
function of ``t`` and the schedule's settings: :func:`lr_factor` over the warmup and decay shapes of
``optim/shapes.py``. Every param group's LR is its own base LR times that one factor, so groups keep their LR
ratios at every step.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

from lightning_utilities.core.rank_zero import rank_zero_warn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_bnsgd._validation import check_choice, check_int
from lightning_bnsgd.optim.plan import SCHEDULE_FIELDS, Schedule
from lightning_bnsgd.optim.plan import check_milestones as check_milestones  # importable here as before
from lightning_bnsgd.optim.shapes import DECAY_SHAPES, WARMUP_SHAPES, DecayShape, WarmupShape, lr_factor
from lightning_bnsgd.optim.shapes import decay_factor as decay_factor
from lightning_bnsgd.optim.shapes import warmup_factor as warmup_factor

ResumeSchedule = Literal["checkpoint", "replan"]
RESUME_SCHEDULES: tuple[str, ...] = get_args(ResumeSchedule)


class WarmupLR(LRScheduler):
    """Per-step warmup, then decay to ``min_lr`` at ``total_steps``: the LR is a closed form of the step.

    Step it once per optimizer step (Lightning: ``"interval": "step"``). The LR of optimizer step ``t``
    (0-based) is ``base_lr * lr_factor(t, ...)`` for every param group, with that group's own base LR. The
    schedule keeps no state but the step count (and the base LRs), so a resumed run gets the bitwise-identical LR
    sequence.

    **Base LRs, as in every torch scheduler.** A group's base LR is its ``initial_lr`` when it has one (set by a
    scheduler built before this one on the same optimizer, or by a loaded optimizer state), else its current ``lr``;
    ``state_dict``/``load_state_dict`` save and restore the step count, the base LRs and the last LRs
    (``get_last_lr()``). It composes with torch's schedulers: in ``ChainedScheduler`` the factors multiply, in
    either order; inside ``SequentialLR`` it restarts from its base LRs at its milestone, whatever LR the previous
    scheduler left, as torch's schedulers do.

    **LRs changed from outside, hand-overs and restored states.** At each step, a group whose ``lr`` differs from the
    one this scheduler set last (``get_last_lr()``) was changed from outside between two steps: by a callback such
    as Lightning's ``BackboneFinetuning`` (which also adds param groups mid-run with ``add_param_group``). Such a
    change persists and follows the schedule's shape from there, as torch's chainable schedulers do: the group's base
    LR becomes ``lr / f(t)`` (recorded as its ``initial_lr``), and an added group runs the LR it was added with at the
    step it was added at. Two cases are never adopted: a hand-over (the initial step, and ``step(epoch)``, which
    ``SequentialLR`` calls at a milestone) runs the closed form from the base LRs; and an optimizer state loaded
    (``optimizer.load_state_dict``) without this scheduler's state before the next optimizer step (a checkpoint of a
    plain optimizer, or with Lightning's ``lr_schedulers`` entry removed) does not rescale the plan: its restored LRs
    are replaced by the plan's, from this scheduler's step (the resumed fit's step under ``SGDWarmup``), with a
    warning that says what runs. The base LRs of all groups are in ``state_dict()``, so resuming works with groups
    added before the checkpoint.

    **Resuming into a different plan.** ``load_state_dict`` compares the checkpoint's plan (lengths, shapes,
    ``min_lr``, base LRs) with the one this scheduler was constructed with (e.g. ``max_epochs`` was raised to
    extend a finished run). With ``resume_schedule="checkpoint"`` (default) the checkpoint's plan is kept and a
    warning says what follows (an ended schedule stays at ``min_lr``) and how to re-plan; with ``"replan"`` the
    constructed plan is used from the restored step on (load the optimizer's state first, as Lightning does).

    Args:
        optimizer: the wrapped optimizer; each group's ``initial_lr`` (else its current ``lr``) is its base LR.
        warmup_steps: steps of warmup (0: none). Step ``warmup_steps`` runs at exactly the base LR.
        total_steps: steps of the whole run, warmup included. The LR reaches ``min_lr`` exactly here and
            stays there.
        warmup: warmup shape: ``"linear"``, ``"exponential"`` or ``"constant"``.
        warmup_start_factor: multiplier of the first step, in (0, 1] (0.1: the first step runs at a tenth of
            the base LR). Goyal et al. warm up from the small-batch LR: use ``1 / k`` for a batch ``k`` times
            the reference.
        decay: decay shape after warmup: ``"cosine"``, ``"linear"``, ``"poly"``, ``"step"``, ``"multistep"``,
            ``"exponential"`` or ``"constant"``.
        min_lr: final LR of the group with the largest base LR at construction (the other groups' floors scale
            with their base LR, so all groups keep their ratios). Must not exceed the largest base LR.
        power: exponent of the ``"poly"`` decay (> 0).
        gamma: factor in (0, 1] of the ``"step"``, ``"multistep"`` and ``"exponential"`` decays.
        step_size: ``"step"``: steps between two multiplications by ``gamma``, counted from the end of warmup;
            ``"exponential"``: steps over which the LR falls by ``gamma`` (default 1: ``gamma`` per step).
        milestones: ``"multistep"``: absolute step numbers (counted from step 0, all after warmup) at which
            the LR is multiplied by ``gamma``.
        resume_schedule: ``"checkpoint"`` or ``"replan"``: which plan wins when a loaded state differs (see above).
        last_epoch: index of the last step taken, as in every torch scheduler (-1: start fresh).

    Raises:
        ValueError: for invalid settings (each message names the argument, the value and what is allowed).
        TypeError: for an argument of the wrong type.

    Examples:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> sched = WarmupLR(opt, warmup_steps=2, total_steps=6, decay="linear", min_lr=0.2)
        >>> lrs = []
        >>> for _ in range(8):
        ...     lrs.append(round(opt.param_groups[0]["lr"], 3))
        ...     opt.step()
        ...     sched.step()
        >>> lrs
        [0.1, 0.55, 1.0, 0.8, 0.6, 0.4, 0.2, 0.2]
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        warmup_steps: int,
        total_steps: int,
        warmup: WarmupShape = "linear",
        warmup_start_factor: float = 0.1,
        decay: DecayShape = "cosine",
        min_lr: float = 0.0,
        power: float = 2.0,
        gamma: float = 0.1,
        step_size: float = 1.0,
        milestones: Sequence[int] = (),
        resume_schedule: ResumeSchedule = "checkpoint",
        last_epoch: int = -1,
    ) -> None:
        settings = {name: value for name, value in locals().items() if name in SCHEDULE_FIELDS}
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"WarmupLR: `optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        check_int("warmup_steps", warmup_steps, minimum=0, owner="WarmupLR")
        check_int("total_steps", total_steps, minimum=1, owner="WarmupLR")
        #: The plan: the schedule's settings, one immutable value (its fields read as this scheduler's attributes).
        self.schedule = Schedule(**settings, owner="WarmupLR")
        self.resume_schedule = check_choice("resume_schedule", resume_schedule, RESUME_SCHEDULES, owner="WarmupLR")
        # torch's protocol: a group's base LR is its `initial_lr` when it has one (a scheduler built before this one,
        # or a loaded optimizer state, set it), else its current LR.
        self.peak_lr = max(float(group.get("initial_lr", group["lr"])) for group in optimizer.param_groups)
        if last_epoch == -1 and min_lr > self.peak_lr:
            raise ValueError(f"WarmupLR: `min_lr` must not exceed the base LR ({self.peak_lr}), got {min_lr!r}.")
        #: Transient (never in ``state_dict``): what was loaded since the last optimizer step, and where a resumed
        #: run's step count comes from when only the optimizer's state was restored (set by ``SGDWarmup.build``).
        self._restored: dict[str, bool] = {"optimizer": False, "scheduler": False}
        self._run_step: Callable[[], int | None] | None = None
        super().__init__(optimizer, last_epoch=last_epoch)
        _watch_optimizer(self)

    def __getattr__(self, name: str) -> Any:
        """The schedule's settings read as attributes (``sched.total_steps``), as before they were one value."""
        schedule = self.__dict__.get("schedule")
        if schedule is not None and name in SCHEDULE_FIELDS:
            return getattr(schedule, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def floor(self) -> float:
        """The final LR multiplier: ``min_lr`` relative to the largest base LR at construction (0 when that is 0).

        Examples:
            >>> import torch
            >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
            >>> WarmupLR(opt, warmup_steps=0, total_steps=10, min_lr=0.05).floor()
            0.1
        """
        return self.schedule.floor(self.peak_lr)

    def factor(self, step: int) -> float:
        """The LR multiplier of optimizer step ``step`` (0-based), common to all param groups.

        Examples:
            >>> import torch
            >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
            >>> sched = WarmupLR(opt, warmup_steps=4, total_steps=8, decay="constant")
            >>> [sched.factor(t) for t in (0, 4, 7, 8)]
            [0.1, 1.0, 1.0, 0.0]
        """
        return self.schedule.factor(step, self.peak_lr)

    def plan(self) -> dict[str, Any]:
        """The settings of the schedule that runs, and its peak LR, as plain data (as ``state_dict`` holds them)."""
        return {**self.schedule.state(), "peak_lr": self.peak_lr}

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """LRs of the current step ``last_epoch`` for every param group (closed form).

        This is the path of ``step()``: a group whose LR was changed from outside since the previous step, or a group
        added since then, is adopted first (see the class docstring). At step 0 (the initial step, also when
        ``SequentialLR`` re-runs it) nothing ran since this scheduler set the LRs: the closed form, nothing adopted.
        """
        if self.last_epoch > 0:
            self._adopt_groups()
        return self._get_closed_form_lr()

    def _get_closed_form_lr(self) -> list[float]:
        """The closed form at ``last_epoch`` from the base LRs.

        torch calls it for ``step(epoch)``, as ``SequentialLR`` does when it hands over to this scheduler at a
        milestone: a hand-over restarts from the base LRs (``initial_lr``), whatever LR the previous scheduler left.
        """
        for group in self.optimizer.param_groups[len(self.base_lrs) :]:
            base = float(group.get("initial_lr", group["lr"]))
            group.setdefault("initial_lr", base)
            self.base_lrs.append(base)
        return self._lrs_at(self.last_epoch)[: len(self.optimizer.param_groups)]

    def _lrs_at(self, step: int) -> list[float]:
        """The LR of every group with a base LR at ``step`` (pure: changes nothing)."""
        if step >= self.schedule.end:
            # min_lr exactly for the peak group (base / peak == 1.0), the same ratio for the others
            peak, min_lr = self.peak_lr, self.schedule.min_lr
            return [min_lr * (float(base) / peak) if peak > 0 else 0.0 for base in self.base_lrs]
        factor = self.factor(step)
        return [float(base) * factor for base in self.base_lrs]

    def _adopt_groups(self) -> None:
        """Give a group added since the last step a base LR, and rebase a group whose LR was changed from outside.

        Either way the group's current LR (the one it ran the previous step with) becomes ``base * f(previous)``.
        """
        last = getattr(self, "_last_lr", None)
        previous = max(self.last_epoch - 1, 0)
        for index, group in enumerate(self.optimizer.param_groups):
            known = index < len(self.base_lrs)
            if known and (last is None or index >= len(last) or float(group["lr"]) == float(last[index])):
                continue
            factor = self.factor(previous)
            base = float(group["lr"]) / factor if factor > 0 else float(group["lr"])
            group["initial_lr"] = base
            if known:
                self.base_lrs[index] = base
            else:
                self.base_lrs.append(base)

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state, as torch's schedulers give it (plain data: it loads with ``weights_only=True``)."""
        state = {key: value for key, value in super().state_dict().items() if key not in _TRANSIENT}
        schedule = state.pop("schedule")
        return {**state, **schedule.state()}  # the settings as plain fields, as they always were

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a checkpoint's state (step count, base LRs, last LRs); when its plan differs, warn or re-plan.

        ``get_last_lr()`` then reports the checkpoint's last LRs, as with every torch scheduler. When the optimizer's
        state has not been restored (yet), its groups take those LRs, so the next step runs the restored schedule
        whichever of the two states is loaded first. ``resume_schedule`` (this scheduler's, not the checkpoint's)
        decides a differing plan: ``"checkpoint"`` keeps the restored plan and warns; ``"replan"`` keeps the step
        count and the base LRs of groups added mid-run, and takes the plan (lengths, shapes, ``min_lr``, base LRs of
        the constructed groups) from this scheduler.
        """
        planned, planned_bases, mode = self._plan(), [float(b) for b in self.base_lrs], self.resume_schedule
        restored, run_step = self._restored, self._run_step
        settings = {key: value for key, value in state_dict.items() if key in SCHEDULE_FIELDS}
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in _TRANSIENT and k not in settings})
        self.schedule = dataclasses.replace(self.schedule, **settings)
        self.resume_schedule, self._restored, self._run_step = mode, restored, run_step
        stored = self._plan()
        count = len(planned_bases)
        differs = stored != planned or [float(b) for b in self.base_lrs[:count]] != planned_bases
        if differs:
            self._resolve_mismatch(stored, planned, planned_bases)
        if not (differs and mode == "replan") and not restored["optimizer"]:
            groups = self.optimizer.param_groups
            for group, lr, base in zip(groups, self._last_lr, self.base_lrs, strict=False):
                group["lr"], group["initial_lr"] = float(lr), float(base)
        restored["scheduler"] = True

    def _plan(self) -> tuple[Schedule, float]:
        """What a resume compares: the schedule and the peak LR its floor is relative to."""
        return self.schedule, self.peak_lr

    def _before_optimizer_step(self) -> None:
        """At the first optimizer step after a load: resolve an optimizer state restored without this scheduler's state.

        This scheduler's plan wins (said once); the restored state is never adopted as a change made from outside.
        """
        restored = self._restored
        if restored["optimizer"] and not restored["scheduler"]:
            self._keep_plan()
        restored["optimizer"] = restored["scheduler"] = False

    def _keep_plan(self) -> None:
        """The optimizer's state was loaded and this scheduler's was not: the plan runs.

        That is a checkpoint of a plain optimizer, or with its ``lr_schedulers`` entry removed; the restored LRs say
        nothing about this plan.
        """
        groups = self.optimizer.param_groups
        found = [float(group["lr"]) for group in groups]
        step = self._run_step() if self._run_step is not None else None
        if step is not None and step > self.last_epoch:
            self.last_epoch = int(step)
        planned = self._lrs_at(self.last_epoch)
        count = min(len(groups), len(planned))
        if found[:count] == planned[:count] and all(
            float(group.get("initial_lr", -1.0)) == float(base)
            for group, base in zip(groups, self.base_lrs[:count], strict=False)
        ):
            return
        for group, lr, base in zip(groups, planned, self.base_lrs, strict=False):
            group["lr"], group["initial_lr"] = lr, float(base)
        self._last_lr = [float(group["lr"]) for group in groups]
        where = (
            f"step {self.last_epoch} (the resumed fit's step)" if step is not None else f"its step {self.last_epoch}"
        )
        rank_zero_warn(
            f"WarmupLR: the optimizer's state was loaded (param group 0 at LR {found[0]:.6g}) without a WarmupLR state "
            "(a checkpoint written without this scheduler, e.g. by a fit with a plain optimizer, or with its "
            "`lr_schedulers` entry removed). The restored LRs are not used: this scheduler's own plan (peak LR "
            f"{self.peak_lr:.6g}; {self.schedule.describe()}) runs from {where} on, param group 0 at LR "
            f"{planned[0]:.6g} now. To continue a schedule instead, resume from a checkpoint that holds its state.",
            category=UserWarning,
        )

    def _resolve_mismatch(
        self, stored: tuple[Schedule, float], planned: tuple[Schedule, float], planned_bases: list[float]
    ) -> None:
        if self.resume_schedule == "replan":
            self._replan(planned, planned_bases)
            return
        end = self.schedule.end
        ended = f" for good (that schedule ended at step {end})" if self.last_epoch >= end else ""
        rank_zero_warn(
            f"WarmupLR: the checkpoint's schedule ({stored[0].describe()}, peak LR {stored[1]:.6g}) "
            f"differs from the one this run planned ({planned[0].describe()}, peak LR {planned[1]:.6g}), "
            "e.g. because max_epochs, max_steps, the devices or the batch size changed. The checkpoint's schedule "
            f"is kept: from step {self.last_epoch} on the first param group's LR is "
            f"{self._lrs_at(self.last_epoch)[0]:.6g}{ended}. To re-plan the schedule to this run, set "
            "`resume_schedule='replan'` (on SGDWarmup or WarmupLR).",
            category=UserWarning,
        )

    def _replan(self, planned: tuple[Schedule, float], planned_bases: list[float]) -> None:
        self.schedule, self.peak_lr = planned
        bases: list[Any] = planned_bases + [float(b) for b in self.base_lrs[len(planned_bases) :]]
        self.base_lrs = bases
        groups = self.optimizer.param_groups
        for group, base, lr in zip(groups, self.base_lrs, self._lrs_at(self.last_epoch), strict=False):
            group["lr"], group["initial_lr"] = lr, base
        self._last_lr = [float(group["lr"]) for group in groups]  # what runs now is this plan's


#: Attributes of ``WarmupLR`` that describe this process, not the schedule: never saved, never loaded.
_TRANSIENT: tuple[str, ...] = ("_restored", "_run_step")


def _watch_optimizer(scheduler: WarmupLR) -> None:
    """Tell ``scheduler`` when its optimizer's state is loaded, and let it act before the next optimizer step.

    torch's optimizer hooks (``register_load_state_dict_post_hook``, ``register_step_pre_hook``) hold the scheduler
    weakly, so they never keep it alive; once it is gone (e.g. replaced by SWA's scheduler) they do nothing. They never
    remove themselves: torch iterates over its hooks while calling them. Without these hooks (older torch) nothing is
    watched.
    """
    optimizer = scheduler.optimizer
    if not hasattr(optimizer, "register_load_state_dict_post_hook"):
        return
    ref = weakref.ref(scheduler)

    def loaded(_: Any) -> None:
        sched = ref()
        if sched is not None:
            sched._restored["optimizer"] = True

    def before_step(*_: Any) -> None:
        sched = ref()
        if sched is not None and (sched._restored["optimizer"] or sched._restored["scheduler"]):
            sched._before_optimizer_step()

    optimizer.register_load_state_dict_post_hook(loaded)
    optimizer.register_step_pre_hook(before_step)


#: Names this module held before the shapes moved to ``optim/shapes.py`` (with ``warmup_factor``, ``decay_factor``
#: and ``check_milestones``, re-exported above): still importable from here.
__all__ = ["DECAY_SHAPES", "RESUME_SCHEDULES", "WARMUP_SHAPES", "ResumeSchedule", "WarmupLR", "lr_factor"]
