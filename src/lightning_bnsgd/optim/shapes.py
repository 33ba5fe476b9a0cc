"""The warmup and decay shapes of ``WarmupLR`` as small pure functions, and :func:`lr_factor` over them.

The LR multiplier at optimizer step ``t`` (0-based: step 0 is the first optimizer step) is :func:`lr_factor`:

* :func:`warmup_factor` for ``t < warmup_steps``: rises from ``warmup_start_factor`` towards 1;
* :func:`decay_factor` for ``warmup_steps <= t < total_steps``: starts at exactly 1 and falls to the floor;
* from ``t = total_steps`` on, the factor is the floor ``min_lr / max(base LRs)`` and stays there.

A warmup shape ``_warmup_<name>(frac, start)`` maps ``frac = step / warmup_steps`` (in ``[0, 1)``) and the start
factor to the multiplier. A decay shape ``_decay_<name>(step, frac, floor, ...)`` maps ``step`` (steps since the end
of warmup, ``0 < step < decay_steps``), ``frac = step / decay_steps`` and the floor to the multiplier; the settings
it reads (``power``, ``gamma``, ``step_size``, ``milestones``) are its keyword-only parameters, which is how
``Schedule`` and ``SGDWarmup`` know what a shape needs (``DECAY_USES``).

To add a decay shape: write its function ``_decay_<name>`` here and add ``"<name>"`` to ``DecayShape``. The
registries are built from the ``Literal``'s names, so a name without its function fails at import.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

WarmupShape = Literal["linear", "exponential", "constant"]
DecayShape = Literal["cosine", "linear", "poly", "step", "multistep", "exponential", "constant"]
WARMUP_SHAPES: tuple[str, ...] = get_args(WarmupShape)
DECAY_SHAPES: tuple[str, ...] = get_args(DecayShape)


def _warmup_linear(frac: float, start: float) -> float:
    """``start + (1 - start) * frac``."""
    return start + (1.0 - start) * frac


def _warmup_exponential(frac: float, start: float) -> float:
    """``start ** (1 - frac)``: a straight line on a log scale."""
    return start ** (1.0 - frac)


def _warmup_constant(frac: float, start: float) -> float:
    """``start`` for the whole warmup (Goyal et al.'s "constant warmup")."""
    return start


def _decay_cosine(step: int, frac: float, floor: float, **_: Any) -> float:
    """``floor + (1 - floor) * (1 + cos(pi * frac)) / 2``."""
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


def _decay_linear(step: int, frac: float, floor: float, **_: Any) -> float:
    """``floor + (1 - floor) * (1 - frac)``."""
    return floor + (1.0 - floor) * (1.0 - frac)


def _decay_poly(step: int, frac: float, floor: float, *, power: float, **_: Any) -> float:
    """``floor + (1 - floor) * (1 - frac) ** power``."""
    return floor + (1.0 - floor) * (1.0 - frac) ** power


def _decay_step(step: int, frac: float, floor: float, *, gamma: float, step_size: float, **_: Any) -> float:
    """``gamma ** floor(step / step_size)``, never below ``floor``."""
    return max(floor, gamma ** math.floor(step / step_size))


def _decay_multistep(
    step: int, frac: float, floor: float, *, gamma: float, milestones: Sequence[int], **_: Any
) -> float:
    """``gamma ** k``, ``k`` the milestones already passed (counted in steps after warmup), never below ``floor``."""
    return max(floor, gamma ** sum(1 for m in milestones if step >= m))


def _decay_exponential(step: int, frac: float, floor: float, *, gamma: float, step_size: float, **_: Any) -> float:
    """``gamma ** (step / step_size)`` (``gamma`` per ``step_size`` steps), never below ``floor``."""
    return max(floor, gamma ** (step / step_size))


def _decay_constant(step: int, frac: float, floor: float, **_: Any) -> float:
    """1.0 until the end."""
    return 1.0


#: The shapes' functions by name, found as ``_warmup_<name>`` and ``_decay_<name>`` for every name of the ``Literal``.
WARMUPS: dict[str, Callable[[float, float], float]] = {name: globals()[f"_warmup_{name}"] for name in WARMUP_SHAPES}
DECAYS: dict[str, Callable[..., float]] = {name: globals()[f"_decay_{name}"] for name in DECAY_SHAPES}
#: The settings each decay shape reads (its keyword-only parameters), e.g. ``DECAY_USES["step"]``.
DECAY_USES: dict[str, frozenset[str]] = {
    name: frozenset(key for key, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY)
    for name, fn in DECAYS.items()
}


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
    if shape not in WARMUPS:
        raise ValueError(f"`warmup` must be one of {WARMUP_SHAPES}, got {shape!r}.")
    return WARMUPS[shape](max(step, 0) / warmup_steps, start_factor)


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
    if shape not in DECAYS:
        raise ValueError(f"`decay` must be one of {DECAY_SHAPES}, got {shape!r}.")
    settings = {"power": power, "gamma": gamma, "step_size": step_size, "milestones": milestones}
    return DECAYS[shape](step, step / decay_steps, floor, **settings)


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
    shifted = [m - warmup_steps for m in milestones]
    args = (step - warmup_steps, total_steps - warmup_steps, decay, floor)
    return decay_factor(*args, power=power, gamma=gamma, step_size=step_size, milestones=shifted)
