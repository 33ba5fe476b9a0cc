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


class _SplitOverDevices(torch.nn.Module):
    """Model parallel in one process: the first Conv-BN block on the CPU, the second on CUDA."""

    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
        self.second = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3), torch.nn.BatchNorm2d(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = self.second[0].weight.device
        return self.second(self.first(x).to(device))


@pytest.mark.parametrize("mode", ["train", "sequential"])
def test_recalibration_with_layers_on_cpu_and_cuda_matches_the_model_on_one_device(mode):
    torch.manual_seed(0)
    reference = _SplitOverDevices()
    split = _SplitOverDevices()
    split.load_state_dict(reference.state_dict())
    split.second.cuda()
    data = [torch.randn(n, 1, 8, 8) * 3 + 1 for n in (16, 9, 30)]
    expected = recalibrate_bn(reference, data, mode=mode)
    report = recalibrate_bn(split, data, mode=mode)
    assert report.layers == expected.layers == ["first.1", "second.1"]
    assert split.first[1].running_mean.device.type == "cpu" and split.second[1].running_mean.is_cuda
    for name, buffer in reference.state_dict().items():
        if "running" in name:
            torch.testing.assert_close(split.state_dict()[name].cpu(), buffer, rtol=1e-5, atol=1e-6)
