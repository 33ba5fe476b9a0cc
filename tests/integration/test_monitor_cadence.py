"""Both monitors log at exactly the training steps at which Lightning logs the module's own ``self.log`` metrics:
with gradient accumulation (short windows at the epoch's end included), with ``Trainer(log_every_n_steps=0)``, with
the monitor's own interval, and while the Trainer is told to stop but must reach ``min_steps`` first."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tests.user_project.project import MemoryLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bnsgd._compat import Callback, LightningModule
from lightning_bnsgd.callbacks.bn_monitor import BNStatsMonitor
from lightning_bnsgd.callbacks.dynamics_monitor import WeightDynamicsMonitor

PREFIXES = ("bn/", "dynamics/")


class Logged(LightningModule):
    """Conv-BN-ReLU and a linear head on random 8x8 images; logs its loss at every step Lightning logs."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1, bias=False),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 3),
        )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("module/loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


class StopAt(Callback):
    """Sets ``trainer.should_stop`` at the start of one training batch (before the monitors' hooks run)."""

    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.batch_idx:
            trainer.should_stop = True


def _loader(batches: int = 7) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16 * batches, 1, 8, 8, generator=g), torch.randint(0, 3, (16 * batches,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def _steps(logger: MemoryLogger, prefix: str) -> list[int]:
    return [s for s, _ in logger.logged(prefix)]


def _fit(make_trainer: Any, monitors: dict[str, Any], extra: tuple[Any, ...] = (), **kwargs: Any) -> MemoryLogger:
    logger = MemoryLogger()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = make_trainer(logger=logger, callbacks=[*extra, *monitors.values()], limit_val_batches=0, **kwargs)
        trainer.fit(Logged(), train_dataloaders=_loader())
    return logger


@pytest.mark.parametrize(
    ("every_n", "trainer_kwargs"),
    [
        (None, {"log_every_n_steps": 2, "accumulate_grad_batches": 3, "max_epochs": 3}),
        (3, {"log_every_n_steps": 3, "accumulate_grad_batches": 2, "max_epochs": 3}),
        (None, {"log_every_n_steps": 1, "accumulate_grad_batches": 4, "max_epochs": 2}),
        (None, {"log_every_n_steps": 3, "max_epochs": 2}),
    ],
    ids=["trainer-interval-accumulate-3", "own-interval-accumulate-2", "every-step-accumulate-4", "no-accumulation"],
)
def test_monitors_log_at_the_steps_lightning_logs_the_module_metrics(
    make_trainer: Any, every_n: int | None, trainer_kwargs: dict[str, Any]
) -> None:
    monitors = {"bn/": BNStatsMonitor(log_every_n_steps=every_n), "dynamics/": WeightDynamicsMonitor(every_n)}
    logger = _fit(make_trainer, monitors, **trainer_kwargs)
    module_steps = _steps(logger, "module/")
    assert module_steps, "the module logged nothing: the scenario tests nothing"
    for prefix in PREFIXES:
        assert _steps(logger, prefix) == module_steps, prefix


def test_trainer_log_every_n_steps_zero_turns_both_monitors_off(make_trainer: Any) -> None:
    logger = MemoryLogger()
    monitors = [BNStatsMonitor(), WeightDynamicsMonitor()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(
            logger=logger, callbacks=monitors, limit_val_batches=0, max_epochs=1, log_every_n_steps=0
        )
        trainer.fit(Logged(), train_dataloaders=_loader())
    assert trainer.global_step == 7
    assert _steps(logger, "module/") == []
    for prefix in PREFIXES:
        assert _steps(logger, prefix) == [], prefix
    off = [str(w.message) for w in caught if "`log_every_n_steps=0` turns logging off" in str(w.message)]
    assert sorted(m.split(":")[0] for m in off) == ["BNStatsMonitor", "WeightDynamicsMonitor"]
    assert monitors[1].report is None  # off: not even the one-off probe runs


def test_while_the_trainer_must_reach_min_steps_after_a_stop_signal_every_step_is_logged(make_trainer: Any) -> None:
    """Lightning logs every step once ``trainer.should_stop`` is set and ``min_steps`` keeps it training."""
    monitors = {"bn/": BNStatsMonitor(), "dynamics/": WeightDynamicsMonitor()}
    logger = _fit(make_trainer, monitors, extra=(StopAt(2),), log_every_n_steps=4, max_epochs=3, min_steps=6)
    module_steps = _steps(logger, "module/")
    assert {2, 4, 5} <= set(module_steps)  # signalled at step 2: logged off the every-4 cadence until min_steps=6
    for prefix in PREFIXES:
        assert _steps(logger, prefix) == module_steps, prefix


class _Stream(torch.utils.data.IterableDataset):
    """Seven batches of 16 random 8x8 images with no length: Lightning learns the epoch's end only by reaching it."""

    def __iter__(self) -> Any:
        g = torch.Generator().manual_seed(0)
        for _ in range(7):
            yield torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)


def test_a_short_last_window_of_a_dataset_without_length_is_logged_as_lightning_logs_it(make_trainer: Any) -> None:
    # accumulate 3: Lightning steps at batches 3, 6 and at the last one (7), which it knows to be the last only
    # because its data fetcher looked one batch ahead
    monitors = {"bn/": BNStatsMonitor(), "dynamics/": WeightDynamicsMonitor()}
    logger = MemoryLogger()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = make_trainer(
            logger=logger,
            callbacks=list(monitors.values()),
            limit_val_batches=0,
            max_epochs=2,
            log_every_n_steps=1,
            accumulate_grad_batches=3,
        )
        trainer.fit(Logged(), train_dataloaders=DataLoader(_Stream(), batch_size=None))
    assert trainer.global_step == 6  # 3 optimizer steps per epoch, the last one after a window of one batch
    module_steps = _steps(logger, "module/")
    assert len(module_steps) == 6, module_steps
    for prefix in PREFIXES:
        assert _steps(logger, prefix) == module_steps, prefix
