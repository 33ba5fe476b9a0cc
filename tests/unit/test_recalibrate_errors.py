"""``recalibrate_bn``'s errors for data it cannot use: each names the function, the argument and what is allowed
(issue 24 item 12)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_bnsgd.bn.recalibrate import recalibrate_bn


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def _unchanged(net: nn.Module) -> bool:
    bn = net[1]
    return bool(torch.equal(bn.running_mean, torch.zeros(4)) and torch.equal(bn.running_var, torch.ones(4)))


@pytest.mark.parametrize("mode", ["train", "sequential"])
def test_a_single_sample_says_so_not_that_the_batches_were_empty(mode: str) -> None:
    net = _net()
    with pytest.raises(ValueError, match=r"recalibrate_bn: .*`batches` held 1 sample\(s\).*at least 2") as err:
        recalibrate_bn(net, [torch.randn(1, 3)], mode=mode)  # type: ignore[arg-type]
    assert "empty" not in str(err.value)
    assert _unchanged(net)


@pytest.mark.parametrize("mode", ["train", "sequential"])
@pytest.mark.parametrize("batches", [[], [torch.randn(0, 3)]], ids=["no-batch", "zero-samples"])
def test_empty_batches_say_so_in_every_mode(mode: str, batches: list[torch.Tensor]) -> None:
    net = _net()
    with pytest.raises(ValueError, match=r"recalibrate_bn: no sample reached .*`batches` was empty"):
        recalibrate_bn(net, batches, mode=mode)  # type: ignore[arg-type]
    assert _unchanged(net)


def test_a_forward_fn_that_runs_no_batchnorm_layer_says_so() -> None:
    net = _net()
    with pytest.raises(ValueError, match=r"recalibrate_bn: .*24 samples ran no BatchNorm layer.*`forward_fn`"):
        recalibrate_bn(net, [torch.randn(8, 3)] * 3, forward_fn=lambda model, batch: None)
    assert _unchanged(net)


@pytest.mark.parametrize("mode", ["train", "sequential"])
@pytest.mark.parametrize(
    ("batch", "what"),
    [
        ("some text", "a str"),
        (["a", "b"], "a list whose first item .* is a str, which holds no tensor"),
        ((["a", "b"], torch.zeros(2)), "a tuple whose first item .* is a list, which holds no tensor"),
        ({"x": torch.zeros(2, 3)}, "a dict"),
    ],
    ids=["str", "list-of-str", "text-and-labels", "dict"],
)
def test_string_batches_get_a_clear_error_not_a_torch_one(mode: str, batch: object, what: str) -> None:
    net = _net()
    with pytest.raises(TypeError, match=rf"recalibrate_bn: .*`batches`.*it is {what}\. Allowed: a tensor .*forward_fn"):
        recalibrate_bn(net, [batch], mode=mode)  # type: ignore[arg-type]
    assert _unchanged(net)


def test_a_forward_fn_may_still_take_any_batch() -> None:
    net = _net()
    x = torch.randn(8, 3)
    report = recalibrate_bn(net, [("text", x)], forward_fn=lambda model, batch: model(batch[1]))
    assert report.num_batches == 1 and not _unchanged(net)


@pytest.mark.parametrize("mode", ["train", "sequential"])
@pytest.mark.parametrize(
    "batches",
    [[torch.randn(4, 3), torch.empty(4, 3, device="meta")], [(torch.empty(4, 3, device="meta"), torch.zeros(4))]],
    ids=["tensor", "tuple"],
)
def test_meta_batches_get_a_clear_error(mode: str, batches: list[object]) -> None:
    net = _net()
    index = len(batches) - 1
    with pytest.raises(
        ValueError,
        match=rf"recalibrate_bn: batch {index} of `batches` holds a tensor of shape \(4, 3\) "
        "on the meta device.*real data",
    ):
        recalibrate_bn(net, batches, mode=mode)  # type: ignore[arg-type]
    assert _unchanged(net)


def test_a_meta_model_or_device_gets_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"recalibrate_bn: the BatchNorm layer '1' of `model` is on the meta device"):
        recalibrate_bn(_net().to("meta"), [torch.randn(4, 3)])
    with pytest.raises(ValueError, match=r"recalibrate_bn: `device` must be a device with data, got 'meta'"):
        recalibrate_bn(_net(), [torch.randn(4, 3)], device="meta")
    with pytest.raises(ValueError, match=r"recalibrate_bn: `device` must be None, a torch.device .* got 'gpux'"):
        recalibrate_bn(_net(), [torch.randn(4, 3)], device="gpux")


@pytest.mark.parametrize("mode", ["train", "sequential"])
def test_an_error_merging_the_last_records_is_raised_and_changes_nothing(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the flush after a pass comes after the pass's last agreement; in one process its error is raised as it is
    from lightning_bnsgd.bn.collector import StatsCollector

    def broken_flush(self: StatsCollector) -> None:
        raise RuntimeError("recalibrate_bn: a BatchNorm layer replaced its running_mean/running_var buffer")

    net = _net()
    momentum = net[1].momentum
    monkeypatch.setattr(StatsCollector, "flush", broken_flush)
    with pytest.raises(RuntimeError, match="replaced its running_mean/running_var buffer"):
        recalibrate_bn(net, [torch.randn(8, 3), torch.randn(5, 3)], mode=mode)  # type: ignore[arg-type]
    assert _unchanged(net)
    assert net.training and net[1].training and net[1].momentum == momentum


def test_a_forward_fn_of_the_wrong_arity_is_refused_before_any_forward() -> None:
    net = _net()
    batches = _Counted([torch.randn(8, 3)] * 2)
    with pytest.raises(TypeError, match=r"^recalibrate_bn: `forward_fn` is called as `forward_fn\(model, batch\)`"):
        recalibrate_bn(net, batches, forward_fn=lambda batch: None)  # type: ignore[arg-type,misc]
    assert batches.iterated == 0 and _unchanged(net)  # refused with the other arguments, not at the first batch
    recalibrate_bn(net, batches, forward_fn=lambda model, batch, *rest: model(batch))  # any that takes two is fine


class _Counted(list):
    """A list of batches that counts how often it is iterated."""

    iterated = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        self.iterated += 1
        return super().__iter__()
