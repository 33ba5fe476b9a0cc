from __future__ import annotations

import pickle

import torch

from lightning_bnsgd.data.digits import DigitsDataModule
from lightning_bnsgd.models.classifier import ConvNetClassifier
from lightning_bnsgd.optim.sgd_warmup import SGDWarmup


def test_fit_learns_the_digits(make_trainer):
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=64, seed=0)
    model = ConvNetClassifier(input_size=dm.input_size, padding="same")
    trainer = make_trainer(max_epochs=4)
    trainer.fit(model, datamodule=dm)
    logged = dict(trainer.callback_metrics)
    for key in ("train/loss_step", "train/loss_epoch", "train/acc", "val/loss", "val/acc"):
        assert key in logged, sorted(logged)
    (result,) = trainer.test(model, datamodule=dm, verbose=False)
    assert set(result) == {"test/loss", "test/acc"}
    assert result["test/acc"] >= 0.9, result  # a floor far above chance (0.1), not one seed's exact figure


def test_predict_returns_probabilities(make_trainer):
    dm = DigitsDataModule(batch_size=50)
    model = ConvNetClassifier(input_size=8, padding="same")
    batches = make_trainer().predict(model, datamodule=dm)
    probs = torch.cat(batches)
    assert probs.shape == (len(dm._splits["test"]), 10)
    assert torch.allclose(probs.sum(-1), torch.ones(len(probs)), atol=1e-5)
    assert bool((probs >= 0).all())


def test_any_net_can_be_wrapped(make_trainer):
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    model = ConvNetClassifier(net=net, optimizer=SGDWarmup(warmup_steps=1))
    assert model.net is net and "net" not in model.hparams
    make_trainer(max_steps=3, limit_val_batches=1).fit(model, datamodule=DigitsDataModule(batch_size=32))
    assert model.trainer.global_step == 3


def test_hyperparameters_are_plain_data():
    model = ConvNetClassifier(input_size=8, padding="same", channels=(8, 16))
    blob = pickle.dumps(dict(model.hparams))
    assert b"lightning_bnsgd" not in blob, "hyperparameters must not pickle project classes"
    rebuilt = ConvNetClassifier(**dict(model.hparams))
    assert rebuilt.optimizer_config == model.optimizer_config
