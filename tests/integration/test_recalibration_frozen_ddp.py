"""``BNRecalibration`` under ``ddp_spawn`` (2 CPU processes, gloo) while every BatchNorm layer is frozen: every rank
skips alike (no rank left in a collective), and every rank recalibrates once a layer trains again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_bnsgd._compat import Callback
from lightning_bnsgd.callbacks.recalibration import BNRecalibration
from lightning_bnsgd.data.digits import DigitsDataModule
from lightning_bnsgd.models.classifier import ConvNetClassifier

WORLD = 2


class FrozenInFirstEpoch(ConvNetClassifier):
    """A fine-tuning that keeps every BatchNorm frozen in epoch 0 and trains them from epoch 1 on."""

    def on_train_epoch_start(self) -> None:
        for module in self.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.train(self.current_epoch > 0)


class _RecordAtValidation(Callback):
    """Saves, per rank and epoch, the recalibration count and the buffers that validation sees."""

    def __init__(self, recal: BNRecalibration, out: str) -> None:
        self.recal, self.out = recal, out

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        buffers = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items() if "running_" in k}
        record = {"recalibrations": self.recal.recalibrations, "buffers": buffers}
        torch.save(record, Path(self.out) / f"rank{trainer.global_rank}_epoch{trainer.current_epoch}.pt")


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_every_rank_skips_while_all_frozen_then_recalibrates(tmp_path: Path, make_trainer: Any) -> None:
    model = FrozenInFirstEpoch(input_size=8, padding="same", channels=(8, 8))
    initial = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    recal = BNRecalibration(num_samples=256, at_train_end=False)
    trainer = make_trainer(
        devices=WORLD,
        strategy="ddp_spawn",
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[recal, _RecordAtValidation(recal, str(tmp_path))],
    )
    trainer.fit(model, DigitsDataModule(batch_size=32))
    seen = {(r, e): torch.load(tmp_path / f"rank{r}_epoch{e}.pt") for r in range(WORLD) for e in range(2)}
    for r in range(WORLD):
        assert seen[r, 0]["recalibrations"] == 0  # skipped: every BatchNorm frozen
        for key, value in seen[r, 0]["buffers"].items():
            assert torch.equal(value, initial[key]), (r, key)
        assert seen[r, 1]["recalibrations"] == 1  # a layer trains again: recalibrated
    for key, value in seen[0, 1]["buffers"].items():
        assert torch.equal(value, seen[1, 1]["buffers"][key]), key
        if "running_var" in key:
            assert not torch.equal(value, initial[key]), key
