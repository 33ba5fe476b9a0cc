"""``fold_batchnorm``: every fold kind against the unfolded eval model, every refusal, the original untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_bnsgd.bn import fold as fold_module
from lightning_bnsgd.bn.fold import fold_batchnorm
from lightning_bnsgd.models.cnn import BNConvNet


def trained_like(model: nn.Module, *, negative: bool = False) -> nn.Module:
    """Give every BatchNorm layer non-trivial statistics and affine parameters (as after training)."""
    generator = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=generator))
            m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            if m.weight is not None:
                w = torch.rand(n, generator=generator) + 0.5
                m.weight.data.copy_(-w if negative else w)
                m.bias.data.copy_(torch.randn(n, generator=generator))
    return model


def check_exact(model: nn.Module, x: torch.Tensor, **kwargs):
    before = copy.deepcopy(model.state_dict())
    mode = model.training
    folded, report = fold_batchnorm(model, x, **kwargs)
    # the original model is bitwise unchanged, mode included
    assert model.training == mode
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the folded model gives the eval model's outputs on fresh inputs too
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        for probe in (x, torch.randn_like(x)):
            torch.testing.assert_close(folded(probe), reference(probe), rtol=1e-4, atol=1e-5)
    assert not folded.training
    return folded, report


def bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize(
    ("conv", "bn", "shape"),
    [
        (nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), (5, 4, 9, 9)),
        (nn.Conv2d(4, 6, 3, stride=2, dilation=2, bias=False), nn.BatchNorm2d(6), (5, 4, 11, 11)),
        (nn.Conv2d(4, 6, 3, groups=2, padding=1), nn.BatchNorm2d(6), (5, 4, 8, 8)),
        (nn.Conv2d(4, 4, 3, groups=4, padding="same", bias=False), nn.BatchNorm2d(4), (5, 4, 8, 8)),
        (nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5), (4, 3, 12)),
        (nn.Conv3d(2, 3, 2), nn.BatchNorm3d(3), (2, 2, 5, 5, 5)),
        (nn.Linear(7, 5), nn.BatchNorm1d(5), (6, 7)),
        (nn.Linear(7, 5, bias=False), nn.BatchNorm1d(5, affine=False), (6, 7)),
    ],
)
def test_backward_fold(conv, bn, shape):
    model = trained_like(nn.Sequential(conv, bn, nn.ReLU()))
    folded, report = check_exact(model, torch.randn(shape))
    assert [(d.layer, d.action, d.into) for d in report.decisions] == [("1", "backward", "0")]
    assert bn_count(folded) == 0


@pytest.mark.parametrize(
    "between",
    [
        [],
        [nn.MaxPool2d(2)],
        [nn.AvgPool2d(2)],
        [nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)],
        [nn.Dropout(0.5), nn.Identity(), nn.Dropout2d(0.2)],
        [nn.MaxPool2d(2, ceil_mode=True), nn.AvgPool2d(2)],
    ],
)
def test_forward_fold_into_conv(between):
    model = trained_like(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), *between, nn.Conv2d(4, 5, 2)))
    folded, report = check_exact(model, torch.randn(6, 3, 11, 11))
    (decision,) = report.decisions
    assert (decision.layer, decision.action, decision.into) == ("2", "forward", str(3 + len(between)))
    assert bn_count(folded) == 0


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_forward_fold_into_grouped_conv_with_a_padding_mode_that_shifts(groups):
    model = trained_like(
        nn.Sequential(
            nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 8, 3, padding=1, padding_mode="replicate", groups=groups)
        )
    )
    folded, report = check_exact(model, torch.randn(3, 4, 7, 7))
    assert report.decisions[0].action == "forward"
    assert bn_count(folded) == 0


@pytest.mark.parametrize(
    "tail",
    [
        [nn.Flatten(), nn.Linear(4 * 3 * 3, 2)],
        [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(4, 2)],
        [nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 2, bias=False)],
    ],
)
def test_forward_fold_into_linear(tail):
    model = trained_like(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), *tail))
    folded, report = check_exact(model, torch.randn(5, 1, 5, 5))
    assert report.decisions[0].action == "forward"
    assert bn_count(folded) == 0


class ViewHead(nn.Module):
    """A user's module that flattens with ``view`` and ``torch.flatten``, traced by torch.fx."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x):
        h = self.bn(torch.relu(self.conv(x)))
        return self.fc(torch.flatten(h, 1).view(h.shape[0], -1))


def test_forward_fold_through_functional_flatten_and_view():
    folded, report = check_exact(trained_like(ViewHead()), torch.randn(4, 1, 6, 6))
    assert [(d.action, d.into) for d in report.decisions] == [("forward", "fc")]
    assert bn_count(folded) == 0


@pytest.mark.parametrize(
    ("model", "shape", "reason"),
    [
        (  # negative scale before max-pool
            trained_like(
                nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.MaxPool2d(2), nn.Conv2d(3, 2, 1)), negative=True
            ),
            (2, 3, 6, 6),
            "negative BatchNorm scale",
        ),
        (  # zero-padded conv after the BatchNorm
            trained_like(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 2, 3, padding=1))),
            (2, 3, 6, 6),
            "pads with zeros",
        ),
        (  # zero padding counted in an average
            trained_like(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.AvgPool2d(3, 1, 1), nn.Conv2d(3, 2, 1))),
            (2, 3, 6, 6),
            "zero padding counted",
        ),
        (  # a ReLU between the BatchNorm and the next layer
            trained_like(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1))),
            (2, 3, 6, 6),
            "does not commute",
        ),
        (  # BatchNorm with batch statistics at inference
            nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)),
            (4, 3, 5, 5),
            "track_running_stats=False",
        ),
        (  # the last layer: nothing to fold into
            trained_like(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3))),
            (4, 3),
            "the model's output",
        ),
    ],
)
def test_refusals_keep_the_layer_and_say_why(model, shape, reason):
    folded, report = check_exact(model, torch.randn(shape))
    (decision,) = report.decisions
    assert decision.action == "kept" and decision.into is None
    assert reason in decision.reason, decision.reason
    assert bn_count(folded) == 1
    assert decision.layer in report.kept


class TwoConsumers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.a = nn.Conv2d(3, 2, 1)
        self.b = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        h = self.bn(torch.relu(x))
        return self.a(h) + self.b(h)


class SharedConv(nn.Module):
    """A conv called twice (its output feeds a BatchNorm once): folding into it would change the other call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


def test_bn_feeding_two_consumers_is_kept():
    _, report = check_exact(trained_like(TwoConsumers()), torch.randn(2, 3, 4, 4))
    assert report.decisions[0].action == "kept"
    assert "feeds 2 consumers" in report.decisions[0].reason


def test_a_layer_called_twice_takes_no_fold():
    _, report = check_exact(trained_like(SharedConv()), torch.randn(2, 3, 4, 4))
    assert report.decisions[0].action == "kept"
    assert "called more than once" in report.decisions[0].reason


class BatchNormAct(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: a BatchNorm subclass with a forward of its own (normalize, then activate)."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def test_a_subclass_with_its_own_forward_is_kept():
    model = trained_like(nn.Sequential(nn.Conv2d(3, 3, 1), BatchNormAct(3), nn.Conv2d(3, 2, 1)))
    folded, report = check_exact(model, torch.randn(2, 3, 4, 4))
    assert report.decisions[0].action == "kept"
    assert "forward of its own" in report.decisions[0].reason
    assert isinstance(folded.get_submodule("1"), BatchNormAct)


def test_a_frozen_batchnorm_folds_too():
    model = trained_like(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    for p in model[1].parameters():
        p.requires_grad_(False)
    _, report = check_exact(model, torch.randn(2, 3, 6, 6))
    assert report.decisions[0].action == "backward"


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("norm_position", ["post_activation", "pre_activation"])
def test_bnconvnet_every_configuration(padding, norm_position):
    net = trained_like(BNConvNet(input_size=12, channels=(4, 6), padding=padding, norm_position=norm_position))
    folded, report = check_exact(net, torch.randn(8, 1, 12, 12))
    actions = {d.layer: d.action for d in report.decisions}
    if norm_position == "pre_activation":  # conv -> BN: both fold backward
        assert set(actions.values()) == {"backward"}
    elif padding == "valid":  # BN -> max-pool -> conv / -> flatten -> linear
        assert set(actions.values()) == {"forward"}
    else:  # the second conv pads with zeros: the first BN stays, the second folds into the head
        assert list(actions.values()) == ["kept", "forward"]
    assert bn_count(folded) == sum(a == "kept" for a in actions.values())


def test_negative_scale_folds_backward_but_not_through_max_pool():
    net = trained_like(BNConvNet(input_size=12, channels=(4, 6)), negative=True)
    _, report = check_exact(net, torch.randn(8, 1, 12, 12))
    assert all(d.action == "kept" and "negative" in d.reason for d in report.decisions)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        if x.sum() > 0:  # torch.fx cannot trace a branch on a tensor's value
            x = -x
        return self.bn(self.conv(x))


def test_an_untraceable_model_comes_back_unfolded_with_the_reason():
    model = DataDependent()
    folded, report = fold_batchnorm(model, torch.randn(2, 1, 5, 5))
    assert report.folded == [] and list(report.kept) == ["bn"]
    assert "torch.fx could not trace" in report.kept["bn"]
    assert not folded.training and model.training


def test_a_fold_that_fails_the_check_is_undone(monkeypatch):
    def wrong(layer, s, t):  # a broken fold: forgets the shift
        with torch.no_grad():
            layer.weight.mul_(s.reshape(-1, *([1] * (layer.weight.dim() - 1))).to(layer.weight.dtype))

    monkeypatch.setattr(fold_module, "_fold_backward", wrong)
    model = trained_like(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    )
    folded, report = check_exact(model, torch.randn(2, 3, 6, 6))
    assert [d.action for d in report.decisions] == ["kept", "forward"]
    assert "did not pass the exactness check" in report.decisions[0].reason
    assert bn_count(folded) == 1


def test_report_text_and_arguments():
    model = trained_like(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.BatchNorm2d(2)))
    _, report = fold_batchnorm(model, torch.randn(2, 1, 5, 5))
    text = str(report)
    assert "1 of 2 BatchNorm layer(s) folded" in text and "\n  1: backward into 0: 0 -> BatchNorm\n" in text
    assert "\n  3: kept: backward: the operation before it (2) is not a convolution" in text
    assert report.max_abs_diff < 1e-4
    with pytest.raises(TypeError, match=r"`model` must be an nn\.Module"):
        fold_batchnorm("net", torch.randn(1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`random_checks` must be an integer >= 0, got -1"):
        fold_batchnorm(model, torch.randn(2, 1, 5, 5), random_checks=-1)


class NormAct(nn.BatchNorm2d):
    """A stand-in for timm's ``BatchNormAct2d``: a BatchNorm2d subclass whose forward normalizes (its own call of
    ``F.batch_norm``), then applies its ``drop`` and ``act`` children."""

    def __init__(self, n: int, act: nn.Module | None = None, drop: nn.Module | None = None, **kwargs) -> None:
        super().__init__(n, **kwargs)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.ReLU(inplace=True)

    def forward(self, x):
        use_batch = self.training or self.running_mean is None
        x = nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, use_batch, 0.1, self.eps
        )
        return self.act(self.drop(x))


class ActThenNorm(NormAct):
    """Children, but not applied after the normalization: not separable."""

    def forward(self, x):
        return super().forward(torch.tanh(x))


class ScaledNormAct(NormAct):
    """A tensor of its own besides the BatchNorm ones."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.gain = nn.Parameter(torch.ones(n))


class SyncNormAct(nn.SyncBatchNorm):
    """Like timm's ``SyncBatchNormAct``: SyncBatchNorm's own forward, then ``drop`` and ``act``."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.drop, self.act = nn.Dropout(0.3), nn.SiLU()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


@pytest.mark.parametrize("norm", [NormAct(4), NormAct(4, act=nn.SiLU(), drop=nn.Dropout(0.2)), SyncNormAct(4)])
def test_a_norm_act_subclass_folds_its_normalization_backward_and_keeps_its_children(norm):
    model = trained_like(nn.Sequential(nn.Conv2d(3, 4, 3), norm, nn.Conv2d(4, 2, 1)), negative=True)
    folded, report = check_exact(model, torch.randn(3, 3, 7, 7))
    ((layer, action, into, reason),) = [(d.layer, d.action, d.into, d.reason) for d in report.decisions]
    assert (layer, action, into) == ("1", "backward", "0")
    assert "its drop, act stay in its place" in reason
    assert bn_count(folded) == 0
    rest = folded.get_submodule("1")  # the layer's place now holds its drop and act, nothing else
    assert [name for name, _ in rest.named_children()] == ["drop", "act"]
    assert rest.act is not norm.act  # a copy, the original untouched
    assert type(rest.act) is type(norm.act) and type(rest.drop) is type(norm.drop)


def test_a_norm_act_subclass_with_identity_act_folds_forward_through_its_children():
    norm = NormAct(4, act=nn.Identity(), drop=nn.Dropout(0.5))
    model = trained_like(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), norm, nn.MaxPool2d(2), nn.Conv2d(4, 2, 1)))
    folded, report = check_exact(model, torch.randn(3, 3, 8, 8))
    (decision,) = report.decisions
    assert (decision.layer, decision.action, decision.into) == ("2", "forward", "4")
    assert "BatchNorm -> 2.drop -> 2.act -> 3 -> 4" in decision.reason
    assert bn_count(folded) == 0


def test_a_separable_subclass_that_cannot_fold_stays_whole():
    model = trained_like(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), NormAct(4), nn.Conv2d(4, 2, 1)))
    folded, report = check_exact(model, torch.randn(3, 3, 7, 7))
    (decision,) = report.decisions
    assert (decision.layer, decision.action) == ("2", "kept")
    assert decision.reason.startswith("its normalization separates from its drop, act but does not fold: backward:")
    assert "2.act" in decision.reason  # the act (ReLU) is what stops the forward fold
    assert type(folded.get_submodule("2")) is NormAct  # the original layer, not its separated form


@pytest.mark.parametrize(
    ("norm", "reason"),
    [
        (ActThenNorm(4), "ActThenNorm's forward is not its normalization followed by drop, act"),
        (ScaledNormAct(4), "ScaledNormAct has a forward of its own and tensors of its own (gain)"),
        (BatchNormAct(4), "BatchNormAct has a forward of its own and no child modules"),
        (NormAct(4, track_running_stats=False), "track_running_stats=False"),
    ],
)
def test_a_subclass_that_does_not_separate_is_kept_with_the_reason(norm, reason):
    model = trained_like(nn.Sequential(nn.Conv2d(3, 4, 3), norm, nn.Conv2d(4, 2, 1)))
    folded, report = check_exact(model, torch.randn(3, 3, 7, 7))
    (decision,) = report.decisions
    assert decision.action == "kept"
    assert reason in decision.reason, decision.reason
    assert type(folded.get_submodule("1")) is type(norm)


class ReadsItsNorm(nn.Module):
    """A forward that reads an attribute of its BatchNorm layer: it does not trace with the layer separated."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = NormAct(4)

    def forward(self, x):
        return self.norm(self.conv(x)) * self.norm.eps


def test_a_model_that_needs_the_subclass_keeps_it():
    folded, report = check_exact(trained_like(ReadsItsNorm()), torch.randn(2, 3, 6, 6))
    (decision,) = report.decisions
    assert decision.action == "kept"
    assert "does not trace with the layer separated" in decision.reason
    assert type(folded.get_submodule("norm")) is NormAct


def test_a_separated_fold_that_fails_the_check_is_undone_and_the_layer_restored(monkeypatch):
    def wrong(layer, s, t):  # a broken fold: forgets the shift
        with torch.no_grad():
            layer.weight.mul_(s.reshape(-1, *([1] * (layer.weight.dim() - 1))).to(layer.weight.dtype))

    monkeypatch.setattr(fold_module, "_fold_backward", wrong)
    model = trained_like(nn.Sequential(nn.Conv2d(3, 4, 3), NormAct(4), nn.Conv2d(4, 2, 1)))
    folded, report = check_exact(model, torch.randn(2, 3, 6, 6))
    assert report.decisions[0].action == "kept"
    assert "did not pass the exactness check" in report.decisions[0].reason
    assert type(folded.get_submodule("1")) is NormAct


def test_a_norm_act_subclass_in_double_precision_separates_on_probes_of_its_dtype():
    model = trained_like(nn.Sequential(nn.Conv2d(3, 4, 3), NormAct(4, act=nn.SiLU()))).double()
    folded, report = check_exact(model, torch.randn(2, 3, 6, 6, dtype=torch.float64))
    assert [(d.action, d.into) for d in report.decisions] == [("backward", "0")]
    assert folded.get_submodule("0").weight.dtype == torch.float64
