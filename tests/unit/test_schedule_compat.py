"""Old checkpoints still load: a file written by the schedule code before issue 21's restructuring
(tests/fixtures/schedule_checkpoint_v1.pt, made by tests/fixtures/make_schedule_checkpoint.py) holds an ``SGDWarmup``
as ``save_hyperparameters()`` saves it, the same as plain ``pickle`` bytes, and a ``WarmupLR`` state stopped mid-run.
Today's code loads them under ``weights_only=True`` and continues with the LRs the old code ran, bit for bit."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from lightning_bnsgd.optim.schedule import DECAY_SHAPES, WarmupLR
from lightning_bnsgd.optim.sgd_warmup import SGDWarmup

FIXTURES = Path(__file__).parents[1] / "fixtures"


def _saved() -> dict[str, Any]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_schedule_checkpoint", FIXTURES / "make_schedule_checkpoint.py")
    assert spec is not None and spec.loader is not None
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    saved = torch.load(FIXTURES / "schedule_checkpoint_v1.pt", weights_only=True)
    return {"maker": maker, **saved}


def test_an_old_sgdwarmup_unpickles_equal_to_todays() -> None:
    saved = _saved()
    today = SGDWarmup(**saved["maker"].CONFIG)
    loaded = saved["hyper_parameters"]["optimizer"]  # torch.load(weights_only=True): SGDWarmup is a safe global
    assert type(loaded) is SGDWarmup and loaded == today
    assert pickle.loads(saved["pickled"]) == today
    assert loaded.lr_curve(**saved["maker"].RUN) == saved["lr_curve"]  # what the old config planned, bit for bit


def test_every_decay_shape_plans_the_lrs_the_old_code_planned() -> None:
    saved = _saved()
    maker = saved["maker"]
    assert sorted(config["decay"] for config in maker.CURVES) == sorted(DECAY_SHAPES)
    for config, curve in zip(maker.CURVES, saved["curves"], strict=True):
        assert SGDWarmup(**config).lr_curve(**maker.RUN) == curve, config  # bit for bit


def test_an_old_warmuplr_state_loads_and_continues_bit_for_bit() -> None:
    saved = _saved()
    maker, state = saved["maker"], saved["state"]
    cfg = saved["hyper_parameters"]["optimizer"]
    resolved = cfg.resolve(**maker.RUN)
    optimizer = maker._optimizer(resolved.lr)
    scheduler = WarmupLR(optimizer, **saved["scheduler_kwargs"])  # the keyword arguments SGDWarmup gave it
    assert set(scheduler.state_dict()) == set(state["scheduler"])  # the same checkpoint format
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    assert scheduler.state_dict() == state["scheduler"]  # every entry restored as saved
    assert maker._lrs(optimizer, scheduler, len(saved["lrs"]) - maker.STOP) == saved["lrs"][maker.STOP :]
