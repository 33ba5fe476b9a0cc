"""``BNStatsMonitor`` in a user's ``lightning.pytorch`` project: Lightning's freezing paths, several optimizers with
manual optimization, TensorBoard histograms."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_bnsgd import BNStatsMonitor, WeightDynamicsMonitor
from lightning_bnsgd.bn.inspect import GAP_STATS

from .project import L, MemoryLogger, UserDataModule, UserModel, quiet_trainer

BackboneFinetuning = L.callbacks.BackboneFinetuning
BaseFinetuning = L.callbacks.BaseFinetuning


BACKBONE_BN = ("net.bn1", "net.layer1.0.bn1", "net.layer1.0.bn2")
HEAD_BN = ("net.layer2.0.bn1", "net.layer2.0.bn2", "net.layer2.0.downsample.1")


class FinetuneModel(UserModel):
    """The user's model with a ``backbone`` (stem and first stage) for Lightning's finetuning callbacks, plain SGD
    over the trainable parameters, and optional freezing of its own."""

    def __init__(self, freeze: str | None = None) -> None:
        super().__init__()
        self.backbone = nn.Sequential(self.net.conv1, self.net.bn1, self.net.layer1)
        self.freeze = freeze

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05, momentum=0.9)

    def on_fit_start(self) -> None:
        if self.freeze == "requires_grad":
            self.backbone.requires_grad_(False)  # parameters only: BatchNorm still trains its statistics
        elif self.freeze in ("eval", "eval_then_train"):
            self.backbone.requires_grad_(False)
            for m in self.backbone.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()

    def on_train_epoch_start(self) -> None:
        if self.freeze == "eval_then_train":
            self.train()  # the classic bug: puts the frozen BatchNorm back in train mode
        elif self.freeze == "eval":
            for m in self.backbone.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()


class FreezeModules(BaseFinetuning):
    """Freeze the backbone with ``BaseFinetuning.freeze(train_bn=...)`` (or ``freeze_module`` per module), unfreeze
    it into the optimizer at epoch 1."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def freeze_before_training(self, pl_module: Any) -> None:
        if self.how == "freeze_module":
            for module in pl_module.backbone.modules():
                self.freeze_module(module)
        else:
            self.freeze(pl_module.backbone, train_bn=self.how == "train_bn")

    def finetune_function(self, pl_module: Any, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.backbone, optimizer, lr=0.01)


class BufferTrace(L.Callback):
    """The backbone's BatchNorm ``running_var`` at the start and at the end of each epoch."""

    def __init__(self) -> None:
        self.starts: list[list[Tensor]] = []
        self.ends: list[list[Tensor]] = []

    def _vars(self, pl_module: Any) -> list[Tensor]:
        return [pl_module.get_submodule(name).running_var.clone() for name in BACKBONE_BN]

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.starts.append(self._vars(pl_module))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.ends.append(self._vars(pl_module))

    def changed(self, epoch: int) -> bool:
        return any(not torch.equal(a, b) for a, b in zip(self.starts[epoch], self.ends[epoch], strict=True))


def _fit(tmp_path: Path, model: UserModel, *callbacks: Any, epochs: int = 2) -> tuple[list[str], MemoryLogger]:
    logger = MemoryLogger()
    monitor = BNStatsMonitor(log_every_n_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = quiet_trainer(tmp_path, callbacks=[*callbacks, monitor], logger=logger, max_epochs=epochs)
        trainer.fit(model, datamodule=UserDataModule())  # 97 samples in batches of 16: 7 batches per epoch
    return [str(w.message) for w in caught if "BNStatsMonitor" in str(w.message)], logger


@pytest.mark.parametrize("how", ["train_bn_false", "freeze_module", "train_bn", "backbone_finetuning", "eval"])
def test_lightning_freezing_paths_get_no_false_warning(tmp_path: Path, how: str) -> None:
    """Frozen BatchNorm as Lightning's finetuning callbacks (or a careful user) leave it, then unfrozen at epoch 1:
    every monitor warning would be false here, and the logs continue across the unfreeze."""
    trace = BufferTrace()
    if how == "backbone_finetuning":
        callbacks: list[Any] = [BackboneFinetuning(unfreeze_backbone_at_epoch=1), trace]
        model = FinetuneModel()
    elif how == "eval":
        callbacks, model = [trace], FinetuneModel(freeze="eval")
    else:
        callbacks, model = [FreezeModules(how), trace], FinetuneModel()
    messages, logger = _fit(tmp_path, model, *callbacks)
    assert messages == []
    assert [s for s, _ in logger.logged("bn/")] == [1, 3, 5, 7, 9, 11, 13]  # batches 2, 4, ... at `self.log`'s step
    if how in ("train_bn_false", "freeze_module", "eval"):
        assert not trace.changed(0)  # really frozen in epoch 0
    assert trace.changed(1) == (how != "eval")  # unfrozen at epoch 1: the statistics move, and that is intended


@pytest.mark.parametrize("how", ["requires_grad", "eval_then_train"])
def test_frozen_bn_whose_statistics_move_is_reported_truly(tmp_path: Path, how: str) -> None:
    """Parameters frozen while BatchNorm stays in train mode, or eval mode undone by ``.train()``: the statistics
    really change, and the warning says why and names each such layer once."""
    trace = BufferTrace()
    messages, _ = _fit(tmp_path, FinetuneModel(freeze=how), trace, epochs=1)
    assert trace.changed(0)
    frozen = [m for m in messages if "was frozen (" in m]
    assert sorted(name for m in frozen for name in BACKBONE_BN if f"'{name}'" in m) == sorted(BACKBONE_BN)
    assert len(frozen) == len(BACKBONE_BN)
    assert all("changed by step 1" in m for m in frozen)
    if how == "requires_grad":
        assert all("`requires_grad=False` freezes only gamma and beta" in m for m in frozen)
        assert not any("in eval mode" in m for m in frozen)
    else:
        assert all("in eval mode" in m and "called `.train()`" in m for m in frozen)
    assert not any(name in m for m in messages for name in HEAD_BN)


class TwoOptimizerModel(UserModel):
    """A GAN-like module: two optimizers stepped by hand in every training step (``global_step`` += 2 a batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        first, second = self.optimizers()  # type: ignore[misc]
        for opt in (first, second):
            loss = F.cross_entropy(self(batch["image"]), batch["label"])
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self) -> Any:
        backbone = [p for n, p in self.named_parameters() if not n.startswith("net.fc")]
        return torch.optim.SGD(backbone, lr=0.01), torch.optim.SGD(self.net.fc.parameters(), lr=0.01)


def test_two_optimizers_under_manual_optimization_log_every_n_batches(tmp_path: Path) -> None:
    logger = MemoryLogger()
    monitor = BNStatsMonitor(log_every_n_steps=2)
    trainer = quiet_trainer(tmp_path, callbacks=[monitor], logger=logger, max_epochs=1)
    trainer.fit(TwoOptimizerModel(), datamodule=UserDataModule())
    assert trainer.global_step == 14  # 7 batches, two optimizer steps each
    # counted in batches, like the Trainer's own log_every_n_steps, and logged at `self.log`'s step of batches 2, 4, 6
    assert [s for s, _ in logger.logged("bn/")] == [1, 3, 5]
    assert monitor.state_dict()["batches_stepped"] == 7


def test_tensorboard_histograms_with_lightning_pytorch(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = L.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = BNStatsMonitor(log_every_n_steps=3, log_histograms=True)
        quiet_trainer(tmp_path, callbacks=[monitor], logger=tb, max_epochs=1).fit(
            UserModel(), datamodule=UserDataModule()
        )
    assert not [str(w.message) for w in caught if "histogram" in str(w.message)]
    events = EventAccumulator(tb.log_dir, size_guidance={"histograms": 0})
    events.Reload()
    tags = set(events.Tags()["histograms"])
    assert {f"bn/{name}/running_var" for name in (*BACKBONE_BN, *HEAD_BN)} <= tags
    assert [e.step for e in events.Histograms("bn/net.layer2.0.downsample.1/weight")] == [2, 5]


class BatchSizeModel(UserModel):
    """The user's model, also logging the size of each training batch with ``self.log``."""

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self.log("train/batch_size", float(len(batch["label"])))
        return super().training_step(batch, batch_idx)


def test_monitor_logs_at_the_step_of_the_modules_own_metrics(tmp_path: Path) -> None:
    """The monitor's values of a batch land at the step where Lightning puts the module's ``self.log`` values of the
    same batch: the one-sample last batch of each epoch (97 = 6 x 16 + 1) is the monitored one, and the CSV row of
    its step holds both its batch size and its samples per channel."""
    logger = L.loggers.CSVLogger(str(tmp_path), name="csv")
    trainer = quiet_trainer(tmp_path, callbacks=[BNStatsMonitor()], logger=logger, max_epochs=2, log_every_n_steps=7)
    trainer.fit(BatchSizeModel(), datamodule=UserDataModule())
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_step: dict[int, dict[str, float]] = {}
    for row in rows:
        by_step.setdefault(int(row["step"]), {}).update({k: float(v) for k, v in row.items() if v and k != "step"})
    module_steps = sorted(s for s, m in by_step.items() if "train/batch_size" in m)
    monitor_steps = sorted(s for s, m in by_step.items() if any(k.startswith("bn/") for k in m))
    assert module_steps == monitor_steps == [6, 13]
    for step in monitor_steps:
        assert by_step[step]["train/batch_size"] == 1.0
        assert by_step[step]["bn/net.bn1/samples_per_channel"] == 1 * 16 * 16  # the same one-sample batch


def _first_logged_step(tmp_path: Path, *callbacks: Any) -> dict[str, float]:
    L.seed_everything(3, verbose=False)
    logger = MemoryLogger()
    trainer = quiet_trainer(tmp_path, callbacks=[*callbacks, BNStatsMonitor(log_every_n_steps=1)], logger=logger)
    trainer.fit(UserModel(), datamodule=UserDataModule(batch_size=32))
    step, metrics = logger.logged("bn/")[0]
    assert step == 0
    return metrics


def test_first_step_describes_the_training_batch_with_the_dynamics_monitors_probe(tmp_path: Path) -> None:
    """``WeightDynamicsMonitor`` replays 16 samples of the first batch in its one-off probe, in the same training step
    as the monitor's first logged one; the monitor still describes the 32-sample training batch, exactly as in a run
    without the dynamics monitor, and no "fewer than min_samples_per_channel" warning comes from the probe."""
    alone = _first_logged_step(tmp_path / "alone")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        both = _first_logged_step(tmp_path / "both", WeightDynamicsMonitor(log_every_n_steps=1, probe_samples=2))
    assert both["bn/net.bn1/samples_per_channel"] == 32 * 16 * 16  # the training batch, not the probe's 2 samples
    assert both["bn/net.layer2.0.bn1/samples_per_channel"] == 32 * 8 * 8
    for key, value in alone.items():
        if key.endswith(("samples_per_channel", *GAP_STATS)):
            assert both[key] == value, key
    assert not [w for w in caught if "min_samples_per_channel" in str(w.message)]
    assert not [w for w in caught if "could not probe" in str(w.message)]
