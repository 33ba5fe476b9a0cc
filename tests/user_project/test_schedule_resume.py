"""``SGDWarmup`` over a project's life: resumed from a checkpoint written by another setup (a plain SGD fit, a
checkpoint whose scheduler state was removed), a plan shorter than the run, and the module's hyperparameters holding
the ``SGDWarmup`` itself (``save_hyperparameters()``) through ``fit(ckpt_path=...)``, ``load_from_checkpoint`` and
``torch.load(weights_only=True)``."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from inspect import signature
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_bnsgd import SGDWarmup, param_groups

from .project import L, UserDataModule, UserModel, quiet_trainer
from .test_optimizer import STEPS_PER_EPOCH, LRRecorder

PLAN = SGDWarmup(lr=0.025, warmup_steps=2)  # the plan


class PlainSGDModel(UserModel):
    """The same project before it adopted SGDWarmup: a plain SGD at a fixed LR (same param groups)."""

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(param_groups(self, 5e-4), lr=0.025, momentum=0.9)


class WarmupModel(UserModel):
    def configure_optimizers(self) -> Any:
        return PLAN.build(self)


def _fit(
    tmp_path: Path, model: L.LightningModule, max_epochs: int, ckpt_path: str | None = None, **kwargs: Any
) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    trainer = quiet_trainer(tmp_path, max_epochs=max_epochs, limit_val_batches=0, **kwargs)
    trainer.fit(model, datamodule=UserDataModule(), ckpt_path=ckpt_path)
    return trainer


def _resume(tmp_path: Path, ckpt: Path, caplog: pytest.LogCaptureFixture) -> tuple[list[float], list[str]]:
    recorder = LRRecorder()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        L.seed_everything(0, verbose=False)
        quiet_trainer(tmp_path / "resumed", max_epochs=3, limit_val_batches=0, callbacks=[recorder]).fit(
            WarmupModel(), datamodule=UserDataModule(), ckpt_path=str(ckpt)
        )
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SGDWarmup: peak LR")]
    return [lrs[0] for lrs in recorder.lrs], lines


# ---- item 1: a restored optimizer LR never multiplies the plan -------------------------------------------------


def test_a_resume_from_a_plain_sgd_checkpoint_runs_the_configured_plan(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(tmp_path / "plain", PlainSGDModel(), 1, callbacks=[ckpt], enable_checkpointing=True)
    with pytest.warns(
        UserWarning,
        match=r"without a WarmupLR state.*own plan \(peak LR 0\.025; .*\) runs from step 7 \(the resumed fit\'s step\)",
    ):
        lrs, lines = _resume(tmp_path, tmp_path / "ckpt" / "last.ckpt", caplog)
    expected = PLAN.lr_curve(3 * STEPS_PER_EPOCH)[STEPS_PER_EPOCH:]  # the plan, at the run's steps 7..20
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert max(lrs) <= 0.025  # never above the configured peak (before the fix: 0.25)
    assert lines == [
        "SGDWarmup: peak LR 0.025 (lr=0.025 as given, effective batch 16); warmup 2 steps (linear), cosine decay to 0 "
        "at step 21; resumed at step 7."
    ]


def test_a_resume_from_a_checkpoint_without_its_scheduler_state_runs_the_configured_plan(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)  # one per epoch
    _fit(tmp_path / "short", WarmupModel(), 2, callbacks=[ckpt], enable_checkpointing=True)  # a 14-step plan
    state = torch.load(tmp_path / "ckpt" / f"epoch=0-step={STEPS_PER_EPOCH}.ckpt", weights_only=True)
    restored = state["optimizer_states"][0]["param_groups"][0]["lr"]
    assert restored == pytest.approx(PLAN.lr_curve(2 * STEPS_PER_EPOCH)[STEPS_PER_EPOCH])
    state["lr_schedulers"] = []  # the entry removed: Lightning restores the optimizer, not the scheduler
    torch.save(state, tmp_path / "stripped.ckpt")
    with pytest.warns(UserWarning, match=rf"loaded \(param group 0 at LR {restored:.6g}\) without a WarmupLR state"):
        lrs, _ = _resume(tmp_path, tmp_path / "stripped.ckpt", caplog)  # into a 21-step plan
    assert lrs == pytest.approx(PLAN.lr_curve(3 * STEPS_PER_EPOCH)[STEPS_PER_EPOCH:], rel=1e-12)


def test_a_resume_with_its_scheduler_state_continues_silently(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    full = LRRecorder()
    ckpt = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    _fit(tmp_path / "full", WarmupModel(), 3, callbacks=[ckpt, full], enable_checkpointing=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(WarmupLR|SGDWarmup).*")
        lrs, _ = _resume(tmp_path, tmp_path / "ckpt" / f"epoch=0-step={STEPS_PER_EPOCH}.ckpt", caplog)
    assert lrs == [lr[0] for lr in full.lrs[STEPS_PER_EPOCH:]]  # exactly


# ---- item 5: a plan shorter than the run -----------------------------------------------------------------------


class ShortPlanModel(UserModel):
    def __init__(self, total_steps: int, min_lr: float = 0.0) -> None:
        super().__init__()
        self.total_steps, self.min_lr = total_steps, min_lr

    def configure_optimizers(self) -> Any:
        return SGDWarmup(lr=0.1, warmup_steps=2, total_steps=self.total_steps, min_lr=self.min_lr).build(self)


def test_a_plan_shorter_than_the_run_says_so(tmp_path: Path) -> None:
    with pytest.warns(
        UserWarning,
        match=r"SGDWarmup: `total_steps`=10 is shorter than this run's 21 optimizer "
        r"steps.*the last 11 steps run at LR 0, so they do not train.*max_steps=10",
    ):
        _fit(tmp_path, ShortPlanModel(10), 3)
    with pytest.warns(UserWarning, match=r"`total_steps`=10 is shorter.*the last 11 steps run at min_lr=0\.001"):
        _fit(tmp_path, ShortPlanModel(10, min_lr=0.001), 3)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*SGDWarmup.*")
        _fit(tmp_path, ShortPlanModel(21), 3)  # the plan covers the run: silent


# ---- item 7: save_hyperparameters() with an `optimizer: SGDWarmup` argument -------------------------------------


class ConfigurableModel(UserModel):
    """docs/usage.md's configurable model, with Lightning's usual ``save_hyperparameters()``."""

    def __init__(self, optimizer: SGDWarmup | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.optimizer_config = optimizer if optimizer is not None else SGDWarmup()

    def configure_optimizers(self) -> Any:
        return self.optimizer_config.build(self)


def test_hyperparameters_holding_an_sgdwarmup_load_with_weights_only(tmp_path: Path) -> None:
    config = SGDWarmup(lr=0.05, warmup_steps=3, decay="multistep", milestones=[1], min_lr=0.001)
    ckpt = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(tmp_path / "a", ConfigurableModel(config), 1, callbacks=[ckpt], enable_checkpointing=True)
    path = tmp_path / "ckpt" / "last.ckpt"

    state = torch.load(path, weights_only=True)  # torch's default since 2.6
    assert state["hyper_parameters"]["optimizer"] == config
    load = f"import torch, lightning_bnsgd; print(torch.load({str(path)!r}, weights_only=True)['hyper_parameters'])"
    fresh = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=120, check=False)
    assert fresh.returncode == 0 and "SGDWarmup(lr=0.05" in fresh.stdout, (
        fresh.stderr
    )  # importing the package is enough

    strict_load = (
        {"weights_only": True} if "weights_only" in signature(ConfigurableModel.load_from_checkpoint).parameters else {}
    )
    loaded = ConfigurableModel.load_from_checkpoint(path, **strict_load)
    assert loaded.optimizer_config == config and loaded.hparams.optimizer == config

    recorder = LRRecorder()
    trainer = _fit(tmp_path / "b", ConfigurableModel(config), 2, callbacks=[recorder], ckpt_path=str(path))
    assert trainer.global_step == 2 * STEPS_PER_EPOCH and len(recorder.lrs) == STEPS_PER_EPOCH
