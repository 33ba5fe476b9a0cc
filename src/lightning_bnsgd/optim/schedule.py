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
from collections.abc import Sequence
from typing import Literal, get_args

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_bnsgd._validation import check_choice, is_int, is_number

WarmupShape = Literal["linear", "exponential", "constant"]
DecayShape = Literal["cosine", "linear", "poly", "step", "multistep", "exponential", "constant"]
WARMUP_SHAPES: tuple[str, ...] = get_args(WarmupShape)
DECAY_SHAPES: tuple[str, ...] = get_args(DecayShape)


def check_warmup_start_factor(value: object, name: str = "warmup_start_factor") -> float:
    """Validate a warmup start factor: a number in (0, 1].

    Examples:
        >>> check_warmup_start_factor(0.1)
        0.1
    """
    if not is_number(value) or not 0.0 < float(value) <= 1.0:  # type: ignore[arg-type]
        raise ValueError(f"`{name}` must be a number in (0, 1], got {value!r}.")
    return float(value)  # type: ignore[arg-type]


def check_gamma(value: object, name: str = "gamma") -> float:
    """Validate a decay factor ``gamma``: a number in (0, 1].

    Examples:
        >>> check_gamma(0.1)
        0.1
    """
    if not is_number(value) or not 0.0 < float(value) <= 1.0:  # type: ignore[arg-type]
        raise ValueError(f"`{name}` must be a number in (0, 1], got {value!r}.")
    return float(value)  # type: ignore[arg-type]


def check_milestones(value: object, name: str = "milestones") -> list[int]:
    """Validate milestones: positive integers in strictly increasing order.

    Examples:
        >>> check_milestones([30, 60, 80])
        [30, 60, 80]
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"`{name}` must be a list of positive integers, got {value!r}.")
    items = list(value)
    if not all(is_int(m) and m > 0 for m in items):
        raise ValueError(f"`{name}` must hold positive integers only, got {items!r}.")
    if any(b <= a for a, b in itertools.pairwise(items)):
        raise ValueError(f"`{name}` must be strictly increasing, got {items!r}.")
    return [int(m) for m in items]


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


class WarmupLR(LRScheduler):
    """Per-step warmup, then decay to ``min_lr`` at ``total_steps``: the LR is a closed form of the step.

    Step it once per optimizer step (Lightning: ``"interval": "step"``). The LR of optimizer step ``t``
    (0-based) is ``base_lr * lr_factor(t, ...)`` for every param group, with that group's own base LR. The
    schedule keeps no state but the step count, so a resumed run gets the bitwise-identical LR sequence.

    Args:
        optimizer: the wrapped optimizer; each group's current ``lr`` is its base (peak) LR.
        warmup_steps: steps of warmup (0: none). Step ``warmup_steps`` runs at exactly the base LR.
        total_steps: steps of the whole run, warmup included. The LR reaches ``min_lr`` exactly here and
            stays there.
        warmup: warmup shape: ``"linear"``, ``"exponential"`` or ``"constant"``.
        warmup_start_factor: multiplier of the first step, in (0, 1] (0.1: the first step runs at a tenth of
            the base LR). Goyal et al. warm up from the small-batch LR: use ``1 / k`` for a batch ``k`` times
            the reference.
        decay: decay shape after warmup: ``"cosine"``, ``"linear"``, ``"poly"``, ``"step"``, ``"multistep"``,
            ``"exponential"`` or ``"constant"``.
        min_lr: final LR of the group with the largest base LR (the other groups' floors scale with their base
            LR, so all groups keep their ratios). Must not exceed the largest base LR.
        power: exponent of the ``"poly"`` decay (> 0).
        gamma: factor in (0, 1] of the ``"step"``, ``"multistep"`` and ``"exponential"`` decays.
        step_size: ``"step"``: steps between two multiplications by ``gamma``, counted from the end of warmup;
            ``"exponential"``: steps over which the LR falls by ``gamma`` (default 1: ``gamma`` per step).
        milestones: ``"multistep"``: absolute step numbers (counted from step 0, all after warmup) at which
            the LR is multiplied by ``gamma``.
        last_epoch: index of the last step taken, as in every torch scheduler (-1: start fresh).

    Raises:
        ValueError: for invalid settings (each message names the argument, the value and what is allowed).

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
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        if not is_int(total_steps) or total_steps < 1:
            raise ValueError(f"`total_steps` must be an integer >= 1, got {total_steps!r}.")
        if not is_int(warmup_steps) or warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be an integer >= 0, got {warmup_steps!r}.")
        if warmup_steps > total_steps:
            raise ValueError(f"`warmup_steps` must not exceed `total_steps` ({total_steps}), got {warmup_steps!r}.")
        self.warmup = check_choice("warmup", warmup, WARMUP_SHAPES)
        self.decay = check_choice("decay", decay, DECAY_SHAPES)
        self.warmup_start_factor = check_warmup_start_factor(warmup_start_factor)
        if not is_number(min_lr) or min_lr < 0:
            raise ValueError(f"`min_lr` must be a number >= 0, got {min_lr!r}.")
        if not is_number(power) or power <= 0:
            raise ValueError(f"`power` must be a number > 0, got {power!r}.")
        self.gamma = check_gamma(gamma)
        if not is_number(step_size) or step_size <= 0:
            raise ValueError(f"`step_size` must be a number > 0 (in steps), got {step_size!r}.")
        self.milestones = check_milestones(milestones)
        if self.milestones and self.milestones[0] <= warmup_steps:
            raise ValueError(
                f"`milestones` must all come after warmup (> warmup_steps={warmup_steps}), got {self.milestones!r}."
            )
        if self.decay == "multistep" and not self.milestones:
            raise ValueError("`milestones` must be a non-empty list when `decay='multistep'`, got [].")
        peak = max(float(group["lr"]) for group in optimizer.param_groups)
        if last_epoch == -1 and min_lr > peak:
            raise ValueError(f"`min_lr` must not exceed the base LR ({peak}), got {min_lr!r}.")
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_lr = float(min_lr)
        self.power = float(power)
        self.step_size = float(step_size)
        super().__init__(optimizer, last_epoch=last_epoch)

    def floor(self) -> float:
        """The final LR multiplier: ``min_lr`` relative to the largest base LR (0 when that is 0).

        Examples:
            >>> import torch
            >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
            >>> WarmupLR(opt, warmup_steps=0, total_steps=10, min_lr=0.05).floor()
            0.1
        """
        peak = max(float(base) for base in self.base_lrs)
        return self.min_lr / peak if peak > 0 else 0.0

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

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """LRs of the current step ``last_epoch`` for every param group (closed form)."""
        return self._get_closed_form_lr()

    def _get_closed_form_lr(self) -> list[float]:
        if self.last_epoch >= self.total_steps:
            # min_lr exactly for the peak group (base / peak == 1.0), the same ratio for the others
            peak = max(float(base) for base in self.base_lrs)
            return [self.min_lr * (float(base) / peak) if peak > 0 else 0.0 for base in self.base_lrs]
        factor = self.factor(self.last_epoch)
        return [float(base) * factor for base in self.base_lrs]
