"""``recalibrate_bn``: exactness, modes, budgets, no side effects, errors."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.optim.swa_utils import update_bn

from lightning_bnsgd.bn.recalibrate import RecalibrationReport, batch_size_of, recalibrate_bn, take_samples

SIZES = [96] * 10 + [40]  # 1000 samples, uneven, a small last batch


def _sorted_data(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1000, *shape, generator=gen) + 1.0
    shift = torch.randn(1000, generator=gen).sort().values * 3.0
    x[:, 0] += shift.view(-1, *([1] * (len(shape) - 1)))  # channel 0 sorted by a per-sample shift
    return x


def _reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [0, *range(2, x.dim())]
    return x.double().mean(dims), x.double().var(dims, unbiased=True)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("bn", "shape"),
    [(nn.BatchNorm1d(3), (3,)), (nn.BatchNorm2d(3), (3, 4, 4)), (nn.BatchNorm3d(3), (3, 2, 3, 3))],
    ids=["1d", "2d", "3d"],
)
def test_first_layer_exact_and_update_bn_far_off(bn: nn.Module, shape: tuple[int, ...]) -> None:
    x = _sorted_data(shape)
    batches = list(torch.split(x, SIZES))
    model = nn.Sequential(bn, nn.ReLU())
    peer = copy.deepcopy(model)
    report = recalibrate_bn(model, batches)
    mean, var = _reference(x)
    _close(bn.running_mean, mean)
    _close(bn.running_var, var)
    assert report.num_samples == 1000 and report.num_batches == len(SIZES) and report.layers == ["0"]

    update_bn([(b,) for b in batches], peer)  # equal batch weights, no between-batch variance
    peer_bn = peer[0]
    rel_var_err = ((peer_bn.running_var.double() - var).abs() / var).max()
    mean_err = (peer_bn.running_mean.double() - mean).abs().max()
    assert rel_var_err > 0.5, "update_bn misses the between-batch variance on sorted data"
    assert mean_err > 0.05, "update_bn weights a small last batch like a full one"


@settings(max_examples=12, deadline=None)
@given(cuts=st.lists(st.integers(min_value=2, max_value=198), min_size=0, max_size=8))
def test_same_statistics_whatever_the_split(cuts: list[int]) -> None:
    x = _sorted_data((4,))[:200]
    edges = [0, *sorted(set(cuts)), 200]
    batches = [x[a:b] for a, b in itertools.pairwise(edges) if b - a >= 2]
    used = torch.cat(batches)
    bn = nn.BatchNorm1d(4)
    recalibrate_bn(bn, batches)
    mean, var = _reference(used)
    _close(bn.running_mean, mean)
    _close(bn.running_var, var)


@settings(max_examples=10, deadline=None)
@given(
    budget=st.integers(min_value=2, max_value=300),
    batch=st.integers(min_value=2, max_value=64),
)
def test_num_samples_cuts_mid_stream(budget: int, batch: int) -> None:
    x = _sorted_data((2,))[:300]
    bn = nn.BatchNorm1d(2)
    report = recalibrate_bn(bn, list(torch.split(x, batch)), num_samples=budget)
    mean, var = _reference(x[:budget])
    _close(bn.running_mean, mean)
    _close(bn.running_var, var)
    assert report.num_samples == budget
    assert report.stopped_by == "num_samples"  # reached, even when the data ends exactly there


def test_budget_longer_than_data_and_num_batches() -> None:
    x = _sorted_data((2,))[:100]
    bn = nn.BatchNorm1d(2)
    report = recalibrate_bn(bn, torch.split(x, 10), num_samples=10_000)
    assert report.stopped_by == "data" and report.num_samples == 100
    report = recalibrate_bn(bn, torch.split(x, 10), num_batches=3)
    assert report.stopped_by == "num_batches" and report.num_batches == 3
    _close(bn.running_mean, _reference(x[:30])[0])


class _ThreeBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm1d(4)
        self.fc1 = nn.Linear(4, 5)
        self.bn2 = nn.BatchNorm1d(5)
        self.fc2 = nn.Linear(5, 3)
        self.bn3 = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn3(self.fc2(torch.relu(self.bn2(self.fc1(self.bn1(x))))))


def test_sequential_matches_eval_mode_inputs() -> None:
    torch.manual_seed(0)
    model = _ThreeBN()
    x = _sorted_data((4,))[:400]
    report = recalibrate_bn(model, list(torch.split(x, 64)), mode="sequential")
    assert report.passes == 3 and report.layers == ["bn1", "bn2", "bn3"]
    model.eval()
    with torch.no_grad():
        inputs = {}
        h1 = x
        inputs["bn1"] = h1
        h2 = model.fc1(model.bn1(h1))
        inputs["bn2"] = h2
        inputs["bn3"] = model.fc2(torch.relu(model.bn2(h2)))
    for name, h in inputs.items():
        layer = getattr(model, name)
        mean, var = _reference(h)
        _close(layer.running_mean, mean)
        _close(layer.running_var, var)


def test_sequential_stops_after_the_estimated_layer() -> None:
    model = _ThreeBN()
    calls: list[str] = []
    for name in ("bn1", "bn2", "bn3"):
        getattr(model, name).register_forward_pre_hook(lambda m, a, n=name: calls.append(n))
    recalibrate_bn(model, [torch.randn(8, 4)], mode="sequential")
    # the first forward of a batch shape runs to the end (it counts each layer's calls); then each pass stops
    # right after the layer it estimates
    assert calls == ["bn1", "bn2", "bn3", "bn1", "bn2", "bn1", "bn2", "bn3"]
    with pytest.raises(TypeError, match="re-iterable"):
        recalibrate_bn(model, iter([torch.randn(8, 4)]), mode="sequential")


def test_leaves_frozen_untracked_and_other_norms_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),  # target
        nn.BatchNorm2d(4),  # frozen (eval)
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.GroupNorm(2, 4),
        nn.Dropout(0.3),
        nn.BatchNorm2d(4, momentum=None),  # cumulative average: target
    )
    model[2].eval()
    model[2].running_mean.fill_(0.3)
    model[6].num_batches_tracked.fill_(7)
    params = {k: v.clone() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    flags = [m.training for m in model.modules()]
    report = recalibrate_bn(model, [torch.randn(8, 2, 5, 5) for _ in range(3)])
    assert report.layers == ["1", "6"]
    assert report.skipped == {"2": "eval mode (frozen)", "3": "track_running_stats=False"}
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k]), k
    for k, v in model.named_buffers():
        if k.startswith(("1.", "6.")) and "num_batches" not in k:
            assert not torch.equal(v, buffers[k]), k
        else:
            assert torch.equal(v, buffers[k]), k
    assert [m.training for m in model.modules()] == flags
    assert model[6].momentum is None and model[1].momentum == 0.1


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("error", [_Boom, KeyboardInterrupt])
def test_restores_everything_on_error_mid_stream(error: type[BaseException]) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.BatchNorm1d(4, momentum=None))
    model[1].running_var.fill_(2.0)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    seen = []

    def forward(m: nn.Module, batch: torch.Tensor) -> None:
        seen.append(1)
        if len(seen) == 3:
            raise error("stop")
        m(batch)

    with pytest.raises(error):
        recalibrate_bn(model, [torch.randn(6, 3) for _ in range(5)], forward_fn=forward)
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert model[1].momentum == 0.1 and model[3].momentum is None
    assert all(m.training for m in model.modules())
    assert not model[1]._forward_hooks and not model[1]._forward_pre_hooks


def test_dropout_off_by_default() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(3))
    x = torch.randn(512, 3) + 2.0
    recalibrate_bn(model, torch.split(x, 64))
    _close(model[1].running_mean, x.mean(0))
    _close(model[1].running_var, x.var(0))
    assert model[0].training
    recalibrate_bn(model, torch.split(x, 64), dropout="train")
    assert (model[1].running_var.double() - x.var(0).double()).abs().max() > 1.0  # dropout's variance shift


def test_batches_forward_fn_device_and_nonfinite() -> None:
    bn = nn.BatchNorm1d(2)
    x = torch.randn(40, 2)
    with pytest.raises(TypeError, match="forward_fn"):
        recalibrate_bn(bn, [{"x": x}])
    report = recalibrate_bn(bn, [{"x": x[:20]}, {"x": x[20:]}], forward_fn=lambda m, b: m(b["x"]), device="cpu")
    assert report.num_samples == 40
    _close(bn.running_var, x.var(0))
    before = bn.running_var.clone()
    bad = x.clone()
    bad[25, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        recalibrate_bn(bn, torch.split(bad, 10))
    assert torch.equal(bn.running_var, before)
    report = recalibrate_bn(bn, torch.split(bad, 10), nonfinite="skip")
    assert report.nonfinite_batches == 1
    kept = torch.cat([bad[:20], bad[30:]])
    _close(bn.running_var, kept.var(0))
    model = nn.Sequential(nn.BatchNorm1d(2), nn.Linear(2, 2), nn.BatchNorm1d(2))
    with pytest.raises(ValueError, match="first: batch 2 "):
        recalibrate_bn(model, torch.split(bad, 10), mode="sequential")
    report = recalibrate_bn(model, torch.split(bad, 10), mode="sequential", nonfinite="skip")
    assert report.nonfinite_batches == 1 and report.passes == 2
    _close(model[0].running_var, kept.var(0))


def test_fixes_poisoned_statistics() -> None:
    bn = nn.BatchNorm1d(2)
    bn.running_var.fill_(float("inf"))  # pytorch#90342: one inf poisons running_var for good
    x = torch.randn(64, 2)
    recalibrate_bn(bn, [x])
    _close(bn.running_var, x.var(0))


def test_errors_and_empty_cases() -> None:
    bn = nn.BatchNorm1d(2)
    for kwargs in ({"num_samples": 0}, {"num_batches": -1}, {"mode": "eval"}, {"dropout": "off"}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            recalibrate_bn(bn, [torch.randn(4, 2)], **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no sample"):
        recalibrate_bn(bn, [])
    with pytest.warns(UserWarning, match="no BatchNorm"):
        report = recalibrate_bn(nn.Linear(2, 2), [torch.randn(4, 2)])
    assert report == RecalibrationReport(mode="train")
    with pytest.warns(UserWarning, match="no BatchNorm layer to recalibrate"):
        report = recalibrate_bn(nn.BatchNorm1d(2, track_running_stats=False), [torch.randn(4, 2)])
    assert report.skipped == {"": "track_running_stats=False"}


def test_lazy_and_subclassed_layers() -> None:
    class MyBN(nn.BatchNorm1d):
        pass

    model = nn.Sequential(nn.LazyBatchNorm1d(), MyBN(3))
    with pytest.raises(ValueError, match="not materialized"):
        recalibrate_bn(model, [torch.randn(4, 3)])
    model(torch.randn(4, 3))  # materialize
    x = torch.randn(30, 3)
    report = recalibrate_bn(model, [x])
    assert report.layers == ["0", "1"]
    _close(model[0].running_var, x.var(0))


def test_batch_helpers() -> None:
    assert batch_size_of([torch.zeros(3, 2), torch.zeros(3)]) == 3
    assert batch_size_of({"meta": "a"}) is None
    cut = take_samples({"x": torch.zeros(5, 2), "w": torch.zeros(2)}, 3, 5)
    assert cut["x"].shape == (3, 2) and cut["w"].shape == (2,)


class _WithDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn1 = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)
        self.bn2 = nn.BatchNorm1d(4)
        self.seen: list[tuple[bool, bool, bool]] = []  # (model, bn1, dropout) modes during each forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.training, self.bn1.training, self.drop.training))
        return self.bn2(self.drop(self.bn1(self.fc(x))))


@pytest.mark.parametrize("dropout", ["eval", "train"])
def test_a_model_in_eval_mode_is_recalibrated_like_update_bn_does(dropout: str) -> None:
    """Issue 24 item 16: ``model.eval()`` then ``recalibrate_bn`` works as ``update_bn`` (which calls
    ``model.train()`` for the pass and restores the mode): every layer, exact, modes restored."""
    torch.manual_seed(0)
    data = [torch.randn(n, 3) for n in (16, 9, 5)]
    model = _WithDropout().eval()
    in_train = copy.deepcopy(model).train()
    peer = copy.deepcopy(model)
    report = recalibrate_bn(model, data, dropout=dropout)  # type: ignore[arg-type]
    assert report.layers == ["bn1", "bn2"] and report.skipped == {}
    assert [m.training for m in model.modules()] == [False] * 5  # restored
    train = dropout == "train"  # as after model.train(), then non-BatchNorm modules as `dropout` asks
    assert model.seen == [(train, True, train)] * 3
    with torch.no_grad():
        mean, var = _reference(model.fc(torch.cat(data)))
    _close(model.bn1.running_mean, mean)
    _close(model.bn1.running_var, var)
    if dropout == "eval":  # the same as the model in train mode
        recalibrate_bn(in_train, data)
        for name in ("bn1", "bn2"):
            for buffer in ("running_mean", "running_var"):
                assert torch.equal(getattr(getattr(model, name), buffer), getattr(getattr(in_train, name), buffer))
    update_bn(data, peer)  # the peer changes the statistics too, and restores eval mode
    assert not peer.training and not torch.equal(peer.bn1.running_var, torch.ones(4))


def test_all_layers_frozen_in_a_training_model_is_an_error_not_a_silent_no_op() -> None:
    """Issue 24 item 16: frozen layers stay frozen (documented), but a call that can change nothing raises."""
    model = _WithDropout()
    model.bn1.eval()
    model.bn2.eval()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"recalibrate_bn: every BatchNorm layer .* frozen .*\['bn1', 'bn2'\]"):
        recalibrate_bn(model, [torch.randn(8, 3)])
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == [True, True, False, True, False]
    model.bn2.train()  # one layer in train mode: it alone is recalibrated, the frozen one is left alone
    report = recalibrate_bn(model, [torch.randn(8, 3)])
    assert report.layers == ["bn2"] and report.skipped == {"bn1": "eval mode (frozen)"}
    assert torch.equal(model.bn1.running_var, buffers["bn1.running_var"])
