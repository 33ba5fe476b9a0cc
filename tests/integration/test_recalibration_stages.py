"""``BNRecalibration`` before ``Trainer.test`` and ``Trainer.predict``: arguments, the stage-only configuration, the
warnings, frozen layers, data it must refuse, DDP (exact over the union of the shards) and the CLI."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bnsgd._compat import Callback, LightningDataModule, LightningModule
from lightning_bnsgd.bn.recalibrate import recalibrate_bn
from lightning_bnsgd.callbacks.recalibration import BNRecalibration
from lightning_bnsgd.cli import cli_main

TRAIN, TEST = 128, 64


def _tensors(n: int, seed: int, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g) * (1.0 + shift) + shift
    return x, (x[:, 0] > shift).long()


class _Data(LightningDataModule):
    """128 train samples, 64 test samples from a shifted distribution; ``train_in_test=False`` builds the train
    split in ``setup("fit")`` only, as many data modules do."""

    def __init__(self, train_in_test: bool = True) -> None:
        super().__init__()
        self.train_in_test = train_in_test

    def setup(self, stage: str) -> None:
        if stage == "fit" or self.train_in_test:
            self.train_set = TensorDataset(*_tensors(TRAIN, 0))
        self.test_set = TensorDataset(*_tensors(TEST, 1, shift=1.5))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=16, shuffle=True)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=8)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=8)


class _Net(LightningModule):
    def __init__(self, frozen_bn: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.frozen_bn = frozen_bn
        self.net = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4), nn.BatchNorm1d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def train(self, mode: bool = True) -> _Net:
        super().train(mode)
        if self.frozen_bn:  # a user's train() that keeps the BatchNorm layers frozen (a fine-tuned backbone)
            for m in self.modules():
                if isinstance(m, nn.BatchNorm1d):
                    m.eval()
        return self

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.log("test/loss", F.cross_entropy(self(batch[0]), batch[1]), sync_dist=True)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if "running_" in k}


def _stage_only(**kwargs: Any) -> BNRecalibration:
    return BNRecalibration(before_validation=False, at_train_end=False, num_samples=None, **kwargs)


# ------------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"before_test": "test"},
            ValueError,
            r"`before_test` must be one of \('off', 'train_data', 'test_data'\), got 'test'",
        ),
        ({"before_test": "predict_data"}, ValueError, r"`before_test` must be one of .*got 'predict_data'"),
        (
            {"before_predict": "test_data"},
            ValueError,
            r"`before_predict` must be one of \('off', 'train_data', 'predict_data'\)",
        ),
        ({"before_test": True}, TypeError, r"`before_test` must be one of .*got True"),
        ({"keep_stage_statistics": "yes"}, TypeError, r"`keep_stage_statistics` must be a bool, got 'yes'"),
        (
            {"before_validation": False, "at_train_end": False},
            ValueError,
            r"`before_validation=False` and `at_train_end=False`, with `before_test='off'` and `before_predict='off'`",
        ),
    ],
)
def test_bad_arguments_name_the_argument_the_value_and_what_is_allowed(
    kwargs: dict[str, Any], error: type, match: str
) -> None:
    with pytest.raises(error, match=r"^BNRecalibration: .*" + match):
        BNRecalibration(**kwargs)


def test_a_callback_for_test_only_is_valid_and_does_nothing_in_fit(make_trainer: Any) -> None:
    recal = _stage_only(before_test="test_data")
    model = _Net()
    before = _statistics(model)
    trainer = make_trainer(callbacks=[recal], max_epochs=1, limit_val_batches=0)  # no validation: fine here
    trainer.fit(model, datamodule=_Data())
    assert recal.recalibrations == 0 and recal.last_report is None
    assert any(not torch.equal(before[k], v) for k, v in _statistics(model).items())  # training moved them itself
    predict_only = _stage_only(before_predict="train_data")
    make_trainer(callbacks=[predict_only], max_epochs=1).fit(_Net(), datamodule=_Data())
    assert predict_only.last_report is None


@pytest.mark.parametrize("stage", ["test", "predict"])
def test_a_test_or_predict_run_it_is_not_asked_to_act_in_says_so_once_naming_the_argument(
    make_trainer: Any, stage: str
) -> None:
    recal = BNRecalibration(num_samples=None)
    trainer = make_trainer(callbacks=[recal])
    run = getattr(trainer, stage)
    model = _Net()
    before = _statistics(model)
    with pytest.warns(
        UserWarning, match=rf"BNRecalibration does nothing in `Trainer.{stage}` with `before_{stage}='off'`"
    ):
        run(model, datamodule=_Data())
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        run(model, datamodule=_Data())
    assert not [w for w in later if "BNRecalibration" in str(w.message)]
    assert all(torch.equal(before[k], v) for k, v in _statistics(model).items())


def test_every_batchnorm_frozen_by_train_skips_with_a_warning(make_trainer: Any) -> None:
    recal = _stage_only(before_test="test_data")
    model = _Net(frozen_bn=True)
    before = _statistics(model)
    with pytest.warns(UserWarning, match=r"before test, every BatchNorm layer .* eval mode after `_Net.train\(\)`"):
        make_trainer(callbacks=[recal]).test(model, datamodule=_Data(), verbose=False)
    assert all(torch.equal(before[k], v) for k, v in _statistics(model).items())
    assert recal.last_report is None


class _Modes(Callback):
    """Every module's ``training`` flag at the first test batch."""

    def __init__(self) -> None:
        self.seen: list[bool] = []

    def on_test_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, *args: Any) -> None:
        if batch_idx == 0:
            self.seen = [m.training for m in pl_module.modules()]


def test_the_train_modes_come_from_train_not_from_a_training_batch(make_trainer: Any) -> None:
    # one layer frozen by the user's train(): left alone; the other recalibrated; no "no training batch" warning
    class _HalfFrozen(_Net):
        def train(self, mode: bool = True) -> _HalfFrozen:
            super().train(mode)
            self.net[4].eval()
            return self

    recal = _stage_only(before_test="test_data")
    modes = _Modes()
    model = _HalfFrozen()
    before = _statistics(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(callbacks=[recal, modes]).test(model, datamodule=_Data(), verbose=False)
    assert not [w for w in caught if "no training batch" in str(w.message)]
    report = recal.last_report
    assert report is not None and report.layers == ["net.1"] and report.skipped == {"net.4": "eval mode (frozen)"}
    assert modes.seen == [False] * len(list(model.modules()))  # the test ran in the modes Lightning set
    assert all(torch.equal(before[k], v) for k, v in _statistics(model).items())


class _Once:
    """A one-shot iterator of test batches."""

    def __init__(self) -> None:
        self.batches = iter([(torch.randn(8, 3), torch.zeros(8, dtype=torch.long)) for _ in range(3)])

    def __iter__(self) -> _Once:
        return self

    def __next__(self) -> Any:
        return next(self.batches)


def test_data_it_cannot_use_is_refused_with_the_fix(make_trainer: Any) -> None:
    with pytest.raises(TypeError, match=r"test dataloader is a one-shot iterator .*use up the batches the test needs"):
        make_trainer(callbacks=[_stage_only(before_test="test_data")]).test(_Net(), dataloaders=_Once())
    loader = DataLoader(TensorDataset(*_tensors(TEST, 1)), batch_size=8)
    with pytest.raises(
        RuntimeError, match=r"`before_test='train_data'`, but this run has no train dataloader.*`dataloader=`"
    ):
        make_trainer(callbacks=[_stage_only(before_test="train_data")]).test(_Net(), dataloaders=loader)
    with pytest.raises(AttributeError, match=r"`train_dataloader\(\)` raised AttributeError.*`setup\('test'\)`"):
        make_trainer(callbacks=[_stage_only(before_test="train_data")]).test(_Net(), datamodule=_Data(False))
    # the callback's own `dataloader=` serves as the training data
    own = DataLoader(TensorDataset(*_tensors(TRAIN, 0)), batch_size=32)
    recal = _stage_only(before_test="train_data", dataloader=own)
    make_trainer(callbacks=[recal]).test(_Net(), dataloaders=loader, verbose=False)
    assert recal.last_report is not None and recal.last_report.num_samples == TRAIN
    assert recal.last_report.data == "train data (the callback's `dataloader`)"


def test_several_test_dataloaders_use_the_first_with_a_warning(make_trainer: Any) -> None:
    first = DataLoader(TensorDataset(*_tensors(TEST, 1)), batch_size=8)
    second = DataLoader(TensorDataset(*_tensors(16, 2)), batch_size=8)
    recal = _stage_only(before_test="test_data")
    with pytest.warns(UserWarning, match=r"several test dataloaders; recalibrating from the first"):
        make_trainer(callbacks=[recal]).test(_Net(), dataloaders=[first, second], verbose=False)
    assert recal.last_report is not None and recal.last_report.num_samples == TEST


# ------------------------------------------------------------------------------------------------------- DDP


class _SaveStage(Callback):
    """In each worker: the statistics of the first test batch, the callback's report, and the statistics after."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_test_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, *args: Any) -> None:
        if batch_idx == 0:
            self.first = _statistics(pl_module)

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        recal = next(cb for cb in trainer.callbacks if isinstance(cb, BNRecalibration))
        result = {"first": self.first, "after": _statistics(pl_module), "report": recal.last_report}
        torch.save(result, Path(self.out) / f"rank{trainer.global_rank}.pt")


@pytest.mark.ddp
@pytest.mark.timeout(240)
@pytest.mark.parametrize(("source", "mode"), [("test_data", "sequential"), ("train_data", "train")])
def test_ddp_test_is_exact_over_the_union_of_the_shards(
    make_trainer: Any, tmp_path: Path, source: str, mode: str
) -> None:
    model = _Net()
    before = _statistics(model)
    recal = _stage_only(before_test=source, mode=mode)
    trainer = make_trainer(devices=2, strategy="ddp_spawn", callbacks=[recal, _SaveStage(str(tmp_path))])
    trainer.test(model, datamodule=_Data(), verbose=False)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for key in before:
        assert torch.equal(ranks[0]["first"][key], ranks[1]["first"][key]), key  # identical on both ranks
        assert torch.equal(ranks[0]["after"][key], before[key]), key  # put back after the test
    report = ranks[0]["report"]
    size = TEST if source == "test_data" else TRAIN
    assert report.world_size == 2 and report.samples_per_rank == [size // 2, size // 2]  # DistributedSampler shards
    x = _tensors(TEST, 1, shift=1.5)[0] if source == "test_data" else _tensors(TRAIN, 0)[0]
    reference = _Net().train()
    recalibrate_bn(reference, [x], mode=mode)  # one process, the union in one batch
    expected = _statistics(reference)
    keys = list(expected) if mode == "sequential" else ["net.1.running_mean", "net.1.running_var"]
    for key in keys:  # sequential: every layer; train: the first (deeper ones depend on the batching)
        torch.testing.assert_close(ranks[0]["first"][key], expected[key], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_test_with_before_test_from_a_config_file(tmp_path: Path) -> None:
    config = {
        "trainer": {
            "callbacks": [
                {
                    "class_path": "lightning_bnsgd.BNRecalibration",
                    "init_args": {
                        "before_validation": False,
                        "at_train_end": False,
                        "before_test": "test_data",
                        "num_samples": None,
                    },
                }
            ],
        },
        "model": {
            "class_path": "lightning_bnsgd.ConvNetClassifier",
            "init_args": {"channels": [8, 8], "padding": "same"},
        },
        "data": {"class_path": "lightning_bnsgd.DigitsDataModule"},
    }
    path = tmp_path / "test.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    common = [
        "--trainer.limit_test_batches=2",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    cli = cli_main(["test", "--config", str(path), *common])
    recal = next(cb for cb in cli.trainer.callbacks if isinstance(cb, BNRecalibration))
    assert recal.before_test == "test_data"
    assert recal.last_report is not None and recal.last_report.num_batches == 2
    assert recal.last_report.data == "test data (the test dataloader, labels unused)"
    flags = ["--trainer.callbacks+=lightning_bnsgd.BNRecalibration", "--trainer.callbacks.before_test=train_data"]
    cli = cli_main(
        [
            "test",
            "--model=lightning_bnsgd.ConvNetClassifier",
            "--model.init_args.padding=same",
            "--data=lightning_bnsgd.DigitsDataModule",
            *flags,
            *common,
        ]
    )
    recal = next(cb for cb in cli.trainer.callbacks if isinstance(cb, BNRecalibration))
    assert recal.before_test == "train_data" and recal.last_report is not None
    assert recal.last_report.data == "train data (the train dataloader)"
