"""``WarmupLR`` held to torch's ``LRScheduler`` protocol, checked the way torch's own scheduler tests check theirs:
closed form equals stepping, ``state_dict`` round trip, ``get_last_lr`` after a load, ``SequentialLR`` and
``ChainedScheduler`` in both orders, a group added mid-run, and base LRs taken from an existing ``initial_lr``.
Also how ``WarmupLR`` tells an LR changed from outside (adopted) from a hand-over and from a restored state."""

from __future__ import annotations

import gc
import io
import warnings
from typing import Any

import pytest
import torch
from torch.optim.lr_scheduler import ChainedScheduler, ConstantLR, ExponentialLR, LinearLR, SequentialLR

from lightning_bnsgd.optim.schedule import WarmupLR, lr_factor

PLAN: dict[str, Any] = {"warmup_steps": 3, "total_steps": 12, "decay": "cosine", "min_lr": 0.001}


def _optimizer(*lrs: float) -> torch.optim.SGD:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0], momentum=0.9)


def _lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    return [group["lr"] for group in optimizer.param_groups]


def _train(optimizer: torch.optim.Optimizer, scheduler: Any, steps: int) -> list[list[float]]:
    """The LRs each of ``steps`` optimizer steps ran at, stepping like a training loop (optimizer, then scheduler)."""
    seen = []
    for _ in range(steps):
        optimizer.step()
        seen.append(_lrs(optimizer))  # read after the step: what it ran at, its step pre-hooks included
        scheduler.step()
    return seen


def _planned(base: float, t: int, **plan: Any) -> float:
    """The LR of step ``t`` from the definition: ``base * lr_factor(t)`` with the floor ``min_lr / base``."""
    settings = {**PLAN, **plan}
    floor = settings.pop("min_lr") / base
    return base * lr_factor(t, floor=floor, **settings)


def _round_trip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ---- closed form equals stepping ----------------------------------------------------------------------------


@pytest.mark.parametrize("decay", ["cosine", "linear", "multistep", "exponential"])
def test_closed_form_equals_stepping(decay: str) -> None:
    """As torch's tests compare a stepped scheduler with ``step(epoch)`` of a second one, at every epoch."""
    plan = {**PLAN, "decay": decay, "milestones": [6, 9], "gamma": 0.5}
    stepped_opt, closed_opt = _optimizer(0.1, 0.02), _optimizer(0.1, 0.02)
    stepped, closed = WarmupLR(stepped_opt, **plan), WarmupLR(closed_opt, **plan)
    for t in range(16):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's deprecation warning for step(epoch)
            closed.step(t)
        assert _lrs(closed_opt) == _lrs(stepped_opt) == stepped.get_last_lr(), t
        assert closed.get_last_lr() == stepped.get_last_lr()
        stepped_opt.step()
        stepped.step()


# ---- state_dict, load_state_dict, get_last_lr ------------------------------------------------------------------


def test_state_dict_round_trips_and_get_last_lr_after_load_is_the_checkpoints() -> None:
    opt = _optimizer(0.1, 0.02)
    sched = WarmupLR(opt, **PLAN)
    _train(opt, sched, 5)
    saved = _round_trip({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()})

    opt2 = _optimizer(0.1, 0.02)
    other = WarmupLR(opt2, **PLAN)  # the optimizer's state is not loaded: its LRs are those of step 0
    other.load_state_dict(saved["scheduler"])
    assert other.get_last_lr() == sched.get_last_lr() == saved["scheduler"]["_last_lr"]
    assert other.state_dict() == sched.state_dict()  # the round trip, every entry
    assert _lrs(opt2) == _lrs(opt)  # the next step runs the restored schedule
    assert _train(opt2, other, 7) == _train(opt, sched, 7)

    opt3 = _optimizer(0.1, 0.02)  # Lightning's order: the optimizer first, then the scheduler
    third = WarmupLR(opt3, **PLAN)
    opt3.load_state_dict(saved["optimizer"])
    third.load_state_dict(saved["scheduler"])
    assert third.get_last_lr() == saved["scheduler"]["_last_lr"] and third.state_dict() == saved["scheduler"]


def test_the_state_is_the_schedule_only() -> None:
    opt = _optimizer(0.1)
    sched = WarmupLR(opt, **PLAN)
    assert not {"_restored", "_run_step", "optimizer"} & set(sched.state_dict())


# ---- base LRs from initial_lr ---------------------------------------------------------------------------------


def test_base_lrs_come_from_an_existing_initial_lr() -> None:
    """torch keeps a group's ``initial_lr``: a second scheduler on an optimizer starts from it, not from the LR the
    first one set (here: ConstantLR left 0.01 with ``initial_lr`` 0.1)."""
    opt = _optimizer(0.1)
    ConstantLR(opt, factor=0.1, total_iters=4)
    assert _lrs(opt) == [pytest.approx(0.01)]
    sched = WarmupLR(opt, **{**PLAN, "min_lr": 0.005})  # valid: 0.005 <= the base LR 0.1
    assert sched.base_lrs == [0.1] and sched.peak_lr == 0.1
    assert sched.floor() == pytest.approx(0.05)


def test_an_optimizer_loaded_before_the_scheduler_was_built_resumes_silently() -> None:
    """The order torch documents as safe too: the optimizer's state first, then the scheduler is built and loaded."""
    opt = _optimizer(0.1)
    sched = WarmupLR(opt, **PLAN)
    _train(opt, sched, 6)
    saved = _round_trip({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
    opt2 = _optimizer(0.1)
    opt2.load_state_dict(saved["optimizer"])  # its group now runs the LR of step 6, with initial_lr 0.1
    again = WarmupLR(opt2, **PLAN)
    assert again.peak_lr == 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same plan: no "the checkpoint's schedule differs"
        again.load_state_dict(saved["scheduler"])
    assert _train(opt2, again, 8) == _train(opt, sched, 8)

    opt3 = _optimizer(0.1)
    opt3.load_state_dict(saved["optimizer"])
    replanned = WarmupLR(opt3, **{**PLAN, "total_steps": 24}, resume_schedule="replan")
    replanned.load_state_dict(saved["scheduler"])
    assert _lrs(opt3) == [pytest.approx(_planned(0.1, 6, total_steps=24))]  # the right peak: 0.1


# ---- SequentialLR -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "first",
    [lambda opt: ConstantLR(opt, factor=0.1, total_iters=4), lambda opt: LinearLR(opt, 0.1, total_iters=4)],
    ids=["ConstantLR", "LinearLR"],
)
def test_a_later_warmup_restarts_from_its_base_lr_at_the_milestone(first: Any) -> None:
    opt = _optimizer(0.05, 0.01)
    sequence = SequentialLR(opt, [first(opt), WarmupLR(opt, **{**PLAN, "warmup_steps": 0})], milestones=[4])
    seen = _train(opt, sequence, 20)
    for t in range(4, 20):  # from the milestone on: WarmupLR's closed form of (t - 4), from the base LRs
        want = [_planned(0.05, t - 4, warmup_steps=0), _planned(0.05, t - 4, warmup_steps=0) / 5]
        assert seen[t] == pytest.approx(want, rel=1e-12), t
    assert seen[4] == [0.05, 0.01]  # exactly the base LRs at the hand-over
    assert seen[-1][0] == pytest.approx(0.001)  # and min_lr at the end


def test_a_warmup_followed_by_a_torch_scheduler_hands_over_at_the_milestone() -> None:
    opt = _optimizer(0.1)
    sequence = SequentialLR(opt, [WarmupLR(opt, **PLAN), ExponentialLR(opt, gamma=0.5)], milestones=[8])
    seen = [lrs[0] for lrs in _train(opt, sequence, 12)]
    assert seen[:8] == pytest.approx([_planned(0.1, t) for t in range(8)], rel=1e-12)
    assert seen[8:] == pytest.approx([0.1 * 0.5**k for k in range(4)], rel=1e-12)  # from its base LR, as torch


def test_two_warmups_in_sequence_each_start_from_the_base_lr() -> None:
    opt = _optimizer(0.2)
    short = WarmupLR(opt, warmup_steps=2, total_steps=4, decay="linear", min_lr=0.02)
    sequence = SequentialLR(opt, [short, WarmupLR(opt, **PLAN)], milestones=[4])
    seen = [lrs[0] for lrs in _train(opt, sequence, 16)]
    assert seen[:4] == pytest.approx([0.02, 0.11, 0.2, 0.11], rel=1e-12)
    assert seen[4:] == pytest.approx([_planned(0.2, t) for t in range(12)], rel=1e-12)


def test_a_sequence_resumes_after_the_milestone_exactly() -> None:
    def build() -> tuple[torch.optim.Optimizer, SequentialLR]:
        opt = _optimizer(0.1, 0.01)
        first = LinearLR(opt, 0.1, total_iters=4)
        return opt, SequentialLR(opt, [first, WarmupLR(opt, **PLAN)], milestones=[4])

    opt, sequence = build()
    _train(opt, sequence, 7)  # three steps past the hand-over
    saved = _round_trip({"optimizer": opt.state_dict(), "scheduler": sequence.state_dict()})
    opt2, again = build()
    opt2.load_state_dict(saved["optimizer"])
    again.load_state_dict(saved["scheduler"])
    assert again.get_last_lr() == sequence.get_last_lr()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*WarmupLR.*")
        assert _train(opt2, again, 12) == _train(opt, sequence, 12)


# ---- ChainedScheduler ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("warmup_first", [True, False])
def test_chained_with_a_torch_scheduler_multiplies_in_both_orders(warmup_first: bool) -> None:
    """Chained schedulers compose their factors, whatever the order (torch's ChainedScheduler contract)."""
    opt = _optimizer(0.1, 0.03)
    if warmup_first:
        schedulers: list[Any] = [WarmupLR(opt, **PLAN), ExponentialLR(opt, gamma=0.9)]
    else:
        schedulers = [ExponentialLR(opt, gamma=0.9), WarmupLR(opt, **PLAN)]
    chain = ChainedScheduler(schedulers)
    seen = _train(opt, chain, 15)
    for t, lrs in enumerate(seen):
        want = _planned(0.1, t) * 0.9**t
        assert lrs == pytest.approx([want, want * 0.3], rel=1e-9), t
    assert chain.get_last_lr() == _lrs(opt)


# ---- a group added mid-run ------------------------------------------------------------------------------------


def test_a_group_added_mid_run_runs_its_lr_then_the_schedule_and_resumes() -> None:
    opt = _optimizer(0.1)
    sched = WarmupLR(opt, **PLAN)
    _train(opt, sched, 5)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.004})
    seen = _train(opt, sched, 3)
    assert seen[0][1] == 0.004  # the step it was added at runs its own LR
    ratio = 0.004 / _planned(0.1, 5)
    assert [lrs[1] for lrs in seen[1:]] == pytest.approx([ratio * lrs[0] for lrs in seen[1:]], rel=1e-12)
    saved = _round_trip({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
    opt2 = _optimizer(0.1)
    again = WarmupLR(opt2, **PLAN)
    opt2.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.004})  # as a callback restores it
    opt2.load_state_dict(saved["optimizer"])
    again.load_state_dict(saved["scheduler"])
    assert again.get_last_lr() == sched.get_last_lr()
    assert _train(opt2, again, 6) == _train(opt, sched, 6)


# ---- what is adopted and what is not ----------------------------------------------------------------------------


def test_an_lr_changed_between_steps_is_adopted_a_restored_one_is_not() -> None:
    """A callback's change (the LR differs from ``get_last_lr()`` with no load in between) persists and follows the
    schedule; an optimizer state loaded without the scheduler's never rescales the plan."""
    opt = _optimizer(0.1)
    sched = WarmupLR(opt, **PLAN)
    _train(opt, sched, 4)
    opt.param_groups[0]["lr"] = 0.05  # e.g. BackboneFinetuning between two steps
    seen = _train(opt, sched, 2)
    assert seen[0] == [0.05] and seen[1][0] == pytest.approx(0.05 * _planned(0.1, 5) / _planned(0.1, 4))

    plain = _optimizer(0.1)  # a checkpoint of a plain SGD run: LR 0.1, no initial_lr
    plain.step()
    opt2 = _optimizer(0.1)
    fresh = WarmupLR(opt2, **PLAN)
    opt2.load_state_dict(_round_trip(plain.state_dict()))
    with pytest.warns(
        UserWarning, match=r"without a WarmupLR state.*own plan \(peak LR 0\.1; .*\) runs from its step 0 on"
    ):
        seen = _train(opt2, fresh, 12)
    assert [lrs[0] for lrs in seen] == pytest.approx([_planned(0.1, t) for t in range(12)], rel=1e-12)
    assert opt2.param_groups[0]["initial_lr"] == 0.1


def test_an_optimizer_outlives_its_replaced_scheduler() -> None:
    """As when Lightning's StochasticWeightAveraging swaps the scheduler: the optimizer keeps stepping and loading,
    and the hooks registered after the scheduler's still run."""
    opt = _optimizer(0.1)
    sched = WarmupLR(opt, **PLAN)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda *_: calls.append("later hook"))
    state = opt.state_dict()
    del sched
    gc.collect()
    opt.step()
    opt.load_state_dict(state)
    opt.step()
    assert calls == ["later hook"] * 2
