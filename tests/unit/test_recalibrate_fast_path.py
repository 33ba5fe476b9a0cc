"""The fast path of mode "train": one copy per forward, counts learned per batch shape, forwards end early.

Each case compares against the hook-free truth (the statistics of what each layer saw), on models where reading
all layers at once after the forward could go wrong: shapes that change, a layer the forward skips, a layer
called twice, a module that replaces its buffer, layers on different dtypes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_bnsgd.bn.collector import FLUSH_EVERY
from lightning_bnsgd.bn.recalibrate import recalibrate_bn


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-5, atol=1e-6)


def _channel_stats(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [0, *range(2, h.dim())]
    return h.double().mean(dims), h.double().var(dims)


class _Recorder:
    """Collects each BatchNorm layer's inputs (the truth the statistics must match)."""

    def __init__(self, model: nn.Module) -> None:
        self.inputs: dict[nn.Module, list[torch.Tensor]] = {}
        self.handles = [
            m.register_forward_pre_hook(self._hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)
        ]

    def _hook(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.inputs.setdefault(module, []).append(args[0].detach().transpose(0, 1).flatten(1).T)

    def stats(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return _channel_stats(torch.cat(self.inputs[module]))


class _Net(nn.Module):
    """Conv-BN stack whose second BN runs only on even-sized batches and whose third runs twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)
        self.bn3 = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)
        self.head_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv(x)))
        if x.shape[0] % 2 == 0:
            h = self.bn2(h)
        h = self.bn3(self.bn3(h) * 0.5 + 1.0)
        self.head_calls += 1
        return self.head(h.mean((2, 3)))


def _batches(sizes: list[int], hw: list[int]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(n, 2, s, s, generator=gen) + i * 0.3 for i, (n, s) in enumerate(zip(sizes, hw, strict=True))]


def _truth(model: nn.Module, batches: list[torch.Tensor]) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the statistics of everything it saw in one train-mode pass with momentum 1 (reference loop)."""
    reference = _Net()
    reference.load_state_dict(model.state_dict())
    recorder = _Recorder(reference)
    reference.train()
    with torch.no_grad():
        for b in batches:
            reference(b)
    mapping = {getattr(reference, n): getattr(model, n) for n in ("bn1", "bn2", "bn3")}
    return {mapping[m]: recorder.stats(m) for m in recorder.inputs}


@pytest.mark.parametrize("count", [5, FLUSH_EVERY + 7])
def test_shapes_skips_and_repeats_are_exact(count: int) -> None:
    sizes = [4, 3, 4, 6, 3, 4] * (count // 6 + 1)
    hw = [5, 5, 6, 5, 5, 5] * (count // 6 + 1)
    batches = _batches(sizes[:count], hw[:count])
    model = _Net()
    expected = _truth(model, batches)
    report = recalibrate_bn(model, batches)
    assert report.layers == ["bn1", "bn2", "bn3"] and report.num_batches == count
    for layer, (mean, var) in expected.items():
        _close(layer.running_mean, mean)
        _close(layer.running_var, var)


def test_forward_ends_after_the_last_batchnorm_layer() -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 6 * 6, 5))
    calls: list[int] = []
    model[3].register_forward_hook(lambda m, a, o: calls.append(1))
    x = torch.randn(40, 1, 8, 8)
    recalibrate_bn(model, torch.split(x, 8))
    assert len(calls) == 1  # only the first forward of the shape, which learns where the last layer is


def test_a_layer_the_first_forward_skipped_is_an_error_not_a_wrong_count() -> None:
    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(2)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.bn(x) if self.calls > 1 else x  # data-dependent: the first forward skips the layer

    model = Gate()
    before = model.bn.running_var.clone()
    with pytest.raises(RuntimeError, match="element count"):
        recalibrate_bn(model, [torch.randn(4, 2) for _ in range(3)])
    assert torch.equal(model.bn.running_var, before)


def test_a_module_that_replaces_its_buffers_is_read_through_hooks() -> None:
    class Replacing(nn.BatchNorm1d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = super().forward(x)
            self.running_mean = self.running_mean.clone()  # replaces instead of updating in place
            return out

    model = nn.Sequential(Replacing(2))
    original = model[0].running_mean
    x = torch.randn(12, 2) + 3.0
    recalibrate_bn(model, torch.split(x, 4))
    assert model[0].running_mean is original  # the layer's own buffer comes back, with the new statistics
    _close(model[0].running_mean, x.mean(0))
    _close(model[0].running_var, x.var(0))


def test_a_buffer_replaced_after_the_first_forward_is_an_error() -> None:
    class LateReplacing(nn.BatchNorm1d):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = super().forward(x)
            self.calls += 1
            if self.calls == 3:
                self.running_var = self.running_var.clone()
            return out

    model = nn.Sequential(LateReplacing(2))
    before = model[0].running_var
    with pytest.raises(RuntimeError, match="replaced its running_mean/running_var"):
        recalibrate_bn(model, [torch.randn(4, 2) for _ in range(5)])
    assert model[0].running_var is before and torch.equal(before, torch.ones(2))


def test_layers_of_different_dtypes_fall_back_to_hooks() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3).double())
    x = torch.randn(30, 3)
    model[1].register_forward_pre_hook(lambda m, a: (a[0].double(),))
    report = recalibrate_bn(model, torch.split(x, 6))
    assert report.layers == ["0", "1"] and model[1].running_var.dtype == torch.float64
    _close(model[0].running_var, x.var(0))


def test_buffers_keep_their_identity() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ids = [id(b) for b in model.buffers()]
    recalibrate_bn(model, [torch.randn(8, 3) for _ in range(3)])
    assert [id(b) for b in model.buffers()] == ids
    assert int(model[1].num_batches_tracked) == 0


def test_stock_layers_run_without_their_counter_and_get_it_back() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.BatchNorm1d(4))
    for layer in (model[1], model[3]):
        layer.num_batches_tracked.fill_(5)
    counters = [model[1].num_batches_tracked, model[3].num_batches_tracked]
    seen: list[object] = []
    model[3].register_forward_pre_hook(lambda m, a: seen.extend([model[1].num_batches_tracked, m.num_batches_tracked]))
    x = torch.randn(40, 3)
    recalibrate_bn(model, torch.split(x, 8))
    assert len(seen) == 10 and all(counter is None for counter in seen)  # torch's BatchNorm skips a None counter
    assert [model[1].num_batches_tracked, model[3].num_batches_tracked] == counters
    assert all(int(counter) == 5 for counter in counters)
    with torch.no_grad():
        _close(model[1].running_var, model[0](x).var(0))


class _Counting(nn.BatchNorm1d):
    """A subclass with a forward of its own that counts without checking for ``None`` (as user code may)."""

    def __init__(self, features: int, twice_from: int = 0) -> None:
        super().__init__(features)
        self.calls = 0
        self.twice_from = twice_from

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        self.num_batches_tracked.add_(1)
        return nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum, self.eps
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self._norm(x)
        if self.twice_from and self.calls >= self.twice_from:  # data-dependent: later forwards run it twice
            out = self._norm(out * 2.0 + 1.0)
        return out


def test_a_subclass_with_its_own_forward_keeps_counting_and_is_exact() -> None:
    model = nn.Sequential(nn.Linear(3, 4), _Counting(4))
    x = torch.randn(36, 3) * 2.0 + 1.0
    recalibrate_bn(model, torch.split(x, 6))
    with torch.no_grad():
        h = model[0](x)
    _close(model[1].running_mean, h.mean(0))
    _close(model[1].running_var, h.var(0))
    assert int(model[1].num_batches_tracked) == 0


def test_a_subclass_run_twice_by_a_later_forward_is_an_error() -> None:
    model = nn.Sequential(nn.Linear(3, 4), _Counting(4, twice_from=3))
    before = model[1].running_var.clone()
    with pytest.raises(RuntimeError, match="element count"):
        recalibrate_bn(model, [torch.randn(6, 3) for _ in range(5)])
    assert torch.equal(model[1].running_var, before)


def test_a_layer_reached_with_no_values_adds_nothing() -> None:
    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(2)
            self.empty = nn.BatchNorm1d(2)  # always gets an empty selection: BatchNorm leaves its buffers alone

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.empty(x[x[:, 0] > 1e9])
            return self.bn(x)

    model = Branch()
    x = torch.randn(30, 2)
    report = recalibrate_bn(model, torch.split(x, 6))
    assert report.layers == ["bn"] and report.skipped == {"empty": "not reached by the forward"}
    _close(model.bn.running_var, x.var(0))
    assert torch.equal(model.empty.running_var, torch.ones(2))
