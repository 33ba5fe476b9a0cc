"""``Schedule``, the schedule's settings as one immutable value, and the registry of shapes behind it."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

from lightning_bnsgd.optim.plan import SCHEDULE_FIELDS, Schedule
from lightning_bnsgd.optim.schedule import WarmupLR
from lightning_bnsgd.optim.sgd_warmup import SGDWarmup
from lightning_bnsgd.optim.shapes import DECAY_SHAPES, DECAY_USES, DECAYS, WARMUP_SHAPES, WARMUPS, lr_factor

PLAN = {"warmup_steps": 3, "total_steps": 20, "decay": "multistep", "milestones": [8, 12], "min_lr": 0.01}


def test_a_schedule_is_an_immutable_value() -> None:
    plan = Schedule(**PLAN)  # type: ignore[arg-type]
    assert plan.milestones == (8, 12) and isinstance(plan.warmup_start_factor, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.total_steps = 30  # type: ignore[misc]
    assert plan == Schedule(**plan.state()) and hash(plan) == hash(Schedule(**plan.state()))
    assert plan.state()["milestones"] == [8, 12]  # plain data, as checkpoints hold it
    assert pickle.loads(pickle.dumps(plan)) == plan
    assert dataclasses.replace(plan, total_steps=30) != plan


def test_its_factor_is_the_closed_form_with_the_floor_relative_to_the_peak() -> None:
    plan = Schedule(**PLAN)  # type: ignore[arg-type]
    settings = {name: getattr(plan, name) for name in SCHEDULE_FIELDS if name != "min_lr"}
    for t in range(25):
        assert plan.factor(t, 0.5) == lr_factor(t, floor=0.01 / 0.5, **settings)
    assert plan.factor(30, 0.0) == 0.0  # a peak of 0: the floor is 0
    with pytest.raises(ValueError, match="lengths must be known"):
        Schedule(None, None).factor(0, 1.0)


def test_it_checks_itself_and_names_its_owner() -> None:
    with pytest.raises(ValueError, match=r"^WarmupLR: `gamma` must be"):
        Schedule(**PLAN, gamma=1.5, owner="WarmupLR")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^Schedule: `milestones`"):
        Schedule(3, 20, milestones="8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"after warmup \(> 2.5\)"):
        Schedule(None, None, milestones=(2,), warmup_end=2.5)


def test_every_shape_name_has_its_function_and_each_decay_says_what_it_reads() -> None:
    assert tuple(WARMUPS) == WARMUP_SHAPES and tuple(DECAYS) == DECAY_SHAPES
    reads = {"poly": {"power"}, "step": {"gamma", "step_size"}, "multistep": {"gamma", "milestones"}}
    reads["exponential"] = {"gamma", "step_size"}
    assert {name: frozenset(reads.get(name, ())) for name in DECAY_SHAPES} == DECAY_USES


def test_warmuplr_holds_one_schedule_and_reads_its_settings_as_attributes() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = WarmupLR(opt, **PLAN)
    assert sched.schedule == Schedule(**PLAN)  # type: ignore[arg-type]
    assert (sched.total_steps, sched.milestones, sched.decay) == (20, (8, 12), "multistep")
    assert "schedule" not in sched.state_dict() and sched.state_dict()["milestones"] == [8, 12]
    with pytest.raises(AttributeError, match="no attribute 'totl_steps'"):
        _ = sched.totl_steps


def test_sgdwarmup_gives_warmuplr_its_settings_with_the_runs_lengths() -> None:
    cfg = SGDWarmup(lr=0.5, warmup_epochs=1.0, decay="step", step_size=2.0, gamma=0.5, min_lr=0.01)
    kwargs = cfg.resolve(total_steps=40, steps_per_epoch=5).scheduler_kwargs(cfg)
    assert kwargs == {
        **{name: getattr(cfg, name) for name in SCHEDULE_FIELDS},
        "warmup_steps": 5,
        "total_steps": 40,
        "step_size": 10.0,  # epochs to steps: the shape reads step_size
        "milestones": [],
        "resume_schedule": "checkpoint",
    }
