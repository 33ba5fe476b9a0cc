"""Faults inside a Trainer: errors during recalibration, KeyboardInterrupt during fit, non-finite batches."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_bnsgd._compat import Callback, pl
from lightning_bnsgd.callbacks.recalibration import BNRecalibration
from lightning_bnsgd.data.digits import DigitsDataModule
from lightning_bnsgd.models.classifier import ConvNetClassifier
from lightning_bnsgd.optim.sgd_warmup import SGDWarmup


def _model() -> ConvNetClassifier:
    return ConvNetClassifier(input_size=8, padding="same", optimizer=SGDWarmup(warmup_steps=2))


def _bn_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


class _Boom(RuntimeError):
    pass


def _failing_loader(fail_at: int, bad: str = "raise") -> DataLoader:
    """A loader whose batch number ``fail_at`` raises (``bad="raise"``) or holds NaN (``bad="nan"``)."""
    dm = DigitsDataModule(batch_size=32)
    dm.setup()
    x, y = dm._splits["train"].tensors

    class Flaky(TensorDataset):
        def __getitem__(self, i):
            if i // 32 == fail_at:
                if bad == "raise":
                    raise _Boom(f"sample {i} cannot be read")
                return torch.full_like(x[i], float("nan")), y[i]
            return super().__getitem__(i)

    return DataLoader(Flaky(x, y), batch_size=32)


class _Snapshot(Callback):
    """Copies the BN buffers right before recalibration would run (at validation start)."""

    def __init__(self) -> None:
        self.before: dict[str, torch.Tensor] = {}

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.before = _bn_state(pl_module)


@pytest.mark.parametrize("bad", ["raise", "nan"])
def test_error_mid_recalibration_restores_buffers_and_stops_trainer(make_trainer, bad):
    model = _model()
    snapshot = _Snapshot()
    recal = BNRecalibration(num_samples=512, dataloader=_failing_loader(fail_at=3, bad=bad))
    trainer = make_trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=1, callbacks=[snapshot, recal])
    expected = _Boom if bad == "raise" else ValueError
    with pytest.raises(expected) as info:
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    if bad == "nan":
        assert "nan" in str(info.value).lower() or "finite" in str(info.value).lower()
    assert snapshot.before, "validation (and so recalibration) must have started"
    after = _bn_state(model)
    for name, before in snapshot.before.items():
        assert torch.equal(after[name], before), f"{name} changed although recalibration failed"
    assert trainer.interrupted or trainer.state.status.value in {"interrupted", "finished"}


def test_nonfinite_batches_can_be_skipped_on_request(make_trainer):
    model = _model()
    recal = BNRecalibration(num_samples=512, nonfinite="skip", dataloader=_failing_loader(fail_at=1, bad="nan"))
    trainer = make_trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=1, callbacks=[recal])
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    for name, buf in model.named_buffers():
        assert torch.isfinite(buf.float()).all(), name


class _CtrlC(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 6:
            raise KeyboardInterrupt


def test_keyboard_interrupt_leaves_a_loadable_checkpoint(tmp_path, make_trainer):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2)
    trainer = make_trainer(
        max_epochs=3,
        limit_val_batches=1,
        enable_checkpointing=True,
        callbacks=[_CtrlC(), BNRecalibration(num_samples=256), ckpt],
    )
    with pytest.raises(SystemExit):  # Lightning shuts down gracefully, then exits
        trainer.fit(_model(), datamodule=DigitsDataModule(batch_size=32))
    assert trainer.interrupted
    last = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 4  # the last save before the interrupt (every 2 steps)
    restored = ConvNetClassifier.load_from_checkpoint(last, weights_only=True)
    assert restored.hparams.optimizer == state["hyper_parameters"]["optimizer"]
    resumed = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    resumed.fit(_model(), datamodule=DigitsDataModule(batch_size=32), ckpt_path=str(last))
    assert resumed.global_step > 4
