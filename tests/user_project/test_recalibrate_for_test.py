"""``BNRecalibration`` before ``Trainer.test`` and ``Trainer.predict`` in a user's ``lightning.pytorch`` project:
the statistics the test sees are bitwise those of ``recalibrate_bn`` run by hand on the same batches, the model's own
statistics come back afterwards (also when the run fails), and a later fit is untouched."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_bnsgd import BNRecalibration, recalibrate_bn

from .project import (
    PIXEL_MEAN,
    PIXEL_STD,
    L,
    MemoryLogger,
    ShapesDataset,
    UserDataModule,
    UserModel,
    quiet_trainer,
    recalibration_forward,
)


class StageDataModule(UserDataModule):
    """The user's data module with a test and a predict split (the same 40 images), optionally shifted: darker and
    lower in contrast than the training images, as after a change of camera."""

    def __init__(self, shifted: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shifted = shifted

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.test_set = ShapesDataset(40, self.seed + 2)
        if self.shifted:
            self.test_set.images = self.test_set.images * 0.4 + 30.0

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=16)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=16)


class StageModel(UserModel):
    """The user's model with a test step and a predict step."""

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log("test/loss", F.cross_entropy(self(batch["image"]), batch["label"]))

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self(batch["image"])


def _moved(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """What the data module's ``on_after_batch_transfer`` makes of a batch."""
    return {**batch, "image": (batch["image"] - PIXEL_MEAN) / PIXEL_STD}


def _statistics(model: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


def _state(model: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _assert_differ(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert any(not torch.equal(a[key], b[key]) for key in a if "running_" in key)


class _SeenByTheStage(L.Callback):
    """Listed before the recalibration: the random state at the stage's start. Listed after it: the BatchNorm
    statistics the first test / predict batch runs with."""

    def __init__(self) -> None:
        self.rng: Tensor | None = None
        self.statistics: dict[str, Tensor] | None = None

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self.rng = torch.get_rng_state()

    on_predict_start = on_test_start

    def on_test_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, *args: Any) -> None:
        if batch_idx == 0:
            self.statistics = _statistics(pl_module)

    on_predict_batch_start = on_test_batch_start


def _fit(tmp_path: Path, **trainer_kwargs: Any) -> StageModel:
    """A model trained without recalibration (its BatchNorm statistics are the moving averages)."""
    L.seed_everything(3, verbose=False)
    model = StageModel()
    quiet_trainer(tmp_path, max_epochs=2, limit_val_batches=0, **trainer_kwargs).fit(
        model, datamodule=StageDataModule()
    )
    return model


def _by_hand(model: StageModel, batches: list[dict[str, Tensor]], **kwargs: Any) -> dict[str, Tensor]:
    """``recalibrate_bn`` on a copy of ``model`` in train mode, on these (moved) batches."""
    reference = copy.deepcopy(model).train()
    recalibrate_bn(reference, [_moved(b) for b in batches], forward_fn=recalibration_forward, **kwargs)
    return _statistics(reference)


def _train_batches(rng: Tensor) -> list[dict[str, Tensor]]:
    """The shuffled train batches a fresh iterator gives when the global random state is ``rng``."""
    dm = StageDataModule()
    dm.setup("fit")
    saved = torch.get_rng_state()
    torch.set_rng_state(rng)
    try:
        return list(dm.train_dataloader())
    finally:
        torch.set_rng_state(saved)


def _test_batches(shifted: bool = False) -> list[dict[str, Tensor]]:
    dm = StageDataModule(shifted=shifted)
    dm.setup("test")
    return list(dm.test_dataloader())


def _callback(**kwargs: Any) -> BNRecalibration:
    defaults: dict[str, Any] = {"num_samples": None, "forward_fn": recalibration_forward}
    return BNRecalibration(before_validation=False, at_train_end=False, **{**defaults, **kwargs})


@pytest.mark.parametrize("keep", [False, True])
def test_before_test_from_the_train_data_is_recalibrate_bn_on_the_same_batches(
    tmp_path: Path, keep: bool, caplog: pytest.LogCaptureFixture
) -> None:
    model = _fit(tmp_path)
    moving_averages = _statistics(model)
    weights = _state(model)
    rng, seen = _SeenByTheStage(), _SeenByTheStage()
    recal = _callback(before_test="train_data", keep_stage_statistics=keep)
    memory = MemoryLogger()
    trainer = quiet_trainer(tmp_path, callbacks=[rng, recal, seen], logger=memory)
    with caplog.at_level(logging.INFO):
        trainer.test(model, datamodule=StageDataModule(), verbose=False)
    assert rng.rng is not None and seen.statistics is not None
    expected = _by_hand(_with(weights), _train_batches(rng.rng))
    _assert_equal(seen.statistics, expected)  # the test ran with exactly these statistics
    _assert_differ(expected, moving_averages)
    _assert_equal(_statistics(model), expected if keep else moving_averages)  # put back unless asked to keep
    report = recal.last_report
    assert report is not None and report.data == "train data (the train dataloader)"
    assert report.num_samples == 97  # the whole train split
    assert recal.recalibrations == 0 and recal.last_run is None  # not counted as a fit's recalibration
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("BNRecalibration: the test runs")]
    assert len(lines) == 1 and "statistics from the train data (the train dataloader)" in lines[0]
    assert ("stay in the model" in lines[0]) is keep
    logged = memory.logged("bn_recalibration/test/")
    assert len(logged) == 1 and logged[0][1]["bn_recalibration/test/samples"] == 97.0
    for key, value in _state(model).items():
        if "running_" not in key and "num_batches" not in key:
            assert torch.equal(value, weights[key]), key  # parameters untouched


def _with(state: dict[str, Tensor]) -> StageModel:
    model = StageModel()
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("mode", ["train", "sequential"])
def test_test_from_a_checkpoint_adapts_to_the_shifted_test_data(tmp_path: Path, mode: str) -> None:
    ckpt = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(tmp_path, callbacks=[ckpt], enable_checkpointing=True)
    path = tmp_path / "ckpt" / "last.ckpt"
    trained = _with(torch.load(path, weights_only=True)["state_dict"])
    seen: dict[str, dict[str, Tensor]] = {}
    for source in ("test_data", "train_data"):
        fresh = StageModel()  # random weights: the checkpoint's are loaded by `ckpt_path`
        probe = _SeenByTheStage()
        recal = _callback(before_test=source, mode=mode)
        quiet_trainer(tmp_path, callbacks=[recal, probe]).test(
            fresh, datamodule=StageDataModule(shifted=True), ckpt_path=str(path), verbose=False
        )
        assert probe.statistics is not None
        seen[source] = probe.statistics
        _assert_equal(_statistics(fresh), _statistics(trained))  # the checkpoint's statistics, put back
    _assert_equal(seen["test_data"], _by_hand(trained, _test_batches(shifted=True), mode=mode))
    _assert_differ(seen["test_data"], seen["train_data"])
    images = torch.cat([_moved(b)["image"] for b in _test_batches(shifted=True)])
    with torch.no_grad():
        h = trained.net.conv1(images).double()  # what the first BatchNorm layer sees at test time
    var = h.var((0, 2, 3))
    torch.testing.assert_close(seen["test_data"]["net.bn1.running_var"].double(), var, rtol=1e-5, atol=1e-6)
    far = (seen["train_data"]["net.bn1.running_var"].double() / var).log().abs().max()
    assert far > 0.5  # the train data's statistics are far from the shifted test data's


def test_before_predict_predicts_with_the_adapted_statistics_and_every_batch(tmp_path: Path) -> None:
    model = _fit(tmp_path)
    moving_averages = _statistics(model)
    recal = _callback(before_predict="predict_data")
    trainer = quiet_trainer(tmp_path, callbacks=[recal])
    predictions = trainer.predict(model, datamodule=StageDataModule(shifted=True))
    assert predictions is not None and len(predictions) == 3  # all 40 images: the predict loop's own batches
    reference = copy.deepcopy(model)
    reference.load_state_dict({**_state(model), **_by_hand(model, _test_batches(shifted=True))})
    reference.eval()
    with torch.no_grad():
        expected = [reference(_moved(b)["image"]) for b in _test_batches(shifted=True)]
    for got, want in zip(predictions, expected, strict=True):
        assert torch.equal(got, want)
    assert recal.last_report is not None and recal.last_report.data == "predict data (the predict dataloader)"
    _assert_equal(_statistics(model), moving_averages)


def _plain_then_fit(tmp_path: Path, stage_callbacks: list[Any]) -> dict[str, Tensor]:
    """Seeded: a test run (with ``stage_callbacks``), then a fit of the same model; its final state."""
    L.seed_everything(11, verbose=False)
    model, dm = StageModel(), StageDataModule()
    quiet_trainer(tmp_path, callbacks=stage_callbacks).test(model, datamodule=dm, verbose=False)
    quiet_trainer(tmp_path, max_epochs=2, limit_val_batches=0).fit(model, datamodule=dm)
    return _state(model)


@pytest.mark.parametrize("source", ["train_data", "test_data"])
def test_a_later_fit_is_bitwise_the_one_without_the_stage_recalibration(tmp_path: Path, source: str) -> None:
    plain = _plain_then_fit(tmp_path / "plain", [])
    recal = _callback(before_test=source)
    after = _plain_then_fit(tmp_path / "after", [recal])
    assert recal.last_report is not None and recal.last_report.layers  # it did recalibrate before the test
    _assert_equal(after, plain)  # weights and statistics: random states and BatchNorm buffers put back


class _Boom(RuntimeError):
    pass


class _FailingForward:
    def __init__(self, fail_at: int) -> None:
        self.fail_at, self.calls = fail_at, 0

    def __call__(self, module: torch.nn.Module, batch: dict[str, Tensor]) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise _Boom(f"forward {self.calls} failed")
        module(batch["image"])


class _FailingTest(StageModel):
    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if batch_idx == 1:
            raise _Boom("test step failed")
        super().test_step(batch, batch_idx)


def test_a_failure_before_or_during_the_test_leaves_the_model_as_it_was(tmp_path: Path) -> None:
    model = _fit(tmp_path)
    before = _state(model)
    recal = _callback(before_test="train_data", forward_fn=_FailingForward(fail_at=3))
    with pytest.raises(_Boom, match="forward 3 failed"):
        quiet_trainer(tmp_path, callbacks=[recal]).test(model, datamodule=StageDataModule(), verbose=False)
    _assert_equal(_state(model), before)
    failing = _FailingTest()
    failing.load_state_dict(before)
    probe = _SeenByTheStage()
    recal = _callback(before_test="test_data")
    with pytest.raises(_Boom, match="test step failed"):  # after the recalibration, in the second test batch
        quiet_trainer(tmp_path, callbacks=[recal, probe]).test(failing, datamodule=StageDataModule(), verbose=False)
    assert probe.statistics is not None
    _assert_differ(probe.statistics, _statistics(model))  # the first batch ran with the recalibrated ones
    _assert_equal(_state(failing), before)  # put back by on_exception


@pytest.mark.parametrize(
    ("source", "limits", "batches"),
    [
        ("test_data", {"limit_test_batches": 2}, 2),
        ("train_data", {"limit_train_batches": 3}, 3),
        ("train_data", {"fast_dev_run": True}, 1),
        ("test_data", {"fast_dev_run": 2}, 2),
    ],
)
def test_debug_limits_bound_the_stage_recalibration(
    tmp_path: Path, source: str, limits: dict[str, Any], batches: int
) -> None:
    recal = _callback(before_test=source)
    quiet_trainer(tmp_path, callbacks=[recal], **limits).test(StageModel(), datamodule=StageDataModule(), verbose=False)
    assert recal.last_report is not None and recal.last_report.num_batches == batches


def test_fit_then_test_in_one_trainer_puts_back_the_fits_statistics(tmp_path: Path) -> None:
    recal = BNRecalibration(num_samples=None, forward_fn=recalibration_forward, before_test="test_data")
    trainer = quiet_trainer(tmp_path, callbacks=[recal], max_epochs=1, limit_val_batches=1)
    model, dm = StageModel(), StageDataModule(shifted=True)
    trainer.fit(model, datamodule=dm)
    assert recal.recalibrations == 1
    fitted = _statistics(model)
    assert recal.last_report is not None and recal.last_report.data == "train data (the train dataloader)"
    trainer.test(model, datamodule=dm, verbose=False)
    assert recal.recalibrations == 1  # the test's own recalibration is not counted
    assert recal.last_report.data == "test data (the test dataloader, labels unused)"  # type: ignore[union-attr]
    _assert_equal(_statistics(model), fitted)
    assert recal.state_dict() == {"recalibrations": 1, "last_run": recal.last_run}
