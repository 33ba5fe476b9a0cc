"""``SGDWarmup`` in a user's ``lightning.pytorch`` project, combined with Lightning's own features: finetuning
callbacks that add param groups, several optimizers with manual optimization, lazy modules, and extending a
finished run from its last checkpoint."""

from __future__ import annotations

import csv
import logging
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_bnsgd import SGDWarmup, param_groups

from .project import L, ResNet, UserDataModule, UserModel, quiet_trainer

STEPS_PER_EPOCH = 7  # UserDataModule: 97 samples in batches of 16


class LRRecorder(L.Callback):
    """The LR of every param group of the first optimizer, as each optimizer step uses it."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []
        self.epochs: list[int] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if optimizer is trainer.optimizers[0] or getattr(optimizer, "optimizer", None) is trainer.optimizers[0]:
            self.lrs.append([group["lr"] for group in trainer.optimizers[0].param_groups])
            self.epochs.append(trainer.current_epoch)


# ---- 12.1: Lightning's finetuning callbacks add param groups mid-run ------------------------------------------


class TransferModel(L.LightningModule):
    """Transfer learning as Lightning's docs write it: a ``backbone`` (frozen at first) and a ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = ResNet(num_classes=16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.backbone(x)))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch["image"]), batch["label"])

    def configure_optimizers(self) -> Any:
        return SGDWarmup(lr=0.05, warmup_steps=3).build(self)  # the frozen backbone is not in it yet


def _fit_transfer(
    tmp_path: Path, callbacks: list[Any], max_epochs: int = 3, ckpt_path: str | None = None, **kwargs: Any
) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    trainer = quiet_trainer(tmp_path, max_epochs=max_epochs, limit_val_batches=0, callbacks=callbacks, **kwargs)
    trainer.fit(TransferModel(), datamodule=UserDataModule(), ckpt_path=ckpt_path)
    return trainer


def test_backbone_finetuning_adds_a_group_that_follows_the_schedule(tmp_path: Path) -> None:
    recorder = LRRecorder()
    finetuning = L.callbacks.BackboneFinetuning(unfreeze_backbone_at_epoch=1)
    trainer = _fit_transfer(tmp_path, [finetuning, recorder])
    assert trainer.global_step == 3 * STEPS_PER_EPOCH
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 3  # decay, no_decay, and the backbone's group
    lrs = recorder.lrs
    first = STEPS_PER_EPOCH  # the first step of epoch 1, where the backbone joins at a tenth of the head's LR
    assert [len(lr) for lr in lrs] == [2] * first + [3] * 2 * STEPS_PER_EPOCH
    assert lrs[first][2] == pytest.approx(0.1 * lrs[first][0])
    for epoch in (1, 2):  # within each epoch the backbone keeps its ratio to the head, as the schedule decays
        steps = [lr for lr, e in zip(lrs, recorder.epochs, strict=True) if e == epoch]
        ratio = steps[0][2] / steps[0][0]
        assert all(lr[2] / lr[0] == pytest.approx(ratio) for lr in steps), epoch
        assert all(lr[2] > 0 for lr in steps[:-1])
    # Lightning adds one group for the whole backbone, with the optimizer's default weight decay (documented)
    assert groups[2]["weight_decay"] == SGDWarmup().weight_decay


def test_backbone_finetuning_resumes_with_the_added_group(tmp_path: Path) -> None:
    full = LRRecorder()
    ckpt = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)  # one per epoch
    finetuning = L.callbacks.BackboneFinetuning(unfreeze_backbone_at_epoch=1)
    _fit_transfer(tmp_path / "full", [finetuning, full, ckpt], enable_checkpointing=True)
    resumed = LRRecorder()
    _fit_transfer(  # from the end of epoch 1, with three param groups, into epoch 2
        tmp_path / "b",
        [L.callbacks.BackboneFinetuning(unfreeze_backbone_at_epoch=1), resumed],
        ckpt_path=str(tmp_path / "ckpt" / f"epoch=1-step={2 * STEPS_PER_EPOCH}.ckpt"),
    )
    assert resumed.lrs == full.lrs[2 * STEPS_PER_EPOCH :]  # every group, exactly


class SplitBackboneFinetuning(L.callbacks.BaseFinetuning):
    """A user's finetuning callback that adds the backbone through ``param_groups``: BN and biases stay undecayed."""

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        self.freeze(pl_module.backbone, train_bn=False)

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Any) -> None:
        if epoch == 1:
            self.make_trainable(pl_module.backbone)
            lr = 0.1 * optimizer.param_groups[0]["lr"]
            for group in param_groups(pl_module.backbone, 5e-4, prefix="backbone."):
                optimizer.add_param_group({**group, "lr": lr})


def test_a_finetuning_callback_using_param_groups_keeps_the_weight_decay_split(tmp_path: Path) -> None:
    recorder = LRRecorder()
    monitor = L.callbacks.LearningRateMonitor(logging_interval="step")
    logger = L.loggers.CSVLogger(tmp_path)
    trainer = _fit_transfer(
        tmp_path, [SplitBackboneFinetuning(), recorder, monitor], logger=logger, log_every_n_steps=1
    )
    groups = {group["name"]: group for group in trainer.optimizers[0].param_groups}
    model = trainer.lightning_module
    bn = {id(p) for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    no_decay = {id(p) for p in groups["backbone.no_decay"]["params"]}
    assert no_decay == bn | {id(model.backbone.fc.bias)}  # BatchNorm (by type) and the bias (by shape)
    assert {id(p) for p in groups["backbone.decay"]["params"]} == {
        id(p) for p in model.backbone.parameters() if id(p) not in no_decay
    }
    assert groups["backbone.no_decay"]["weight_decay"] == 0.0 and groups["backbone.decay"]["weight_decay"] == 5e-4
    assert recorder.lrs[-1][2] == recorder.lrs[-1][3] > 0  # both backbone groups follow the schedule together
    with (Path(logger.log_dir) / "metrics.csv").open() as f:
        assert {"lr-SGD/backbone.decay", "lr-SGD/backbone.no_decay"} <= set(next(csv.reader(f)))


# ---- 12.2: several optimizers, manual optimization ----------------------------------------------------------


class TwoOptimizerModel(L.LightningModule):
    """A GAN-like module: two parts, two optimizers, manual optimization."""

    def __init__(self, step_schedulers: bool = True) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.step_schedulers = step_schedulers
        self.generator = ResNet(num_classes=4, width=4)
        self.discriminator = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        gen_opt, disc_opt = self.optimizers()
        logits = self.generator(batch["image"])
        gen_opt.zero_grad()
        self.manual_backward(F.cross_entropy(logits, batch["label"]))
        gen_opt.step()
        disc_opt.zero_grad()
        self.manual_backward(self.discriminator(logits.detach().softmax(-1)).pow(2).mean())
        disc_opt.step()
        if self.step_schedulers:  # manual optimization: the user steps the schedulers
            for scheduler in self.lr_schedulers():
                scheduler.step()

    def configure_optimizers(self) -> Any:
        return [
            SGDWarmup(lr=0.05, warmup_steps=3).build(self, self.generator),
            SGDWarmup(lr=0.01, warmup_steps=3).build(self, self.discriminator),
        ]


def test_two_optimizers_have_their_own_columns_in_the_lr_monitor(tmp_path: Path) -> None:
    logger = L.loggers.CSVLogger(tmp_path)
    monitor = L.callbacks.LearningRateMonitor(logging_interval="step")
    trainer = quiet_trainer(tmp_path, max_epochs=2, logger=logger, callbacks=[monitor], log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not stepped.*")
        trainer.fit(TwoOptimizerModel(), datamodule=UserDataModule(drop_last=True))  # 6 batches per epoch
    with (Path(logger.log_dir) / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    gen = [float(r["lr-SGD-generator/decay"]) for r in rows if r.get("lr-SGD-generator/decay")]
    disc = [float(r["lr-SGD-discriminator/decay"]) for r in rows if r.get("lr-SGD-discriminator/decay")]
    assert len(gen) == len(disc) >= 11
    assert gen[0] == pytest.approx(0.005) and disc[0] == pytest.approx(0.001)  # each warms up from its own LR
    assert gen[3] == pytest.approx(0.05) and disc[3] == pytest.approx(0.01)
    assert [g / 5 for g in gen] == pytest.approx(disc)


def test_manual_optimization_without_scheduler_steps_warns_after_the_first_epoch(tmp_path: Path) -> None:
    trainer = quiet_trainer(tmp_path, max_epochs=2)
    with pytest.warns(UserWarning, match=r"not stepped during the first 6 optimizer steps.*self\.lr_schedulers\(\)"):
        trainer.fit(TwoOptimizerModel(step_schedulers=False), datamodule=UserDataModule(drop_last=True))


def test_build_of_a_submodule_alone_names_the_real_cause() -> None:
    model = TwoOptimizerModel()
    with pytest.raises(ValueError, match=r"ResNet is a plain torch\.nn\.Module.*build\(self, self\.generator\)"):
        SGDWarmup().build(model.generator)


# ---- 12.3: lazy modules ------------------------------------------------------------------------------------------


class LazyModel(UserModel):
    """The user's model with lazy layers: their shapes are unknown when ``configure_optimizers`` runs."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(  # type: ignore[assignment]
            nn.LazyConv2d(8, 3, padding=1),
            nn.LazyBatchNorm2d(),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.LazyLinear(4),
        )


def test_lazy_modules_get_weight_decay(tmp_path: Path) -> None:
    model = LazyModel()
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(model, datamodule=UserDataModule())
    decay, no_decay = trainer.optimizers[0].param_groups
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    assert {id(p) for p in decay["params"]} == {id(model.net[0].weight), id(model.net[5].weight)}
    assert model.net[0].weight.shape == (8, 3, 3, 3)  # materialized, and still the optimizer's parameter
    assert {id(p) for p in no_decay["params"]} == {
        id(p) for p in (model.net[0].bias, model.net[1].weight, model.net[1].bias, model.net[5].bias)
    }


# ---- 12.4: extending a finished run --------------------------------------------------------------------------


class ExtendModel(UserModel):
    def __init__(self, resume_schedule: str = "checkpoint") -> None:
        super().__init__()
        self.resume_schedule = resume_schedule

    def configure_optimizers(self) -> Any:
        return SGDWarmup(lr=0.05, warmup_steps=2, resume_schedule=self.resume_schedule).build(self)  # type: ignore[arg-type]


def _extend(tmp_path: Path, resume_schedule: str, caplog: pytest.LogCaptureFixture) -> tuple[LRRecorder, list[str]]:
    ckpt = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    kwargs: dict[str, Any] = {"limit_val_batches": 0, "enable_checkpointing": True}
    L.seed_everything(0, verbose=False)
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[ckpt], **kwargs).fit(ExtendModel(), datamodule=UserDataModule())
    recorder = LRRecorder()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        quiet_trainer(tmp_path, max_epochs=4, callbacks=[recorder], **kwargs).fit(
            ExtendModel(resume_schedule), datamodule=UserDataModule(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
        )
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SGDWarmup: peak LR")]
    return recorder, lines


def test_extending_a_finished_run_warns_with_the_fix(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.warns(UserWarning, match=r"ended at step 14\).*resume_schedule='replan'"):
        recorder, lines = _extend(tmp_path, "checkpoint", caplog)
    assert len(recorder.lrs) == 2 * STEPS_PER_EPOCH and all(lr == [0.0, 0.0] for lr in recorder.lrs)
    assert lines == [  # the line printed describes the schedule that runs: the checkpoint's, ended
        "SGDWarmup: peak LR 0.05 (lr=0.05 as given, effective batch 16); warmup 2 steps (linear), cosine decay to 0 "
        "at step 14; resumed at step 14."
    ]


def test_extending_a_finished_run_can_replan(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    recorder, lines = _extend(tmp_path, "replan", caplog)
    expected = SGDWarmup(lr=0.05, warmup_steps=2).lr_curve(4 * STEPS_PER_EPOCH)[2 * STEPS_PER_EPOCH :]
    assert [lr[0] for lr in recorder.lrs] == pytest.approx(expected)
    assert all(lr[0] > 0 for lr in recorder.lrs)
    assert lines == [
        "SGDWarmup: peak LR 0.05 (lr=0.05 as given, effective batch 16); warmup 2 steps (linear), cosine decay to 0 "
        "at step 28; resumed at step 14."
    ]


def test_the_start_up_line_is_printed_once_per_fit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        quiet_trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(UserModel(), datamodule=UserDataModule())
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("SGDWarmup")] == [
        "SGDWarmup: peak LR 0.05 (lr=0.05 as given, effective batch 16); warmup 2 steps (linear), cosine decay to 0 "
        "at step 7."
    ]
