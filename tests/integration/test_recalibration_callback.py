"""``BNRecalibration`` in ``Trainer.fit``: timing, checkpoints, resume, SWA / WeightAveraging, protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_bnsgd._compat import Callback, Trainer, loggers, pl
from lightning_bnsgd.bn.recalibrate import recalibrate_bn
from lightning_bnsgd.callbacks.recalibration import BNRecalibration
from lightning_bnsgd.data.digits import DigitsDataModule
from lightning_bnsgd.models.classifier import ConvNetClassifier

SMALL_RUN = {"max_epochs": 1, "limit_train_batches": 4, "limit_val_batches": 2, "num_sanity_val_steps": 0}


@pytest.fixture
def small_trainer(make_trainer: Any) -> Any:
    """The shared quiet Trainer (``make_trainer``), for a short run: ``small_trainer(callbacks, **overrides)``."""

    def factory(callbacks: list[Any], **overrides: Any) -> Trainer:
        return make_trainer(callbacks=callbacks, **{**SMALL_RUN, **overrides})

    return factory


def _model(**kwargs: Any) -> ConvNetClassifier:
    return ConvNetClassifier(input_size=8, padding="same", channels=(8, 8), **kwargs)


def _data(batch_size: int = 64) -> DigitsDataModule:
    return DigitsDataModule(batch_size=batch_size)


def _exact_first_layer(model: ConvNetClassifier, dm: DigitsDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact statistics of the first BatchNorm's inputs over the whole train set (conv -> ReLU)."""
    dm.setup("fit")
    x = torch.cat([b[0] for b in dm.train_dataloader()])
    block = model.net.features[0]
    with torch.no_grad():
        h = torch.relu(block.conv(x)).double()
    return h.mean((0, 2, 3)), h.var((0, 2, 3))


def _first_norm(model: ConvNetClassifier) -> torch.nn.BatchNorm2d:
    return model.net.features[0].norm


class _Probe(Callback):
    """Copies the first BatchNorm's buffers as validation sees them, and counts sanity-check batches."""

    def __init__(self) -> None:
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, *args: Any) -> None:
        if batch_idx == 0 and not trainer.sanity_checking:
            norm = _first_norm(pl_module)
            self.seen.append((norm.running_mean.clone(), norm.running_var.clone()))


def test_validation_and_checkpoint_carry_exact_statistics(small_trainer: Any, tmp_path: Path) -> None:
    dm, model = _data(), _model()
    probe = _Probe()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    recal = BNRecalibration(num_samples=None, at_train_end=False)
    trainer = small_trainer(
        [recal, probe, ckpt], enable_checkpointing=True, num_sanity_val_steps=2, limit_train_batches=1.0
    )
    trainer.fit(model, datamodule=dm)
    assert recal.recalibrations == 1  # once before validation, never in the sanity check
    mean, var = _exact_first_layer(model, dm)
    assert len(probe.seen) == 1
    torch.testing.assert_close(probe.seen[0][0].double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probe.seen[0][1].double(), var, rtol=1e-5, atol=1e-6)
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    torch.testing.assert_close(state["net.features.0.norm.running_var"].double(), var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state["net.features.0.norm.running_mean"].double(), mean, rtol=1e-5, atol=1e-6)
    assert recal.last_report is not None and recal.last_report.num_samples == len(dm._splits["train"])


def test_every_n_epochs_train_end_logging_and_frozen_layers(small_trainer: Any, tmp_path: Path) -> None:
    class FrozenFirst(ConvNetClassifier):
        def on_train_epoch_start(self) -> None:
            _first_norm(self).eval()  # a frozen BatchNorm: must stay untouched

    model = FrozenFirst(input_size=8, padding="same", channels=(8, 8))
    frozen = {k: v.clone() for k, v in _first_norm(model).named_buffers()}
    recal = BNRecalibration(num_samples=256, every_n_epochs=2, log_prefix="recal")
    logger = loggers.CSVLogger(str(tmp_path), name="csv")
    trainer = small_trainer([recal], max_epochs=3, logger=logger, log_every_n_steps=1)
    trainer.fit(model, datamodule=_data())
    assert recal.recalibrations == 2  # before validation of epoch 1 (0-based), then at train end
    assert recal.last_report is not None
    assert "net.features.0.norm" in recal.last_report.skipped
    assert recal.last_report.layers == ["net.features.1.norm"]
    assert recal.last_report.num_samples == 256
    for k, v in _first_norm(model).named_buffers():
        assert torch.equal(v, frozen[k]), k
    metrics = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert "recal/samples" in metrics and "recal/var_shift" in metrics


def test_resume_and_two_instances(small_trainer: Any, tmp_path: Path) -> None:
    a = BNRecalibration(num_samples=128, log_prefix="a")
    b = BNRecalibration(num_samples=128, mode="sequential", log_prefix="b", at_train_end=False)
    assert a.state_key != b.state_key
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = small_trainer([a, b, ckpt], enable_checkpointing=True)
    trainer.fit(_model(), datamodule=_data())
    # `a` recalibrates before validation; at train end the weights are those it already recalibrated: skipped
    assert (a.recalibrations, b.recalibrations) == (1, 1)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    assert saved[a.state_key]["recalibrations"] == 1  # saved at validation end
    assert saved[b.state_key]["recalibrations"] == 1

    a2 = BNRecalibration(num_samples=128, log_prefix="a")
    b2 = BNRecalibration(num_samples=128, mode="sequential", log_prefix="b", at_train_end=False)
    trainer = small_trainer([a2, b2], max_epochs=2)
    trainer.fit(_model(), datamodule=_data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert (a2.recalibrations, b2.recalibrations) == (2, 2)
    assert a2.last_run == (1, 8)  # before the second epoch's validation; train end had nothing new


def test_protocol_transfer_hooks_and_custom_loader(small_trainer: Any, tmp_path: Path) -> None:
    class WithProtocol(ConvNetClassifier):
        def __init__(self) -> None:
            super().__init__(input_size=8, padding="same", channels=(8, 8))
            self.recal_calls = 0
            self.transfers = 0

        def bn_recalibration_step(self, batch: Any) -> None:
            self.recal_calls += 1
            self(batch["image"])

        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            self.transfers += 1
            return batch

    x = torch.randn(40, 1, 8, 8)
    loader = DataLoader([{"image": img} for img in x], batch_size=16)
    model = WithProtocol()
    recal = BNRecalibration(num_samples=None, dataloader=lambda: loader, before_validation=False)
    small_trainer([recal], limit_train_batches=2).fit(model, datamodule=_data())
    # the first training batch runs one trial forward of the loader's first batch; the recalibration three
    assert model.recal_calls == 1 + 3 and recal.recalibrations == 1
    assert model.transfers == 2 + 2 + 1 + 3  # two training, two validation, the trial's and three recalibration batches
    with torch.no_grad():
        h = torch.relu(model.net.features[0].conv(x)).double()
    torch.testing.assert_close(_first_norm(model).running_var.double(), h.var((0, 2, 3)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("averaging", ["swa", "weight_averaging"])
def test_recalibrates_averaged_weights(small_trainer: Any, tmp_path: Path, averaging: str) -> None:
    dm, model = _data(), _model()
    if averaging == "swa":
        avg = pl.callbacks.StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)
    else:
        avg = pl.callbacks.WeightAveraging()
    recal = BNRecalibration(num_samples=None)
    small_trainer([avg, recal], max_epochs=2, limit_train_batches=1.0).fit(model, datamodule=dm)
    mean, var = _exact_first_layer(model, dm)  # exact for the final (averaged) weights
    torch.testing.assert_close(_first_norm(model).running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_first_norm(model).running_var.double(), var, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="must come after"):
        small_trainer([BNRecalibration(), type(avg)(**({"swa_lrs": 0.01} if averaging == "swa" else {}))]).fit(
            _model(), datamodule=dm
        )


class _AverageSnapshot(Callback):
    """Copies SWA's averaged parameters when its BatchNorm-update epoch starts (after SWA put them in the model)."""

    def __init__(self) -> None:
        self.average: list[torch.Tensor] | None = None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: Any) -> None:
        if trainer.fit_loop._skip_backward:
            self.average = [p.detach().clone() for p in pl_module.parameters()]


@pytest.mark.parametrize("with_recalibration", [True, False])
def test_final_swa_weights_are_the_average(small_trainer: Any, tmp_path: Path, with_recalibration: bool) -> None:
    # Lightning's SWA steps the optimizer once in its BatchNorm-update epoch with the gradients of the last real
    # step (they survive when no validation ran in between: validation frees them); BNRecalibration drops them, so
    # the final weights are exactly the average. Without it, the weights move.
    dm, model = _data(), _model()
    snapshot = _AverageSnapshot()
    swa = pl.callbacks.StochasticWeightAveraging(swa_lrs=0.2, swa_epoch_start=1)
    callbacks: list[Any] = [swa, snapshot]
    if with_recalibration:
        callbacks.append(BNRecalibration(num_samples=None, before_validation=False))
    small_trainer(callbacks, max_epochs=3, limit_train_batches=1.0, limit_val_batches=0).fit(model, datamodule=dm)
    assert snapshot.average is not None
    moved = max((p.detach() - a).abs().max().item() for p, a in zip(model.parameters(), snapshot.average, strict=True))
    if with_recalibration:
        assert moved == 0.0
    else:
        assert moved > 0.0


class _Endless(IterableDataset):
    def __iter__(self) -> Any:
        while True:
            yield torch.randn(1, 8, 8), torch.tensor(0)


def test_bad_arguments_and_bad_loaders(small_trainer: Any, tmp_path: Path) -> None:
    for kwargs in ({"num_samples": 0}, {"every_n_epochs": 0}, {"mode": "eval"}, {"dropout": "none"}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            BNRecalibration(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dataloader"):
        BNRecalibration(dataloader=3)  # type: ignore[arg-type]
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0)), batch_size=4)
    with pytest.raises(ValueError, match="empty"):
        small_trainer([BNRecalibration(dataloader=empty)]).fit(_model(), datamodule=_data())
    endless = DataLoader(_Endless(), batch_size=8)
    with pytest.raises(ValueError, match="infinite"):
        small_trainer([BNRecalibration(dataloader=endless, num_samples=None)]).fit(_model(), datamodule=_data())
    recal = BNRecalibration(dataloader=endless, num_samples=40, before_validation=False)
    small_trainer([recal], limit_train_batches=1).fit(_model(), datamodule=_data())
    assert recal.last_report is not None and recal.last_report.num_samples == 40


def _csv_rows(logger: Any) -> list[dict[str, str]]:
    import csv

    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_metrics_are_logged_at_the_step_of_the_modules_own_validation_metrics(
    small_trainer: Any, tmp_path: Path
) -> None:
    # the recalibration before validation and the module's `self.log("val/acc")` of that validation run describe the
    # same weights: Lightning writes the latter at its logging step, so must the callback (not at global_step)
    logger = loggers.CSVLogger(str(tmp_path), name="csv")
    recal = BNRecalibration(num_samples=128, at_train_end=False)
    small_trainer([recal], max_epochs=2, logger=logger, log_every_n_steps=1).fit(_model(), datamodule=_data())
    rows = _csv_rows(logger)
    recal_steps = [int(r["step"]) for r in rows if r.get("bn_recalibration/samples")]
    val_steps = [int(r["step"]) for r in rows if r.get("val/acc")]
    assert len(recal_steps) == len(val_steps) == 2
    assert recal_steps == val_steps == [3, 7]  # 4 steps per epoch: the fourth batch of each epoch is step 3, 7


def test_configurations_that_can_never_act_are_refused(small_trainer: Any) -> None:
    with pytest.raises(ValueError, match=r"BNRecalibration: `before_validation=False` and `at_train_end=False`"):
        BNRecalibration(before_validation=False, at_train_end=False)
    never = BNRecalibration(every_n_epochs=3, at_train_end=False)
    trainer = small_trainer([never], max_epochs=2)
    with pytest.raises(ValueError, match=r"BNRecalibration: `every_n_epochs=3` is larger than .*`max_epochs=2`"):
        trainer.fit(_model(), datamodule=_data())
    assert trainer.global_step == 0  # refused at setup, before any step
    with pytest.raises(ValueError, match=r"BNRecalibration: the Trainer runs no validation"):
        small_trainer([BNRecalibration(at_train_end=False)], limit_val_batches=0).fit(_model(), datamodule=_data())
    # the same intervals act when train end may recalibrate, or when the run is long enough
    small_trainer([BNRecalibration(every_n_epochs=3, num_samples=64)], max_epochs=2).fit(_model(), datamodule=_data())
    acting = BNRecalibration(every_n_epochs=2, at_train_end=False, num_samples=64)
    small_trainer([acting], max_epochs=2).fit(_model(), datamodule=_data())
    assert acting.recalibrations == 1


@pytest.mark.parametrize(
    ("state", "error", "match"),
    [
        ({"recalibrations": -7, "last_run": None}, ValueError, r"`recalibrations` must be an integer >= 0, got -7"),
        ({"recalibrations": "3", "last_run": None}, TypeError, r"`recalibrations` must be an integer >= 0, got '3'"),
        ({"recalibrations": 1, "last_run": 5}, TypeError, r"`last_run` must be None or a pair"),
        ({"recalibrations": 1, "last_run": (0, -100)}, ValueError, r"`last_run\[1\] \(global_step\)`.*got -100"),
        ({"batches_stepped": 4}, ValueError, r"none of the keys .*not a BNRecalibration state"),
        ([1, 2], TypeError, r"must be a dict"),
    ],
)
def test_corrupted_or_foreign_state_is_refused_naming_the_key(state: Any, error: type, match: str) -> None:
    recal = BNRecalibration()
    with pytest.raises(error, match=r"^BNRecalibration checkpoint state.*" + match):
        recal.load_state_dict(state)
    assert (recal.recalibrations, recal.last_run) == (0, None)  # nothing half-loaded


def test_state_with_a_missing_key_falls_back_with_a_warning(small_trainer: Any, tmp_path: Path) -> None:
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = BNRecalibration(num_samples=64)
    small_trainer([first, ckpt], enable_checkpointing=True).fit(_model(), datamodule=_data())
    path = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["callbacks"][first.state_key]["last_run"]  # as written by an older version
    torch.save(checkpoint, path)
    resumed = BNRecalibration(num_samples=64)
    with pytest.warns(UserWarning, match=r"BNRecalibration checkpoint state: missing keys \['last_run'\]"):
        small_trainer([resumed], max_epochs=2).fit(_model(), datamodule=_data(), ckpt_path=str(path))
    assert resumed.recalibrations == 2 and resumed.last_run == (1, 8)


def _loader_of(batches: list[Any]) -> DataLoader:
    return DataLoader(batches, batch_size=None)


def _digits(n: int = 64, channels: int = 1, dtype: torch.dtype = torch.float32) -> list[Any]:
    x = torch.randn(n, channels, 8, 8).to(dtype)
    return [(x[i : i + 16], torch.zeros(16, dtype=torch.long)) for i in range(0, n, 16)]


# name -> (BNRecalibration's keyword arguments, expected error, message pattern)
_EARLY: dict[str, tuple[dict[str, Any], type, str]] = {
    "empty_loader": ({"dataloader": _loader_of([])}, ValueError, r"the dataloader is empty"),
    "callable_returns_a_number": ({"dataloader": lambda: 5}, TypeError, r"`dataloader\(\)` must return an iterable"),
    "no_tensor_with_a_budget": (
        {"dataloader": _loader_of([{"name": ["a", "b"]}] * 3), "forward_fn": lambda module, batch: None},
        TypeError,
        r"`num_samples=4096` needs batches with a tensor .* has none\. Set `num_samples=None`",
    ),
    "int64_images": ({"dataloader": _loader_of(_digits(dtype=torch.int64))}, RuntimeError, r"trial forward .*Long"),
    "three_channels": ({"dataloader": _loader_of(_digits(channels=3))}, RuntimeError, r"trial forward .*channels"),
}


@pytest.mark.parametrize("name", list(_EARLY))
def test_a_dataloader_recalibration_cannot_use_fails_before_the_first_step(small_trainer: Any, name: str) -> None:
    kwargs, error, match = _EARLY[name]
    trainer = small_trainer([BNRecalibration(**kwargs)], max_epochs=2)
    with pytest.raises(error, match=r"^BNRecalibration:? .*" + match) as info:
        trainer.fit(_model(), datamodule=_data())
    assert trainer.global_step == 0  # at setup or at the first training batch, not at the first validation
    assert "num_batches" not in str(info.value)  # an argument BNRecalibration does not have


def test_a_forward_fn_of_the_wrong_arity_is_refused_by_the_constructor() -> None:
    with pytest.raises(TypeError, match=r"^BNRecalibration: `forward_fn` is called as `forward_fn\(module, batch\)`"):
        BNRecalibration(forward_fn=lambda batch: None)
    BNRecalibration(forward_fn=lambda module, batch, *rest: None)  # any signature that takes two is fine


def test_a_later_batch_without_a_tensor_names_the_callbacks_argument(small_trainer: Any) -> None:
    batches = [*_digits(32), {"name": ["a", "b"]}]  # the first batches are fine: the problem shows only mid-pass

    def forward(module: Any, batch: Any) -> None:
        if isinstance(batch, (tuple, list)):
            module(batch[0])

    recal = BNRecalibration(dataloader=_loader_of(batches), forward_fn=forward)
    with pytest.raises(TypeError, match=r"^BNRecalibration: `num_samples=4096` needs batches with a tensor") as info:
        small_trainer([recal]).fit(_model(), datamodule=_data())
    assert "num_batches" not in str(info.value)
    recal = BNRecalibration(dataloader=_loader_of(batches), forward_fn=forward, num_samples=None)
    small_trainer([recal]).fit(_model(), datamodule=_data())  # without a budget nothing needs counting
    assert recal.recalibrations == 1
    # called directly, recalibrate_bn names its own way out: it has `num_batches`
    with pytest.raises(TypeError, match=r"^recalibrate_bn: a sample budget .* Pass `num_batches` instead"):
        recalibrate_bn(_model(), batches, num_samples=4096, forward_fn=forward)


def test_every_batchnorm_frozen_skips_with_one_warning_until_one_is_unfrozen(small_trainer: Any) -> None:
    class FrozenAtFirst(ConvNetClassifier):
        """Fine-tunes with every BatchNorm frozen for two epochs, then unfreezes them (as BackboneFinetuning may)."""

        def on_train_epoch_start(self) -> None:
            frozen = self.current_epoch < 2
            for module in self.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.train(not frozen)

    model = FrozenAtFirst(input_size=8, padding="same", channels=(8, 8))
    initial = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    dm, probe = _data(), _Probe()
    recal = BNRecalibration(num_samples=None, at_train_end=False)
    trainer = small_trainer([recal, probe], max_epochs=3, limit_train_batches=1.0)
    with pytest.warns(UserWarning, match="BNRecalibration") as caught:
        trainer.fit(model, datamodule=dm)
    frozen = [w for w in caught if "frozen" in str(w.message) and "BNRecalibration" in str(w.message)]
    assert len(frozen) == 1, [str(w.message) for w in caught]  # once per fit, not once per epoch
    message = str(frozen[0].message)
    assert "train mode" in message and "model.eval()" not in message
    # epochs 0 and 1: skipped, validation saw the untouched buffers; epoch 2: recalibrated, exactly
    assert recal.recalibrations == 1 and recal.last_run is not None and recal.last_run[0] == 2
    for seen in probe.seen[:2]:
        torch.testing.assert_close(seen[0], initial["net.features.0.norm.running_mean"], rtol=0, atol=0)
        torch.testing.assert_close(seen[1], initial["net.features.0.norm.running_var"], rtol=0, atol=0)
    mean, var = _exact_first_layer(model, dm)
    torch.testing.assert_close(probe.seen[2][0].double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probe.seen[2][1].double(), var, rtol=1e-5, atol=1e-6)
