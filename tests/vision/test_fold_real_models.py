"""`fold_batchnorm` on torchvision's and timm's models, randomly initialized (no weights download) with random
BatchNorm statistics and affine parameters: what folds where, exactness, the original untouched, export."""

from __future__ import annotations

import copy
import re
from collections import Counter
from collections.abc import Callable

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_bnsgd.bn import export_folded, fold_batchnorm

INPUT = (2, 3, 64, 64)


def trained_like(model: nn.Module) -> nn.Module:
    """Random running statistics and affine parameters (both signs of scale), as after training."""
    generator = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            n = m.num_features
            sign = torch.where(torch.rand(n, generator=generator) < 0.3, -1.0, 1.0)
            m.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            m.weight.data.copy_(sign * (torch.rand(n, generator=generator) + 0.5))
            m.bias.data.copy_(torch.randn(n, generator=generator) * 0.2)
    return model


def leaf_types(model: nn.Module) -> Counter[str]:
    """The kinds of the modules without children that must survive the fold: all but BatchNorm, and but identity
    (timm's blocks hold identities that their forward never calls; torch.fx's copy leaves those out)."""
    return Counter(
        type(m).__name__
        for m in model.modules()
        if not list(m.children()) and not isinstance(m, (_BatchNorm, nn.Identity))
    )


def resnet_conv(bn: str) -> str:
    """The convolution before a BatchNorm layer in a ResNet (torchvision's names, which timm keeps)."""
    return bn[:-1] + "0" if bn.endswith("downsample.1") else re.sub(r"bn(\d)$", r"conv\1", bn)


def efficientnet_conv(bn: str) -> str:
    """The convolution before a BatchNorm layer in timm's EfficientNet: the stem, the head, and per block (a
    depthwise-separable block in the first stage, inverted residuals after) in the order of the forward."""
    if bn in ("bn1", "bn2"):
        return {"bn1": "conv_stem", "bn2": "conv_head"}[bn]
    block, _, norm = bn.rpartition(".")
    order = ("conv_dw", "conv_pw") if block.startswith("blocks.0.") else ("conv_pw", "conv_dw", "conv_pwl")
    return f"{block}.{order[int(norm[2:]) - 1]}"


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[str], str]]] = {
    "torchvision resnet18": (torchvision.models.resnet18, resnet_conv),
    "torchvision resnet50": (torchvision.models.resnet50, resnet_conv),
    "torchvision mobilenet_v3_small": (torchvision.models.mobilenet_v3_small, lambda bn: bn[:-1] + "0"),
    "timm resnet18": (lambda: timm.create_model("resnet18", pretrained=False), resnet_conv),
    "timm resnet26": (lambda: timm.create_model("resnet26", pretrained=False), resnet_conv),
    "timm efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", pretrained=False), efficientnet_conv),
}


def fold_checked(model: nn.Module):
    """Fold, and check: the original bitwise unchanged (mode included), the folded model equal to the eval model
    within the fold's tolerance on fresh inputs too."""
    x = torch.randn(INPUT)
    before = copy.deepcopy(model.state_dict())
    folded, report = fold_batchnorm(model, x)
    assert model.training
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        for probe in (x, torch.randn(INPUT)):
            expected = reference(probe)
            torch.testing.assert_close(folded(probe), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    return folded, report


@pytest.mark.parametrize("name", list(MODELS))
def test_every_batchnorm_folds_backward_into_its_convolution(name):
    build, conv_of = MODELS[name]
    torch.manual_seed(0)
    model = trained_like(build())
    layers = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    folded, report = fold_checked(model)
    assert [d.layer for d in report.decisions] == layers
    assert report.kept == {}
    assert [(d.action, d.into) for d in report.decisions] == [("backward", conv_of(n)) for n in layers]
    assert all(isinstance(model.get_submodule(d.into), nn.Conv2d) for d in report.decisions)
    assert not any(isinstance(m, _BatchNorm) for m in folded.modules())
    # everything else is still there: the activations (Hardswish, SiLU), the squeeze-excitation gates, the pools
    assert leaf_types(folded) == leaf_types(model)


def test_timm_batchnorm_act_keeps_its_activation_in_place():
    torch.manual_seed(0)
    model = trained_like(timm.create_model("efficientnet_b0", pretrained=False))
    assert {type(m).__name__ for m in model.modules() if isinstance(m, _BatchNorm)} == {"BatchNormAct2d"}
    folded, report = fold_checked(model)
    for d in report.decisions:
        original = model.get_submodule(d.layer)
        rest = folded.get_submodule(d.layer)
        assert [n for n, _ in rest.named_children()] == ["drop", "act"], d.layer
        assert type(rest.act) is type(original.act) and type(rest.drop) is type(original.drop)
        assert "its drop, act stay in its place" in d.reason


def test_timm_preactivation_resnet_keeps_the_norms_before_an_activation():
    """ResNetV2 (pre-activation): each block's ``norm1`` (a BatchNormAct2d) reads the block's input (the stem's max
    pooling or a residual sum) and is followed by its own activation, so its normalization folds neither way, and
    neither does the final ``norm``; ``norm2`` follows ``conv1`` and folds."""
    torch.manual_seed(0)
    model = trained_like(timm.create_model("resnetv2_18", pretrained=False))
    folded, report = fold_checked(model)
    blocks = [n for n, _ in model.named_modules() if re.fullmatch(r"stages\.\d\.blocks\.\d", n)]
    assert len(blocks) == 8
    assert report.folded == [f"{b}.norm2" for b in blocks]
    assert all(d.into == d.layer.replace("norm2", "conv1") for d in report.decisions if d.action == "backward")
    assert list(report.kept) == [*(f"{b}.norm1" for b in blocks), "norm"]
    for layer, reason in report.kept.items():
        assert reason.startswith("its normalization separates from its drop, act but does not fold"), reason
        assert f"the next operation, {layer}.act, does not commute" in reason, reason
        assert type(folded.get_submodule(layer)).__name__ == "BatchNormAct2d"
    assert sum(isinstance(m, _BatchNorm) for m in folded.modules()) == 9


def test_export_round_trip_of_a_folded_timm_model(tmp_path):
    torch.manual_seed(0)
    model = trained_like(timm.create_model("efficientnet_b0", pretrained=False)).eval()
    x = torch.randn(INPUT)
    result = export_folded(model, x, tmp_path / "efficientnet_b0.pt2")
    assert result.fold is not None and result.fold.kept == {} and len(result.fold.folded) == 49
    program = torch.export.load(result.path).module()
    probe = torch.randn(3, *INPUT[1:])  # another batch size: the batch dimension is dynamic
    with torch.no_grad():
        expected = model(probe)
        torch.testing.assert_close(program(probe), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
