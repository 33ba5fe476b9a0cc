"""Unit tests of ``WarmupLR`` and its pure factor functions (no Lightning)."""

from __future__ import annotations

import io
import math
from itertools import pairwise

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_bnsgd.optim.schedule import DECAY_SHAPES, WARMUP_SHAPES, WarmupLR, lr_factor


def _optimizer(*base_lrs: float) -> torch.optim.SGD:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in base_lrs]
    return torch.optim.SGD(groups, lr=base_lrs[0])


def _run(scheduler: WarmupLR, steps: int) -> list[list[float]]:
    """The LRs of every param group at each of ``steps`` optimizer steps, stepping like a training loop."""
    seen = []
    for _ in range(steps):
        seen.append([group["lr"] for group in scheduler.optimizer.param_groups])
        scheduler.optimizer.step()
        scheduler.step()
    return seen


# ---- independent reference formulas (written from the definitions, not from the module) -------------------


def _ref_warmup(t: int, w: int, shape: str, s: float) -> float:
    if shape == "linear":
        return s + (1 - s) * t / w
    if shape == "exponential":
        return math.exp(math.log(s) * (w - t) / w)
    return s


def _ref_decay(q: int, d: int, shape: str, m: float, power: float, gamma: float, size: float, ms: list[int]) -> float:
    p = q / d
    if shape == "cosine":
        return m + (1 - m) * (math.cos(math.pi * p) + 1) / 2
    if shape == "linear":
        return 1 - (1 - m) * p
    if shape == "poly":
        return m + (1 - m) * (1 - p) ** power
    if shape == "step":
        return max(m, gamma ** (q // size))
    if shape == "multistep":
        return max(m, gamma ** len([x for x in ms if x <= q]))
    if shape == "exponential":
        return max(m, math.exp(math.log(gamma) * q / size))
    return 1.0


@pytest.mark.parametrize("warmup", WARMUP_SHAPES)
@pytest.mark.parametrize("decay", DECAY_SHAPES)
def test_every_shape_matches_reference_formula(warmup: str, decay: str) -> None:
    base, min_lr, w, total = 0.8, 0.02, 7, 40
    sched = WarmupLR(
        _optimizer(base),
        warmup_steps=w,
        total_steps=total,
        warmup=warmup,  # type: ignore[arg-type]
        warmup_start_factor=0.05,
        decay=decay,  # type: ignore[arg-type]
        min_lr=min_lr,
        power=1.7,
        gamma=0.5,
        step_size=3.0,
        milestones=[12, 20, 31],
    )
    got = [lrs[0] for lrs in _run(sched, total + 5)]
    m = min_lr / base
    for t, lr in enumerate(got):
        if t < w:
            want = _ref_warmup(t, w, warmup, 0.05)
        elif t < total:
            want = _ref_decay(t - w, total - w, decay, m, 1.7, 0.5, 3.0, [12 - w, 20 - w, 31 - w])
        else:
            want = m
        assert lr == pytest.approx(base * want, rel=1e-12, abs=1e-15), (t, warmup, decay)


def test_no_warmup_starts_at_base_lr() -> None:
    sched = WarmupLR(_optimizer(0.3), warmup_steps=0, total_steps=10, decay="linear")
    got = [lrs[0] for lrs in _run(sched, 3)]
    assert got[0] == 0.3
    assert got[1] == pytest.approx(0.27)


def test_lr_holds_at_floor_past_total_steps_and_never_rises() -> None:
    """The trap of schedulers that are periodic (cosine rising again) or go negative (linear) past the end."""
    for decay in DECAY_SHAPES:
        sched = WarmupLR(_optimizer(1.0), warmup_steps=2, total_steps=10, decay=decay, min_lr=0.1, milestones=[5])
        tail = [lrs[0] for lrs in _run(sched, 30)][10:]
        assert tail == [0.1] * 20, decay


@pytest.mark.parametrize(("base", "min_lr"), [(0.1, 0.03), (0.766, 0.1954), (0.31, 0.1821), (1e-3, 7e-4)])
def test_min_lr_and_base_lr_are_hit_exactly(base: float, min_lr: float) -> None:
    for decay in DECAY_SHAPES:
        sched = WarmupLR(
            _optimizer(base, base / 3), warmup_steps=3, total_steps=9, decay=decay, min_lr=min_lr, milestones=[5]
        )
        got = _run(sched, 12)
        assert got[3][0] == base, decay  # first step after warmup: the base LR, bit for bit
        assert [lrs[0] for lrs in got[9:]] == [min_lr] * 3, decay  # min_lr bit for bit


_shapes = st.fixed_dictionaries(
    {
        "warmup": st.sampled_from(WARMUP_SHAPES),
        "decay": st.sampled_from(DECAY_SHAPES),
        "warmup_start_factor": st.floats(1e-4, 1.0),
        "power": st.floats(0.1, 5.0),
        "gamma": st.floats(0.01, 1.0),
        "step_size": st.floats(0.5, 50.0),
    }
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    shape=_shapes,
    warmup_steps=st.integers(0, 60),
    extra=st.integers(0, 200),
    floor_frac=st.sampled_from([0.0, 0.0, 0.01, 0.3, 1.0]),
    milestone_fracs=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4),
)
def test_properties_of_random_schedules(
    shape: dict, warmup_steps: int, extra: int, floor_frac: float, milestone_fracs: list[float]
) -> None:
    total = warmup_steps + extra
    if total < 1:
        total = 1
    milestones = sorted({warmup_steps + 1 + int(f * max(extra, 1)) for f in milestone_fracs})
    kwargs = dict(warmup_steps=warmup_steps, total_steps=total, floor=floor_frac, milestones=milestones, **shape)
    f = [lr_factor(t, **kwargs) for t in range(total + 20)]
    warm, decay, after = f[:warmup_steps], f[warmup_steps:total], f[total:]
    if warm:
        assert warm[0] == shape["warmup_start_factor"]
    assert all(a <= b for a, b in pairwise(warm)), "warmup must not decrease"
    assert all(0 < x <= 1 for x in warm)
    if decay:
        assert decay[0] == 1.0, "the first step after warmup runs at exactly the base LR"
        assert all(a >= b for a, b in pairwise(decay)), "decay must not increase"
        assert all(floor_frac <= x <= 1 for x in decay)
        if floor_frac == 0.0:
            assert all(x > 0 for x in decay), "no step of the run at LR 0"
    assert after == [floor_frac] * 20, "min_lr exactly at and after total_steps"


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    bases=st.lists(st.floats(1e-4, 10.0), min_size=2, max_size=4),
    warmup_steps=st.integers(0, 20),
    extra=st.integers(1, 40),
    min_frac=st.floats(0.0, 1.0),
    decay=st.sampled_from(DECAY_SHAPES),
)
def test_param_groups_keep_their_ratios(
    bases: list[float], warmup_steps: int, extra: int, min_frac: float, decay: str
) -> None:
    total = warmup_steps + extra
    sched = WarmupLR(
        _optimizer(*bases),
        warmup_steps=warmup_steps,
        total_steps=total,
        decay=decay,  # type: ignore[arg-type]
        min_lr=min_frac * max(bases),
        milestones=[warmup_steps + 1],
    )
    for lrs in _run(sched, total + 3):
        for base, lr in zip(bases, lrs, strict=True):
            assert lr / base == pytest.approx(lrs[0] / bases[0], rel=1e-9, abs=1e-12)


def test_state_dict_round_trip_gives_bitwise_identical_sequence() -> None:
    kwargs = dict(warmup_steps=6, total_steps=30, warmup="exponential", decay="cosine", min_lr=0.01)
    reference = _run(WarmupLR(_optimizer(0.5, 0.05), **kwargs), 30)  # type: ignore[arg-type]

    opt = _optimizer(0.5, 0.05)
    first = WarmupLR(opt, **kwargs)  # type: ignore[arg-type]
    part = _run(first, 4)  # stop in mid-warmup
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain data only

    opt2 = _optimizer(0.5, 0.05)
    resumed = WarmupLR(opt2, **kwargs)  # type: ignore[arg-type]
    opt2.load_state_dict(saved["opt"])
    resumed.load_state_dict(saved["sched"])
    assert resumed.last_epoch == 4
    assert part + _run(resumed, 26) == reference  # exact equality, no tolerance


def test_scheduler_honours_last_epoch_when_restored_by_torch_convention() -> None:
    opt = _optimizer(1.0)
    sched = WarmupLR(opt, warmup_steps=4, total_steps=10)
    _run(sched, 5)
    again = WarmupLR(opt, warmup_steps=4, total_steps=10, last_epoch=sched.last_epoch - 1)
    assert again.get_last_lr() == sched.get_last_lr()


@pytest.mark.parametrize(
    ("kwargs", "exc", "names"),
    [
        ({"total_steps": 0}, ValueError, "total_steps"),
        ({"warmup_steps": -1}, ValueError, "warmup_steps"),
        ({"warmup_steps": 11}, ValueError, "warmup_steps"),
        ({"warmup": "cosine"}, ValueError, "warmup"),
        ({"decay": "cyclic"}, ValueError, "decay"),
        ({"warmup_start_factor": 0.0}, ValueError, "warmup_start_factor"),
        ({"warmup_start_factor": 1.5}, ValueError, "warmup_start_factor"),
        ({"min_lr": 2.0}, ValueError, "min_lr"),
        ({"min_lr": -0.1}, ValueError, "min_lr"),
        ({"gamma": 0.0}, ValueError, "gamma"),
        ({"gamma": 1.2}, ValueError, "gamma"),
        ({"power": 0.0}, ValueError, "power"),
        ({"step_size": 0}, ValueError, "step_size"),
        ({"milestones": [8, 6]}, ValueError, "milestones"),
        ({"milestones": [0, 6]}, ValueError, "milestones"),
        ({"milestones": [2, 6]}, ValueError, "milestones"),  # inside warmup
        ({"milestones": "6"}, TypeError, "milestones"),
        ({"decay": "multistep"}, ValueError, "milestones"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, exc: type[Exception], names: str) -> None:
    settings_ = {"warmup_steps": 3, "total_steps": 10, **kwargs}
    with pytest.raises(exc, match=names):
        WarmupLR(_optimizer(1.0), **settings_)


def test_rejects_non_optimizer() -> None:
    with pytest.raises(TypeError, match="optimizer"):
        WarmupLR("sgd", warmup_steps=0, total_steps=1)  # type: ignore[arg-type]
