"""Resume: a run interrupted mid-epoch and mid-warmup, then resumed from its last checkpoint, ends like an
uninterrupted one."""

from __future__ import annotations

import contextlib

import pytest
import torch

from lightning_bnsgd._compat import Callback, Trainer, pl
from lightning_bnsgd.callbacks.bn_monitor import BNStatsMonitor
from lightning_bnsgd.callbacks.recalibration import BNRecalibration
from lightning_bnsgd.data.digits import DigitsDataModule
from lightning_bnsgd.models.classifier import ConvNetClassifier
from lightning_bnsgd.optim.sgd_warmup import SGDWarmup

STOP_AT = 7  # digits train split: 20 batches of 64 per epoch; warmup is one epoch -> mid-epoch and mid-warmup


class _Interrupt(Exception):
    pass


class RecordLR(Callback):
    """Records the LR each optimizer step runs at, keyed by global step."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.lrs: dict[int, float] = {}
        self.stop_at = stop_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.stop_at is not None and trainer.global_step == self.stop_at:
            raise _Interrupt


def _run(tmp_path, name: str, stop_at: int | None = None, ckpt_path: str | None = None):
    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=64)
    model = ConvNetClassifier(input_size=dm.input_size, padding="same", optimizer=SGDWarmup(lr=0.1, warmup_epochs=1))
    recorder = RecordLR(stop_at)
    recal = BNRecalibration(num_samples=256)
    monitor = BNStatsMonitor(log_every_n_steps=5)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / name, save_last=True, every_n_train_steps=1, save_top_k=0)
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_val_batches=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder, recal, monitor, ckpt],
        default_root_dir=tmp_path,
    )
    with contextlib.suppress(_Interrupt):
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, model, recorder, recal, monitor


@pytest.mark.timeout(300)
def test_resume_mid_epoch_mid_warmup_matches_uninterrupted_run(tmp_path):
    full_trainer, full_model, full_lr, full_recal, full_monitor = _run(tmp_path, "full")
    _, _, part_lr, _, _ = _run(tmp_path, "part", stop_at=STOP_AT)
    last = tmp_path / "part" / "last.ckpt"
    # The checkpoint is plain data: it loads with weights_only=True.
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] < STOP_AT
    resumed_trainer, resumed_model, resumed_lr, resumed_recal, resumed_monitor = _run(
        tmp_path, "resumed", ckpt_path=str(last)
    )
    assert resumed_trainer.global_step == full_trainer.global_step == 40
    # same LR sequence, exactly, for every step, before and after the interruption
    start = state["global_step"]
    assert min(resumed_lr.lrs) == start
    assert {s: part_lr.lrs[s] for s in range(start)} == {s: full_lr.lrs[s] for s in range(start)}
    assert {s: lr for s, lr in resumed_lr.lrs.items()} == {s: full_lr.lrs[s] for s in range(start, 40)}
    # same callback states
    assert resumed_recal.state_dict() == full_recal.state_dict()
    assert resumed_monitor.state_dict() == full_monitor.state_dict()
    # BN buffers within float tolerance
    full_buffers = dict(full_model.named_buffers())
    for name, buf in resumed_model.named_buffers():
        torch.testing.assert_close(buf, full_buffers[name], rtol=1e-4, atol=1e-5, msg=name)
