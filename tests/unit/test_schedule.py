"""Unit tests of ``WarmupLR`` and its pure factor functions (no Lightning)."""

from __future__ import annotations

import io
import math
import warnings
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
        ({"warmup_steps": 2.5}, TypeError, "warmup_steps"),
        ({"warmup": 1}, TypeError, "warmup"),
        ({"resume_schedule": "latest"}, ValueError, "resume_schedule"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, exc: type[Exception], names: str) -> None:
    settings_ = {"warmup_steps": 3, "total_steps": 10, **kwargs}
    with pytest.raises(exc, match=names) as info:
        WarmupLR(_optimizer(1.0), **settings_)
    assert str(info.value).startswith("WarmupLR")


def test_rejects_non_optimizer() -> None:
    with pytest.raises(TypeError, match="optimizer"):
        WarmupLR("sgd", warmup_steps=0, total_steps=1)  # type: ignore[arg-type]


def test_one_validator_for_both_classes() -> None:
    """``WarmupLR`` and ``SGDWarmup`` check the shared settings with one function: same rule, same exception type."""
    from lightning_bnsgd.optim.sgd_warmup import SGDWarmup

    for kwargs in ({"gamma": 0.0}, {"warmup_start_factor": 2.0}, {"power": "2"}, {"milestones": [3, 3]}):
        errors = []
        for build in (lambda kw: WarmupLR(_optimizer(1.0), warmup_steps=1, total_steps=10, **kw), SGDWarmup):
            with pytest.raises((TypeError, ValueError)) as info:
                build(kwargs) if build is not SGDWarmup else SGDWarmup(warmup_steps=1, **kwargs)
            errors.append((type(info.value), str(info.value).split(": ", 1)[1]))
        assert errors[0] == errors[1], errors


def test_a_group_added_mid_run_follows_the_schedule_from_its_own_lr() -> None:
    """What Lightning's ``BackboneFinetuning`` does: ``add_param_group`` between two steps, with an LR of its own."""
    opt = _optimizer(1.0)
    sched = WarmupLR(opt, warmup_steps=2, total_steps=10, decay="linear")
    seen = []
    for t in range(12):
        if t == 4:
            opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.05})
        seen.append([group["lr"] for group in opt.param_groups])
        opt.step()
        sched.step()
    assert seen[4] == [pytest.approx(0.75), 0.05]  # added: runs its own LR at the step it was added
    for t in range(5, 10):  # then keeps its ratio to the schedule of that step
        assert seen[t][1] == pytest.approx(0.05 * seen[t][0] / 0.75)
    assert seen[10:] == [[0.0, 0.0]] * 2  # and ends at the floor with the others
    assert opt.param_groups[1]["initial_lr"] == pytest.approx(0.05 / 0.75)
    assert sched.peak_lr == 1.0  # the floor stays relative to the constructed groups


def test_an_lr_changed_from_outside_persists_and_follows_the_schedule() -> None:
    opt = _optimizer(1.0, 0.1)
    sched = WarmupLR(opt, warmup_steps=0, total_steps=10, decay="linear")
    _run(sched, 3)
    opt.param_groups[1]["lr"] = 0.2  # e.g. BackboneFinetuning raising the backbone LR at an epoch start
    seen = _run(sched, 3)
    assert seen[0] == [pytest.approx(0.7), 0.2]
    assert seen[1][1] == pytest.approx(0.2 * 0.6 / 0.7) and seen[2][1] == pytest.approx(0.2 * 0.5 / 0.7)
    assert seen[1][0] == pytest.approx(0.6)  # the untouched group keeps the closed form


def _saved(opt: torch.optim.Optimizer, sched: WarmupLR) -> dict:
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_resume_with_a_group_added_before_the_checkpoint() -> None:
    kwargs = dict(warmup_steps=2, total_steps=12, decay="cosine")

    def fresh() -> tuple[torch.optim.Optimizer, WarmupLR]:
        opt = _optimizer(1.0)
        return opt, WarmupLR(opt, **kwargs)  # type: ignore[arg-type]

    def add(opt: torch.optim.Optimizer) -> None:
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1})

    opt, sched = fresh()
    first = _run(sched, 4)
    add(opt)
    full = first + _run(sched, 8)
    opt, sched = fresh()
    _run(sched, 4)
    add(opt)
    _run(sched, 2)
    saved = _saved(opt, sched)
    opt2, resumed = fresh()
    add(opt2)  # the finetuning callback restores its group (Lightning: BaseFinetuning.on_fit_start)
    opt2.load_state_dict(saved["opt"])
    resumed.load_state_dict(saved["sched"])
    assert _run(resumed, 6) == full[6:]  # exact, both groups
    _, fewer = fresh()  # a state with more groups than the optimizer has now: no error, the extra base waits
    fewer.load_state_dict(saved["sched"])
    assert len(_run(fewer, 1)[0]) == 1


def test_resume_into_a_longer_run_warns_or_replans() -> None:
    opt = _optimizer(1.0)
    sched = WarmupLR(opt, warmup_steps=2, total_steps=6, decay="linear")
    _run(sched, 6)  # a finished run
    saved = _saved(opt, sched)

    opt2 = _optimizer(1.0)
    kept = WarmupLR(opt2, warmup_steps=2, total_steps=12, decay="linear")
    opt2.load_state_dict(saved["opt"])
    with pytest.warns(UserWarning, match=r"ended at step 6.*resume_schedule='replan'"):
        kept.load_state_dict(saved["sched"])
    assert kept.total_steps == 6 and _run(kept, 2) == [[0.0], [0.0]]

    opt3 = _optimizer(1.0)
    replanned = WarmupLR(opt3, warmup_steps=2, total_steps=12, decay="linear", resume_schedule="replan")
    opt3.load_state_dict(saved["opt"])
    replanned.load_state_dict(saved["sched"])
    assert (replanned.total_steps, replanned.last_epoch) == (12, 6)
    lrs = [lrs[0] for lrs in _run(replanned, 7)]
    assert lrs[0] == pytest.approx(0.6) and lrs[5] == pytest.approx(0.1) and lrs[6] == 0.0

    opt4 = _optimizer(1.0)
    same = WarmupLR(opt4, warmup_steps=2, total_steps=6, decay="linear")
    opt4.load_state_dict(saved["opt"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(saved["sched"])  # the same plan: silent
