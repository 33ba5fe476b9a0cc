"""Lightning's LR finder works with ``ConvNetClassifier`` and its ``SGDWarmup`` recipe."""

from __future__ import annotations

import math

import pytest

from lightning_bnsgd._compat import pl
from lightning_bnsgd.data.digits import DigitsDataModule
from lightning_bnsgd.models.classifier import ConvNetClassifier
from lightning_bnsgd.optim.sgd_warmup import SGDWarmup


def test_lr_property_sets_an_absolute_peak_lr():
    model = ConvNetClassifier(input_size=8, padding="same", optimizer=SGDWarmup(lr_base=0.4))
    assert model.lr is None  # scaled from lr_base: no absolute LR yet
    model.lr = 0.05
    assert model.optimizer_config.lr == 0.05 and model.optimizer_config.lr_base == 0.4
    assert model.optimizer_config.peak_lr(effective_batch=1024) == 0.05  # absolute: the batch no longer matters
    assert model.hparams["optimizer"]["lr"] == 0.05
    assert ConvNetClassifier(optimizer=SGDWarmup(lr=0.4)).lr == 0.4
    with pytest.raises(ValueError, match="lr"):
        model.lr = -1.0


def test_lr_find_updates_the_model_and_training_uses_the_suggestion(make_trainer):
    pl.seed_everything(0)
    data = DigitsDataModule(batch_size=64)
    model = ConvNetClassifier(input_size=8, padding="same")
    trainer = make_trainer(max_epochs=2)
    finder = pl.tuner.Tuner(trainer).lr_find(model, datamodule=data, min_lr=1e-4, max_lr=3.0, num_training=40)
    suggestion = finder.suggestion()
    assert suggestion is not None and 1e-4 <= suggestion <= 3.0
    assert len(finder.results["lr"]) > 10
    assert model.lr == pytest.approx(suggestion)
    assert model.optimizer_config.lr == pytest.approx(suggestion)
    # The real fit then runs its warmup up to exactly the suggested peak.
    lrs: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = make_trainer(max_epochs=2, callbacks=[Record()])
    trainer.fit(model, datamodule=data)
    assert max(lrs) == pytest.approx(suggestion, rel=1e-6)
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())
