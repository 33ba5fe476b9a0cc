"""``WarmupLR``: a per-step warmup + decay learning-rate schedule in closed form.

The LR multiplier at optimizer step ``t`` (0-based: step 0 is the first optimizer step) is a pure function of
``t`` and the schedule's settings, computed by :func:`lr_factor` from two smaller pieces:

* :func:`warmup_factor` for ``t < warmup_steps``: rises from ``warmup_start_factor`` towards 1;
* :func:`decay_factor` for ``warmup_steps <= t < total_steps``: starts at exactly 1 and falls to the floor;
* from ``t = total_steps`` on, the factor is the floor ``min_lr / max(base LRs)`` and stays there.

Every param group's LR is its own base LR times that one factor, so groups keep their LR ratios at every step.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

from lightning_utilities.core.rank_zero import rank_zero_warn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_bnsgd._validation import check_choice, check_int, check_number

WarmupShape = Literal["linear", "exponential", "constant"]
DecayShape = Literal["cosine", "linear", "poly", "step", "multistep", "exponential", "constant"]
WARMUP_SHAPES: tuple[str, ...] = get_args(WarmupShape)
DECAY_SHAPES: tuple[str, ...] = get_args(DecayShape)
ResumeSchedule = Literal["checkpoint", "replan"]
RESUME_SCHEDULES: tuple[str, ...] = get_args(ResumeSchedule)


def check_milestones(value: object, *, owner: str | None = None, name: str = "milestones") -> list[int]:
    """Validate milestones: positive integers in strictly increasing order.

    Examples:
        >>> check_milestones([30, 60, 80])
        [30, 60, 80]
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{owner + ': ' if owner else ''}`{name}` must be a list of positive integers, got {value!r}.")
    items = [int(check_int(f"{name}[{i}]", m, 1, owner=owner)) for i, m in enumerate(value)]
    if any(b <= a for a, b in itertools.pairwise(items)):
        raise ValueError(f"{owner + ': ' if owner else ''}`{name}` must be strictly increasing, got {items!r}.")
    return items


def check_schedule(
    owner: str,
    *,
    warmup_steps: object,
    total_steps: object,
    warmup: object,
    warmup_start_factor: object,
    decay: object,
    min_lr: object,
    power: object,
    gamma: object,
    step_size: object,
    milestones: object,
    warmup_end: float | None = None,
) -> list[int]:
    """The rules ``WarmupLR`` and ``SGDWarmup`` share, checked in one place; returns the milestones as a list.

    ``warmup_steps``/``total_steps`` may be ``None`` (``SGDWarmup`` reads them from the Trainer). Milestones must lie
    after ``warmup_end`` (in the milestones' own unit; default: ``warmup_steps``). Wrong types raise ``TypeError``,
    values out of range ``ValueError``; messages start with ``owner``.

    Examples:
        >>> check_schedule("WarmupLR", warmup_steps=2, total_steps=10, warmup="linear", warmup_start_factor=0.1,
        ...                decay="multistep", min_lr=0.0, power=2.0, gamma=0.1, step_size=1.0, milestones=(5, 8))
        [5, 8]
    """
    check_int("warmup_steps", warmup_steps, 0, allow_none=True, owner=owner)
    check_int("total_steps", total_steps, 1, allow_none=True, owner=owner)
    if warmup_steps is not None and total_steps is not None and warmup_steps > total_steps:  # type: ignore[operator]
        raise ValueError(
            f"{owner}: `warmup_steps` must not exceed `total_steps` ({total_steps}), got {warmup_steps!r}."
        )
    check_choice("warmup", warmup, WARMUP_SHAPES, owner=owner)
    check_number("warmup_start_factor", warmup_start_factor, 0.0, 1.0, min_open=True, owner=owner)
    check_choice("decay", decay, DECAY_SHAPES, owner=owner)
    check_number("min_lr", min_lr, 0.0, owner=owner)
    check_number("power", power, 0.0, min_open=True, owner=owner)
    check_number("gamma", gamma, 0.0, 1.0, min_open=True, owner=owner)
    check_number("step_size", step_size, 0.0, min_open=True, owner=owner)
    items = check_milestones(milestones, owner=owner) if milestones is not None else []
    if decay == "multistep" and not items:
        raise ValueError(
            f"{owner}: `milestones` must be a non-empty list when `decay='multistep'`, got {milestones!r}."
        )
    end = warmup_end if warmup_end is not None else warmup_steps
    if items and end is not None and items[0] <= end:  # type: ignore[operator]
        raise ValueError(f"{owner}: `milestones` must all come after warmup (> {end}), got {items!r}.")
    return items


def warmup_factor(step: int, warmup_steps: int, shape: str = "linear", start_factor: float = 0.1) -> float:
    """LR multiplier at ``step`` during warmup (``0 <= step < warmup_steps``); 1.0 from ``warmup_steps`` on.

    * ``linear``: ``start + (1 - start) * step / warmup_steps``;
    * ``exponential``: ``start ** (1 - step / warmup_steps)`` (a straight line on a log scale);
    * ``constant``: ``start`` for the whole warmup, then 1 (Goyal et al.'s "constant warmup").

    Step 0 runs at ``start_factor``; the factor rises monotonically and step ``warmup_steps`` runs at
    exactly 1.

    Examples:
        >>> [warmup_factor(t, 4, "linear", 0.2) for t in range(5)]
        [0.2, 0.4, 0.6000000000000001, 0.8, 1.0]
        >>> warmup_factor(2, 4, "exponential", 0.01), warmup_factor(3, 4, "constant", 0.5)
        (0.1, 0.5)
    """
    if step >= warmup_steps:
        return 1.0
    frac = max(step, 0) / warmup_steps
    if shape == "linear":
        return start_factor + (1.0 - start_factor) * frac
    if shape == "exponential":
        return start_factor ** (1.0 - frac)
    if shape == "constant":
        return start_factor
    raise ValueError(f"`warmup` must be one of {WARMUP_SHAPES}, got {shape!r}.")


def decay_factor(
    step: int,
    decay_steps: int,
    shape: str = "cosine",
    floor: float = 0.0,
    *,
    power: float = 2.0,
    gamma: float = 0.1,
    step_size: float = 1.0,
    milestones: Sequence[int] = (),
) -> float:
    """LR multiplier ``step`` steps after the end of warmup, for a decay phase of ``decay_steps`` steps.

    ``floor`` is the final multiplier (``min_lr / base_lr``). At ``step = 0`` every shape gives exactly 1.0;
    from ``step = decay_steps`` on every shape gives exactly ``floor``. In between:

    * ``cosine``: ``floor + (1 - floor) * (1 + cos(pi * p)) / 2`` with ``p = step / decay_steps``;
    * ``linear``: ``floor + (1 - floor) * (1 - p)``;
    * ``poly``: ``floor + (1 - floor) * (1 - p) ** power``;
    * ``step``: ``gamma ** floor(step / step_size)``, never below ``floor``;
    * ``multistep``: ``gamma ** k`` where ``k`` counts the milestones already passed (``milestones`` are
      counted in steps after the end of warmup here), never below ``floor``;
    * ``exponential``: ``gamma ** (step / step_size)`` (``gamma`` per ``step_size`` steps), never below
      ``floor``;
    * ``constant``: 1.0.

    Examples:
        >>> [round(decay_factor(t, 4, "cosine"), 4) for t in range(6)]
        [1.0, 0.8536, 0.5, 0.1464, 0.0, 0.0]
        >>> [decay_factor(t, 10, "multistep", gamma=0.5, milestones=[2, 4]) for t in (0, 2, 4, 10)]
        [1.0, 0.5, 0.25, 0.0]
    """
    if step >= decay_steps:
        return floor
    if step <= 0:
        return 1.0  # exactly, whatever rounding ``floor + (1 - floor)`` would do
    frac = step / decay_steps
    if shape == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))
    if shape == "linear":
        return floor + (1.0 - floor) * (1.0 - frac)
    if shape == "poly":
        return floor + (1.0 - floor) * (1.0 - frac) ** power
    if shape == "step":
        return max(floor, gamma ** math.floor(step / step_size))
    if shape == "multistep":
        passed = sum(1 for m in milestones if step >= m)
        return max(floor, gamma**passed)
    if shape == "exponential":
        return max(floor, gamma ** (step / step_size))
    if shape == "constant":
        return 1.0
    raise ValueError(f"`decay` must be one of {DECAY_SHAPES}, got {shape!r}.")


def lr_factor(
    step: int,
    *,
    warmup_steps: int,
    total_steps: int,
    warmup: str = "linear",
    warmup_start_factor: float = 0.1,
    decay: str = "cosine",
    floor: float = 0.0,
    power: float = 2.0,
    gamma: float = 0.1,
    step_size: float = 1.0,
    milestones: Sequence[int] = (),
) -> float:
    """The LR multiplier at optimizer step ``step`` (0-based) of the whole schedule.

    ``milestones`` are absolute step numbers (counted from the first step, like ``torch.optim.lr_scheduler
    .MultiStepLR``); ``step_size`` periods start at the end of warmup. From ``total_steps`` on the result is
    ``floor``.

    Examples:
        >>> [round(lr_factor(t, warmup_steps=2, total_steps=6, decay="linear"), 3) for t in range(8)]
        [0.1, 0.55, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    """
    if step >= total_steps:
        return floor
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps, warmup, warmup_start_factor)
    return decay_factor(
        step - warmup_steps,
        total_steps - warmup_steps,
        decay,
        floor,
        power=power,
        gamma=gamma,
        step_size=step_size,
        milestones=[m - warmup_steps for m in milestones],
    )


#: The settings that define a ``WarmupLR`` plan (compared when a checkpoint is loaded).
PLAN_FIELDS: tuple[str, ...] = (
    "warmup_steps",
    "total_steps",
    "warmup",
    "warmup_start_factor",
    "decay",
    "min_lr",
    "power",
    "gamma",
    "step_size",
    "milestones",
    "peak_lr",
)


def describe_plan(plan: dict[str, Any]) -> str:
    """One line describing a plan (a dict with the :data:`PLAN_FIELDS`).

    Examples:
        >>> describe_plan({"warmup_steps": 20, "warmup": "linear", "decay": "cosine", "min_lr": 0.0,
        ...                "total_steps": 300})
        'warmup 20 steps (linear), cosine decay to 0 at step 300'
    """
    return (
        f"warmup {plan['warmup_steps']} steps ({plan['warmup']}), {plan['decay']} decay to {plan['min_lr']:.6g} "
        f"at step {plan['total_steps']}"
    )


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
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"WarmupLR: `optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        check_int("warmup_steps", warmup_steps, 0, owner="WarmupLR")
        check_int("total_steps", total_steps, 1, owner="WarmupLR")
        self.milestones = check_schedule(
            "WarmupLR",
            warmup_steps=warmup_steps,
            total_steps=total_steps,
            warmup=warmup,
            warmup_start_factor=warmup_start_factor,
            decay=decay,
            min_lr=min_lr,
            power=power,
            gamma=gamma,
            step_size=step_size,
            milestones=milestones,
        )
        self.resume_schedule = check_choice("resume_schedule", resume_schedule, RESUME_SCHEDULES, owner="WarmupLR")
        # torch's protocol: a group's base LR is its `initial_lr` when it has one (a scheduler built before this one,
        # or a loaded optimizer state, set it), else its current LR.
        self.peak_lr = max(float(group.get("initial_lr", group["lr"])) for group in optimizer.param_groups)
        if last_epoch == -1 and min_lr > self.peak_lr:
            raise ValueError(f"WarmupLR: `min_lr` must not exceed the base LR ({self.peak_lr}), got {min_lr!r}.")
        self.warmup, self.decay = warmup, decay
        self.warmup_steps, self.total_steps = int(warmup_steps), int(total_steps)
        self.warmup_start_factor, self.min_lr = float(warmup_start_factor), float(min_lr)
        self.power, self.gamma, self.step_size = float(power), float(gamma), float(step_size)
        #: Transient (never in ``state_dict``): what was loaded since the last optimizer step, and where a resumed
        #: run's step count comes from when only the optimizer's state was restored (set by ``SGDWarmup.build``).
        self._restored: dict[str, bool] = {"optimizer": False, "scheduler": False}
        self._run_step: Callable[[], int | None] | None = None
        super().__init__(optimizer, last_epoch=last_epoch)
        _watch_optimizer(self)

    def floor(self) -> float:
        """The final LR multiplier: ``min_lr`` relative to the largest base LR at construction (0 when that is 0).

        Examples:
            >>> import torch
            >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
            >>> WarmupLR(opt, warmup_steps=0, total_steps=10, min_lr=0.05).floor()
            0.1
        """
        return self.min_lr / self.peak_lr if self.peak_lr > 0 else 0.0

    def factor(self, step: int) -> float:
        """The LR multiplier of optimizer step ``step`` (0-based), common to all param groups.

        Examples:
            >>> import torch
            >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
            >>> sched = WarmupLR(opt, warmup_steps=4, total_steps=8, decay="constant")
            >>> [sched.factor(t) for t in (0, 4, 7, 8)]
            [0.1, 1.0, 1.0, 0.0]
        """
        return lr_factor(
            step,
            warmup_steps=self.warmup_steps,
            total_steps=self.total_steps,
            warmup=self.warmup,
            warmup_start_factor=self.warmup_start_factor,
            decay=self.decay,
            floor=self.floor(),
            power=self.power,
            gamma=self.gamma,
            step_size=self.step_size,
            milestones=self.milestones,
        )

    def plan(self) -> dict[str, Any]:
        """The settings of the schedule that runs (the :data:`PLAN_FIELDS`), e.g. for :func:`describe_plan`."""
        return {name: getattr(self, name) for name in PLAN_FIELDS}

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
        """The closed form at ``last_epoch`` from the base LRs; torch calls it for ``step(epoch)``, as
        ``SequentialLR`` does when it hands over to this scheduler at a milestone: a hand-over restarts from the base
        LRs (``initial_lr``), whatever LR the previous scheduler left."""
        for group in self.optimizer.param_groups[len(self.base_lrs) :]:
            base = float(group.get("initial_lr", group["lr"]))
            group.setdefault("initial_lr", base)
            self.base_lrs.append(base)
        return self._lrs_at(self.last_epoch)[: len(self.optimizer.param_groups)]

    def _lrs_at(self, step: int) -> list[float]:
        """The LR of every group with a base LR at ``step`` (pure: changes nothing)."""
        if step >= self.total_steps:
            # min_lr exactly for the peak group (base / peak == 1.0), the same ratio for the others
            peak = self.peak_lr
            return [self.min_lr * (float(base) / peak) if peak > 0 else 0.0 for base in self.base_lrs]
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
        return {key: value for key, value in super().state_dict().items() if key not in _TRANSIENT}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a checkpoint's state (step count, base LRs, last LRs); when its plan differs, warn or re-plan.

        ``get_last_lr()`` then reports the checkpoint's last LRs, as with every torch scheduler. When the optimizer's
        state has not been restored (yet), its groups take those LRs, so the next step runs the restored schedule
        whichever of the two states is loaded first. ``resume_schedule`` (this scheduler's, not the checkpoint's)
        decides a differing plan: ``"checkpoint"`` keeps the restored plan and warns; ``"replan"`` keeps the step
        count and the base LRs of groups added mid-run, and takes the plan (lengths, shapes, ``min_lr``, base LRs of
        the constructed groups) from this scheduler.
        """
        planned, planned_bases, mode = self.plan(), [float(b) for b in self.base_lrs], self.resume_schedule
        restored, run_step = self._restored, self._run_step
        super().load_state_dict({key: value for key, value in state_dict.items() if key not in _TRANSIENT})
        self.resume_schedule, self._restored, self._run_step = mode, restored, run_step
        stored = self.plan()
        count = len(planned_bases)
        differs = stored != planned or [float(b) for b in self.base_lrs[:count]] != planned_bases
        if differs:
            self._resolve_mismatch(stored, planned, planned_bases)
        if not (differs and mode == "replan") and not restored["optimizer"]:
            groups = self.optimizer.param_groups
            for group, lr, base in zip(groups, self._last_lr, self.base_lrs, strict=False):
                group["lr"], group["initial_lr"] = float(lr), float(base)
        restored["scheduler"] = True

    def _before_optimizer_step(self) -> None:
        """At the first optimizer step after a load: an optimizer state restored without this scheduler's state is
        resolved (this scheduler's plan wins, said once), never adopted as a change made from outside."""
        restored = self._restored
        if restored["optimizer"] and not restored["scheduler"]:
            self._keep_plan()
        restored["optimizer"] = restored["scheduler"] = False

    def _keep_plan(self) -> None:
        """The optimizer's state was loaded and this scheduler's was not (a checkpoint of a plain optimizer, or with
        its ``lr_schedulers`` entry removed): the restored LRs say nothing about this plan, so the plan runs."""
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
            f"{self.peak_lr:.6g}; {describe_plan(self.plan())}) runs from {where} on, param group 0 at LR "
            f"{planned[0]:.6g} now. To continue a schedule instead, resume from a checkpoint that holds its state.",
            category=UserWarning,
        )

    def _resolve_mismatch(self, stored: dict[str, Any], planned: dict[str, Any], planned_bases: list[float]) -> None:
        if self.resume_schedule == "replan":
            self._replan(planned, planned_bases)
            return
        ended = (
            f" for good (that schedule ended at step {self.total_steps})" if self.last_epoch >= self.total_steps else ""
        )
        rank_zero_warn(
            f"WarmupLR: the checkpoint's schedule ({describe_plan(stored)}, peak LR {stored['peak_lr']:.6g}) "
            f"differs from the one this run planned ({describe_plan(planned)}, peak LR {planned['peak_lr']:.6g}), "
            "e.g. because max_epochs, max_steps, the devices or the batch size changed. The checkpoint's schedule "
            f"is kept: from step {self.last_epoch} on the first param group's LR is "
            f"{self._lrs_at(self.last_epoch)[0]:.6g}{ended}. To re-plan the schedule to this run, set "
            "`resume_schedule='replan'` (on SGDWarmup or WarmupLR).",
            category=UserWarning,
        )

    def _replan(self, planned: dict[str, Any], planned_bases: list[float]) -> None:
        self.__dict__.update(planned)
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
