"""``BNRecalibration`` in a user's ``lightning.pytorch`` project: it never changes the training run, fails early on
batches it cannot feed, respects the debug limits, and handles tiny batches."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_bnsgd import BNRecalibration, BNStatsMonitor

from .project import L, UserDataModule, UserModel, exact_first_bn_statistics, quiet_trainer, recalibration_forward


def _fit(tmp_path: Path, callbacks: list[Any], **trainer_kwargs: Any) -> UserModel:
    L.seed_everything(7, verbose=False)
    model = UserModel()
    kwargs = {"max_epochs": 3, "limit_val_batches": 1, **trainer_kwargs}
    quiet_trainer(tmp_path, callbacks=callbacks, **kwargs).fit(model, datamodule=UserDataModule())
    return model


def _shuffled_train_loader() -> torch.utils.data.DataLoader:
    dm = UserDataModule()
    dm.setup("fit")
    return dm.train_dataloader()  # shuffles with the global generator: reading it must not move the training run


@pytest.mark.parametrize("own_loader", [False, True])  # True: also a trial forward at the first training batch
def test_callbacks_leave_the_training_trajectory_bitwise_unchanged(tmp_path: Path, own_loader: bool) -> None:
    plain = _fit(tmp_path / "plain", [])
    loader = _shuffled_train_loader() if own_loader else None
    recal = BNRecalibration(num_samples=48, forward_fn=recalibration_forward, dataloader=loader)
    monitor = BNStatsMonitor(log_every_n_steps=2)
    with_callbacks = _fit(tmp_path / "with", [recal, monitor])
    assert recal.recalibrations >= 3  # before each validation (and train end, if the weights changed since)
    for (name, a), (_, b) in zip(plain.named_parameters(), with_callbacks.named_parameters(), strict=True):
        assert torch.equal(a, b), name  # BN buffers aside: recalibration changes those, by design


def test_a_batch_the_default_forward_cannot_take_fails_at_the_first_training_batch(tmp_path: Path) -> None:
    model = UserModel()
    trainer = quiet_trainer(tmp_path, callbacks=[BNRecalibration()], max_epochs=2)
    with pytest.raises(TypeError, match=r"BNRecalibration.*dict.*forward_fn=.*bn_recalibration_step"):
        trainer.fit(model, datamodule=UserDataModule())
    assert trainer.global_step == 0  # raised before any optimizer step, not after an epoch


class _NamedBatches(UserDataModule):
    """Batches as ``(names, image, label)`` tuples: the first item, a list of strings, holds no tensor."""

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        return ([f"sample-{i}" for i in range(len(batch["label"]))], batch["image"], batch["label"])


class _NamedBatchModel(UserModel):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self(batch[1]), batch[2])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/loss", torch.nn.functional.cross_entropy(self(batch[1]), batch[2]))


def test_a_tuple_whose_first_item_holds_no_tensor_fails_at_the_first_training_batch(tmp_path: Path) -> None:
    # The default forward would run module(batch[0]) on a list of strings: the same rule as recalibrate_bn's own
    # default forward refuses it at the first training batch, not after an epoch of training.
    trainer = quiet_trainer(tmp_path, callbacks=[BNRecalibration()], max_epochs=2)
    pattern = r"BNRecalibration cannot feed a training batch \(of type tuple: a tuple whose first item .* is a list"
    with pytest.raises(TypeError, match=pattern):
        trainer.fit(_NamedBatchModel(), datamodule=_NamedBatches())
    assert trainer.global_step == 0


class _CountingForward:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
        self.calls += 1
        module(batch["image"])


@pytest.mark.parametrize(("limits", "expected_batches"), [({"fast_dev_run": True}, 1), ({"limit_train_batches": 2}, 2)])
def test_debug_limits_bound_the_recalibration(tmp_path: Path, limits: dict[str, Any], expected_batches: int) -> None:
    forward = _CountingForward()
    recal = BNRecalibration(num_samples=None, forward_fn=forward)
    trainer = quiet_trainer(tmp_path, callbacks=[recal], limit_val_batches=1, **limits)
    trainer.fit(UserModel(), datamodule=UserDataModule())  # warmup 2 steps: cut to the debug run
    # one recalibration before validation; at train end the weights are unchanged since: skipped
    assert recal.recalibrations == 1
    assert forward.calls == expected_batches
    assert recal.last_report is not None and recal.last_report.num_batches == expected_batches


def test_train_end_recalibrates_when_the_weights_changed_after_the_last_validation(tmp_path: Path) -> None:
    recal = BNRecalibration(num_samples=None, forward_fn=recalibration_forward)
    # validation every 2 epochs of 3: the last epoch's steps happen after the last recalibration
    _fit(tmp_path, [recal], check_val_every_n_epoch=2)
    assert recal.recalibrations == 2
    assert recal.last_run is not None and recal.last_run[0] == 3


def test_statistics_come_from_the_transferred_batches(tmp_path: Path) -> None:
    model, dm = UserModel(), UserDataModule()
    recal = BNRecalibration(num_samples=None, forward_fn=recalibration_forward, at_train_end=False)
    quiet_trainer(tmp_path, callbacks=[recal], limit_val_batches=1).fit(model, datamodule=dm)
    mean, var = exact_first_bn_statistics(model, dm)
    torch.testing.assert_close(model.net.bn1.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.net.bn1.running_var.double(), var, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_samples", [None, 33])
def test_one_sample_batches_do_not_crash_batchnorm1d(tmp_path: Path, num_samples: int | None) -> None:
    # training drops its 1-sample last batch (BatchNorm1d could not train on it); recalibration reads a loader
    # that keeps it (97 = 6 x 16 + 1), or a budget that would cut its last batch to one sample (33 = 2 x 16 + 1)
    dm = UserDataModule(train_size=97, drop_last=True)
    dm.setup("fit")
    keep_last = torch.utils.data.DataLoader(dm.train_set, batch_size=16, drop_last=False)
    recal = BNRecalibration(num_samples=num_samples, dataloader=keep_last, forward_fn=recalibration_forward)
    model = UserModel(head_bn=True)
    quiet_trainer(tmp_path, callbacks=[recal], limit_val_batches=1).fit(model, datamodule=dm)
    report = recal.last_report
    assert report is not None
    expected = 97 if num_samples is None else 33
    assert report.num_samples == expected


def test_errors_during_a_recalibration_name_the_callback(tmp_path: Path) -> None:
    empty_images = torch.utils.data.DataLoader([{"image": torch.zeros(0, 3, 16, 16)}], batch_size=None)
    recal = BNRecalibration(dataloader=empty_images, forward_fn=recalibration_forward, num_samples=None)
    with pytest.raises(ValueError, match=r"^BNRecalibration: no sample reached"):
        quiet_trainer(tmp_path, callbacks=[recal], limit_val_batches=1).fit(UserModel(), datamodule=UserDataModule())


def test_outside_fit_it_says_once_that_it_does_nothing(tmp_path: Path) -> None:
    model, dm = UserModel(), UserDataModule()
    recal = BNRecalibration(forward_fn=recalibration_forward)
    trainer = quiet_trainer(tmp_path, callbacks=[recal], limit_val_batches=1, limit_test_batches=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match=r"BNRecalibration recalibrates only during `fit`: in `Trainer.validate`"):
        trainer.validate(model, datamodule=dm, verbose=False)
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        trainer.validate(model, datamodule=dm, verbose=False)
    assert not [w for w in later if "BNRecalibration" in str(w.message)]  # once per callback, not per call
    assert recal.recalibrations == 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    fitted = BNRecalibration(forward_fn=recalibration_forward)
    trainer = quiet_trainer(tmp_path, callbacks=[fitted], limit_val_batches=1, limit_test_batches=1)
    fitted_model = UserModel()
    trainer.fit(fitted_model, datamodule=dm)
    with warnings.catch_warnings(record=True) as after_fit:
        warnings.simplefilter("always")
        trainer.validate(fitted_model, datamodule=dm, verbose=False)
    assert not [w for w in after_fit if "BNRecalibration" in str(w.message)]  # fit's statistics are in the model
