"""GPU checks (CUDA only; skipped elsewhere). Run with scripts/gpu_check.sh on a machine with a GPU."""

from __future__ import annotations

import pytest
import torch

from lightning_bnsgd import BNRecalibration, BNStatsMonitor, ConvNetClassifier, DigitsDataModule, SGDWarmup
from lightning_bnsgd.bn.recalibrate import recalibrate_bn

pytestmark = pytest.mark.gpu


def test_fit_16_mixed_with_both_callbacks_on_gpu(make_trainer):
    dm = DigitsDataModule(batch_size=64)
    model = ConvNetClassifier(input_size=8, padding="same", optimizer=SGDWarmup(warmup_epochs=1))
    trainer = make_trainer(
        accelerator="gpu",
        precision="16-mixed",
        max_epochs=6,
        callbacks=[BNRecalibration(), BNStatsMonitor(on_anomaly="raise")],
    )
    trainer.fit(model, datamodule=dm)
    for name, buf in model.named_buffers():
        if "running" in name:
            assert buf.dtype == torch.float32 and buf.is_cuda, name
            assert torch.isfinite(buf).all(), name
    (result,) = trainer.test(model, datamodule=dm, verbose=False)
    assert result["test/acc"] >= 0.95


def test_recalibration_is_exact_on_gpu():
    torch.manual_seed(0)
    x = torch.randn(1000, 6, device="cuda") * torch.linspace(0.5, 3, 6, device="cuda")
    x, _ = torch.sort(x, dim=0)  # batches differ strongly: between-batch variance matters
    bn = torch.nn.BatchNorm1d(6).cuda()
    recalibrate_bn(bn, list(x.split(96)))
    torch.testing.assert_close(bn.running_mean, x.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, x.var(0, unbiased=True), rtol=1e-5, atol=1e-5)
