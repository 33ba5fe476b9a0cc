"""Mixed precision, torch.compile and channels_last with both callbacks."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import torch

from lightning_bnsgd._compat import loggers
from lightning_bnsgd.bn.recalibrate import recalibrate_bn
from lightning_bnsgd.callbacks.bn_monitor import BNStatsMonitor
from lightning_bnsgd.callbacks.recalibration import BNRecalibration
from lightning_bnsgd.data.digits import DigitsDataModule
from lightning_bnsgd.models.classifier import ConvNetClassifier
from lightning_bnsgd.optim.sgd_warmup import SGDWarmup


def _metrics(log_dir) -> list[dict[str, str]]:
    with open(log_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _bn_metric_values(rows: list[dict[str, str]]) -> list[float]:
    return [float(v) for row in rows for k, v in row.items() if k.startswith("bn/") and v not in ("", None)]


def test_bf16_mixed_fit_recalibration_and_monitoring(tmp_path, make_trainer):
    model = ConvNetClassifier(input_size=8, padding="same", optimizer=SGDWarmup(warmup_steps=5))
    logger = loggers.CSVLogger(tmp_path, name="bf16")
    trainer = make_trainer(
        precision="bf16-mixed",
        max_epochs=2,
        limit_val_batches=2,
        logger=logger,
        log_every_n_steps=5,
        callbacks=[BNRecalibration(num_samples=512), BNStatsMonitor()],
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))
    for name, buf in model.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            assert buf.dtype == torch.float32, name
            assert torch.isfinite(buf).all(), name
            if name.endswith("running_var"):
                assert bool((buf >= 0).all()), name
    values = _bn_metric_values(_metrics(Path(logger.log_dir)))
    assert values and all(v == v for v in values), "monitor logged nothing or NaN under bf16-mixed"
    (result,) = trainer.test(model, datamodule=DigitsDataModule(batch_size=64), verbose=False)
    assert result["test/acc"] > 0.8


@pytest.mark.timeout(300)
def test_compile_and_channels_last_match_eager_statistics(tmp_path, make_trainer):
    torch.manual_seed(0)
    model = ConvNetClassifier(
        input_size=8,
        padding="same",
        compile=True,
        compile_backend="aot_eager",
        channels_last=True,
        optimizer=SGDWarmup(warmup_steps=5),
    )
    logger = loggers.CSVLogger(tmp_path, name="compiled")
    recal = BNRecalibration(num_samples=None, before_validation=False, at_train_end=True)
    dm = DigitsDataModule(batch_size=64)
    trainer = make_trainer(
        max_epochs=1,
        limit_val_batches=1,
        logger=logger,
        log_every_n_steps=4,
        callbacks=[recal, BNStatsMonitor()],
    )
    trainer.fit(model, datamodule=dm)
    # The monitor's hooks fired although the training steps run compiled.
    rows = _metrics(Path(logger.log_dir))
    gap_keys = {k for row in rows for k, v in row.items() if "gap_mean_mean" in k and v}
    assert gap_keys, "no batch-vs-running gap was logged for the compiled model"
    # Recalibrated statistics equal an eager recalibration of the same weights over the same data.
    eager = copy.deepcopy(model.net).to(memory_format=torch.contiguous_format)
    eager.train()
    recalibrate_bn(eager, ((x, y) for x, y in dm.train_dataloader()))
    compiled_bufs = dict(model.net.named_buffers())
    for name, buf in eager.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(compiled_bufs[name], buf, rtol=1e-4, atol=1e-5, msg=name)
