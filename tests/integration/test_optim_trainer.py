"""``SGDWarmup`` + ``WarmupLR`` inside real Trainer runs: resume, gradient accumulation, DDP, LightningCLI."""

from __future__ import annotations

import csv
import json
import logging
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bnsgd._compat import Callback, LightningModule, pl
from lightning_bnsgd.cli import cli_main
from lightning_bnsgd.data.digits import DigitsDataModule
from lightning_bnsgd.models.classifier import ConvNetClassifier
from lightning_bnsgd.optim.schedule import WarmupLR
from lightning_bnsgd.optim.sgd_warmup import SGDWarmup

CONFIGS = Path(__file__).parent / "configs"


class LRRecorder(Callback):
    """Records the LR of every param group used by each optimizer step, keyed by ``trainer.global_step``."""

    def __init__(self) -> None:
        self.lrs: dict[int, list[float]] = {}
        self.steps: list[int] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.steps.append(trainer.global_step)
        self.lrs[trainer.global_step] = [group["lr"] for group in optimizer.param_groups]


class StopAt(Callback):
    """Stops the run once ``global_step`` reaches ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


NO_VAL = {"limit_val_batches": 0, "num_sanity_val_steps": 0}


def _digits_model(optimizer: SGDWarmup) -> ConvNetClassifier:
    return ConvNetClassifier(input_size=8, padding="same", channels=(4, 8), optimizer=optimizer)


def test_resume_in_mid_warmup_gives_identical_lr_sequence(tmp_path: Path, make_trainer: Any) -> None:
    config = SGDWarmup(lr=0.2, warmup_epochs=1.5, warmup="exponential", decay="cosine", min_lr=0.002)
    run = dict(max_epochs=3, limit_train_batches=6, **NO_VAL)  # 18 steps, warmup 9 steps

    full = LRRecorder()
    torch.manual_seed(0)
    make_trainer(default_root_dir=tmp_path / "full", callbacks=[full], **run).fit(
        _digits_model(config), DigitsDataModule(batch_size=32)
    )
    assert full.steps == list(range(18))
    assert len({lrs[0] for lrs in full.lrs.values()}) == 18  # the LR changes every step

    first = LRRecorder()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    torch.manual_seed(0)
    make_trainer(
        default_root_dir=tmp_path / "a", callbacks=[first, ckpt, StopAt(4)], enable_checkpointing=True, **run
    ).fit(_digits_model(config), DigitsDataModule(batch_size=32))
    (path,) = list((tmp_path / "ckpt").glob("*step=4*.ckpt"))
    assert torch.load(path, weights_only=True)["lr_schedulers"][0]["last_epoch"] == 4

    resumed = LRRecorder()
    make_trainer(default_root_dir=tmp_path / "b", callbacks=[resumed], **run).fit(
        _digits_model(config), DigitsDataModule(batch_size=32), ckpt_path=str(path)
    )
    assert first.steps == [0, 1, 2, 3]
    assert resumed.steps == list(range(4, 18))
    assert {**first.lrs, **resumed.lrs} == full.lrs  # exact equality, every group


class TinyModule(LightningModule):
    """A plain user LightningModule (no ConvNetClassifier) that uses SGDWarmup in configure_optimizers."""

    def __init__(self, optimizer: SGDWarmup) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        self.config = optimizer

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return self.config.build(self)


def _tensors(n: int = 128, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size)


def test_accumulate_grad_batches_scales_lr_and_steps(make_trainer: Any, caplog: pytest.LogCaptureFixture) -> None:
    config = SGDWarmup(lr_base=0.4, warmup_epochs=1, lr_base_size=256, decay="linear")
    recorder = LRRecorder()
    model = TinyModule(config)
    trainer = make_trainer(callbacks=[recorder], max_epochs=3, accumulate_grad_batches=4, **NO_VAL)
    with caplog.at_level(logging.INFO):
        trainer.fit(model, _tensors(n=128, batch_size=8))  # 16 batches -> 4 steps per epoch
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(sched, WarmupLR)
    assert sched.base_lrs == [pytest.approx(0.4 * 8 * 4 / 256)] * 2  # effective batch 32
    assert (sched.warmup_steps, sched.total_steps) == (4, 12)
    assert recorder.steps == list(range(12))  # one LR value per optimizer step, not per batch
    assert recorder.lrs[4][0] == pytest.approx(0.05)  # the first step after warmup runs at the base LR
    assert "lr_base=0.4 x 32/256 (linear), effective batch 32" in caplog.text


def test_infinite_run_asks_for_max_steps(make_trainer: Any) -> None:
    trainer = make_trainer(max_epochs=-1, **NO_VAL)
    with pytest.raises(ValueError, match="max_steps"):
        trainer.fit(TinyModule(SGDWarmup(warmup_steps=1)), _tensors())


class _SaveLR(Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        sched = trainer.lr_scheduler_configs[0].scheduler
        out = {"world_size": trainer.world_size, "base_lrs": sched.base_lrs, "total": sched.total_steps}
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(out))


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_ddp_two_devices_scales_lr_with_world_size(tmp_path: Path, make_trainer: Any) -> None:
    config = SGDWarmup(lr_base=0.1, warmup_steps=1, lr_base_size=256)
    trainer = make_trainer(callbacks=[_SaveLR(tmp_path)], devices=2, strategy="ddp_spawn", max_epochs=1, **NO_VAL)
    trainer.fit(TinyModule(config), _tensors(n=64, batch_size=8))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for res in results:
        assert res["world_size"] == 2
        assert res["base_lrs"] == [pytest.approx(0.1 * 8 * 2 / 256)] * 2  # effective batch 16
        assert res["total"] == 4  # 64 samples / 2 ranks / batch 8
    assert results[0] == results[1]


def test_cli_yaml_optimizer_block_reaches_module_and_lr_changes_every_step(tmp_path: Path) -> None:
    cli = cli_main(
        [
            "fit",
            "--config",
            str(CONFIGS / "optim_cli.yaml"),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
        ]
    )
    cfg = cli.model.optimizer_config
    assert isinstance(cfg, SGDWarmup)
    assert (cfg.lr, cfg.lr_base, cfg.momentum, cfg.nesterov, cfg.warmup_steps) == (None, 0.8, 0.8, False, 3)
    opt = cli.trainer.optimizers[0]
    assert [g["momentum"] for g in opt.param_groups] == [0.8, 0.8]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.001, 0.0]

    (metrics,) = list(tmp_path.rglob("metrics.csv"))
    with metrics.open() as f:
        rows = [row for row in csv.DictReader(f) if row.get("lr-SGD/decay")]
    lrs = [float(row["lr-SGD/decay"]) for row in rows]
    assert [int(row["step"]) for row in rows] == list(range(8))
    assert lrs == [float(row["lr-SGD/no_decay"]) for row in rows]
    assert all(a != b for a, b in pairwise(lrs)), lrs  # changes at every step
    assert lrs[0] == pytest.approx(0.25 * 0.1)  # warmup_start_factor x (lr_base 0.8 x 32 / 256)
    assert lrs[3] == pytest.approx(0.1)  # first step after warmup: the scaled peak LR
    assert lrs[7] == pytest.approx(0.01 + 0.09 * 1 / 5)  # linear decay to min_lr 0.01 at step 8
