"""``Schedule``: the settings of a warmup + decay plan as one immutable value that checks itself.

It gives the LR multiplier at optimizer step ``t`` (0-based: step 0 is the first optimizer step), a pure function of
``t`` and the settings (:func:`~lightning_bnsgd.optim.shapes.lr_factor`), and describes itself in one line.
``WarmupLR`` holds one (its plan, compared with a checkpoint's on resume) and saves its fields as plain data;
``SGDWarmup`` checks its schedule fields by building one (its lengths may still be unknown, ``None``, and its step
size and milestones are in epochs there).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import InitVar, dataclass
from typing import Any

from lightning_bnsgd._validation import check_choice, check_int, check_number
from lightning_bnsgd.optim.shapes import DECAY_SHAPES, DECAY_USES, WARMUP_SHAPES, DecayShape, WarmupShape, lr_factor


def check_milestones(value: object, *, owner: str | None = None, name: str = "milestones") -> list[int]:
    """Validate milestones: positive integers in strictly increasing order.

    Examples:
        >>> check_milestones([30, 60, 80])
        [30, 60, 80]
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{owner + ': ' if owner else ''}`{name}` must be a list of positive integers, got {value!r}.")
    items = [check_int(f"{name}[{i}]", m, minimum=1, owner=owner) for i, m in enumerate(value)]
    if any(b <= a for a, b in itertools.pairwise(items)):
        raise ValueError(f"{owner + ': ' if owner else ''}`{name}` must be strictly increasing, got {items!r}.")
    return items


@dataclass(frozen=True)
class Schedule:
    """The settings of a warmup + decay schedule, checked when it is made; the same names as ``WarmupLR``'s arguments.

    Wrong types raise ``TypeError``, values out of range ``ValueError``; messages start with ``owner`` (the class
    the user called). ``warmup_steps``/``total_steps`` may be ``None`` (``SGDWarmup`` reads them from the Trainer).
    Milestones must lie after ``warmup_end`` (in the milestones' own unit; default: ``warmup_steps``).

    Examples:
        >>> plan = Schedule(warmup_steps=2, total_steps=6, decay="linear", min_lr=0.25)
        >>> [plan.factor(t, peak_lr=1.0) for t in (0, 2, 4, 6)], plan.describe()
        ([0.1, 1.0, 0.625, 0.25], 'warmup 2 steps (linear), linear decay to 0.25 at step 6')
        >>> Schedule(warmup_steps=2, total_steps=10, gamma=0.0, owner="WarmupLR")
        Traceback (most recent call last):
        ...
        ValueError: WarmupLR: `gamma` must be a finite number > 0.0 and <= 1.0, got 0.0.
    """

    warmup_steps: int | None
    total_steps: int | None
    warmup: WarmupShape = "linear"
    warmup_start_factor: float = 0.1
    decay: DecayShape = "cosine"
    min_lr: float = 0.0
    power: float = 2.0
    gamma: float = 0.1
    step_size: float = 1.0
    milestones: tuple[int, ...] = ()
    owner: InitVar[str] = "Schedule"
    warmup_end: InitVar[float | None] = None

    def __post_init__(self, owner: str, warmup_end: float | None) -> None:
        warmup_steps = check_int("warmup_steps", self.warmup_steps, minimum=0, allow_none=True, owner=owner)
        total_steps = check_int("total_steps", self.total_steps, minimum=1, allow_none=True, owner=owner)
        if warmup_steps is not None and total_steps is not None and warmup_steps > total_steps:
            raise ValueError(
                f"{owner}: `warmup_steps` must not exceed `total_steps` ({total_steps}), got {warmup_steps!r}."
            )
        check_choice("warmup", self.warmup, WARMUP_SHAPES, owner=owner)
        checked = {  # in the order they are checked; then stored as checked (floats, a tuple)
            "warmup_start_factor": check_number(
                "warmup_start_factor", self.warmup_start_factor, 0.0, 1.0, min_open=True, owner=owner
            ),
            "decay": check_choice("decay", self.decay, DECAY_SHAPES, owner=owner),
            "min_lr": check_number("min_lr", self.min_lr, 0.0, owner=owner),
            "power": check_number("power", self.power, 0.0, min_open=True, owner=owner),
            "gamma": check_number("gamma", self.gamma, 0.0, 1.0, min_open=True, owner=owner),
            "step_size": check_number("step_size", self.step_size, 0.0, min_open=True, owner=owner),
            "milestones": tuple(check_milestones(self.milestones, owner=owner) if self.milestones is not None else ()),
        }
        items = checked["milestones"]
        if "milestones" in DECAY_USES[self.decay] and not items:
            raise ValueError(
                f"{owner}: `milestones` must be a non-empty list when `decay={self.decay!r}`, got {self.milestones!r}."
            )
        end = warmup_end if warmup_end is not None else warmup_steps
        if items and end is not None and items[0] <= end:
            raise ValueError(f"{owner}: `milestones` must all come after warmup (> {end}), got {list(items)!r}.")
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def state(self) -> dict[str, Any]:
        """The settings as plain data (milestones as a list), as ``WarmupLR.state_dict`` saves them."""
        return {**dataclasses.asdict(self), "milestones": list(self.milestones)}

    def floor(self, peak_lr: float) -> float:
        """The final LR multiplier: ``min_lr`` relative to ``peak_lr`` (0 when that is 0)."""
        return self.min_lr / peak_lr if peak_lr > 0 else 0.0

    @property
    def end(self) -> int:
        """The step the plan ends at (``total_steps``), for a plan whose lengths are known.

        Examples:
            >>> Schedule(warmup_steps=2, total_steps=6).end
            6
        """
        if self.total_steps is None:
            raise ValueError(f"Schedule: the lengths must be known, got {self!r}.")
        return self.total_steps

    def factor(self, step: int, peak_lr: float) -> float:
        """The LR multiplier of optimizer step ``step`` (0-based), with the floor ``min_lr`` relative to ``peak_lr``."""
        if self.warmup_steps is None or self.total_steps is None:
            raise ValueError(f"Schedule: the lengths must be known for a factor, got {self!r}.")
        settings = {name: getattr(self, name) for name in SCHEDULE_FIELDS if name != "min_lr"}
        return lr_factor(step, floor=self.floor(peak_lr), **settings)

    def describe(self) -> str:
        """One line describing the plan, as the logs and warnings say it.

        Examples:
            >>> Schedule(warmup_steps=20, total_steps=300).describe()
            'warmup 20 steps (linear), cosine decay to 0 at step 300'
        """
        return (
            f"warmup {self.warmup_steps} steps ({self.warmup}), {self.decay} decay to {self.min_lr:.6g} "
            f"at step {self.total_steps}"
        )


#: The names of the schedule's settings: ``Schedule``'s fields, ``WarmupLR``'s and ``SGDWarmup``'s arguments.
SCHEDULE_FIELDS: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(Schedule))
