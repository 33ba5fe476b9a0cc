"""One-sample batches and budgets that would cut a batch to one sample: never a crash, every sample counted."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_bnsgd.bn.batches import BatchStream, join_batches
from lightning_bnsgd.bn.recalibrate import recalibrate_bn, validate_recalibration_args


def _data(n: int, features: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=gen)
    return x[x[:, 0].argsort()] + 1.0  # sorted: batches differ, so a lost or doubled sample shows


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-5, atol=1e-6)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_one_sample_last_batch_of_a_loader_is_joined_exactly() -> None:
    x = _data(33)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=8)  # 4 x 8 + 1
    model = _model()
    report = recalibrate_bn(model, loader)
    assert report.num_samples == 33 and report.num_batches == 4 and report.joined_batches == 1
    _close(model[0].running_mean, x.mean(0))
    _close(model[0].running_var, x.var(0))


@settings(max_examples=25, deadline=None)
@given(budget=st.integers(min_value=2, max_value=120), batch=st.integers(min_value=2, max_value=40))
def test_budget_is_exact_and_never_leaves_one_sample(budget: int, batch: int) -> None:
    x = _data(120)
    model = _model()
    sizes: list[int] = []
    model[0].register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))
    report = recalibrate_bn(model, list(torch.split(x, batch)), num_samples=budget)
    assert report.num_samples == budget and report.stopped_by == "num_samples"
    assert min(sizes) >= 2
    _close(model[0].running_mean, x[:budget].mean(0))
    _close(model[0].running_var, x[:budget].var(0))


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(min_value=1, max_value=6), min_size=2, max_size=12))
def test_any_mix_of_one_sample_batches(sizes: list[int]) -> None:
    x = _data(sum(sizes))
    model = _model()
    report = recalibrate_bn(model, list(torch.split(x, sizes)))
    assert report.num_samples == len(x) and report.left_out_samples == 0
    _close(model[0].running_mean, x.mean(0))
    _close(model[0].running_var, x.var(0))


def test_a_lone_sample_is_left_out_and_reported() -> None:
    model = _model()
    with pytest.raises(ValueError, match="no sample reached"):
        recalibrate_bn(model, [torch.randn(1, 3)])
    stream = BatchStream([torch.randn(1, 3)], None, None)
    assert stream.take(None) is None and stream.left_out == 1


def test_batch_size_one_loader_runs_in_pairs() -> None:
    x = _data(7)
    model = _model()
    report = recalibrate_bn(model, list(torch.split(x, 1)))  # 2 + 2 + 3 (the last one joins the pair before)
    assert report.num_batches == 3 and report.num_samples == 7
    _close(model[0].running_var, x.var(0))


def test_join_batches_keeps_the_structure() -> None:
    a = {"x": torch.zeros(3, 2), "names": ["a", "b", "c"], "scale": torch.tensor(2.0), "pair": (torch.ones(3), 5)}
    b = {"x": torch.ones(1, 2), "names": ["d"], "scale": torch.tensor(2.0), "pair": (torch.zeros(1), 5)}
    joined = join_batches(a, b, 3, 1)
    assert joined["x"].shape == (4, 2) and joined["names"] == ["a", "b", "c", "d"]
    assert joined["scale"].dim() == 0 and joined["pair"][0].tolist() == [1, 1, 1, 0] and joined["pair"][1] == 5


def test_dict_batches_with_forward_fn_are_joined() -> None:
    x = _data(9)
    batches = [{"x": part} for part in torch.split(x, 4)]  # 4, 4, 1
    model = _model()
    report = recalibrate_bn(model, batches, forward_fn=lambda m, b: m(b["x"]))
    assert report.joined_batches == 1
    _close(model[0].running_var, x.var(0))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_samples": 1}, ValueError, "Owner: `num_samples` must be None or an integer >= 2, got 1"),
        ({"num_samples": 2.0}, TypeError, "num_samples"),
        ({"mode": "eval"}, ValueError, "Owner: `mode`"),
        ({"dropout": 0}, TypeError, "dropout"),
        ({"nonfinite": "ignore"}, ValueError, "nonfinite"),
        ({"forward_fn": 3}, TypeError, "Owner: `forward_fn` must be None or a callable"),
    ],
)
def test_shared_validator_names_the_owner(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    args: dict[str, object] = {"num_samples": None, "mode": "train", "dropout": "eval", "nonfinite": "raise"}
    args["forward_fn"] = None
    args.update(kwargs)
    with pytest.raises(error, match=match):
        validate_recalibration_args("Owner", **args)  # type: ignore[arg-type]
