from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_bnsgd.models.cnn import BNConvNet, conv_output_size


def test_default_is_the_classic_batchnorm_cnn():
    net = BNConvNet()
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 32, (3, 3), (0, 0)),
        (32, 64, (3, 3), (0, 0)),
    ]
    # 28 -> conv 26 -> pool 13 -> conv 11 -> pool 5
    assert net.head.in_features == 64 * 5 * 5
    assert net.head.out_features == 10


def test_8x8_same_padding_shape():
    net = BNConvNet(input_size=8, padding="same")
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert net.head.in_features == 64 * 2 * 2


def test_three_channel_32x32():
    net = BNConvNet(in_channels=3, input_size=32, num_classes=100, channels=(16, 32, 64))
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 3


@pytest.mark.parametrize(
    ("position", "expected"),
    [
        ("post_activation", [nn.Conv2d, nn.ReLU, nn.BatchNorm2d, nn.MaxPool2d]),
        ("pre_activation", [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]),
    ],
)
def test_layer_order(position, expected):
    net = BNConvNet(norm_position=position)
    for block in net.features:
        assert [type(m) for m in block] == expected


def test_shrinking_configuration_names_block_and_suggests_same_padding():
    with pytest.raises(ValueError, match=r"Conv block 1 .*padding=\"same\""):
        BNConvNet(input_size=8)


def test_dropout_layer_is_present_only_when_asked():
    assert isinstance(BNConvNet(dropout=0.25).dropout, nn.Dropout)
    assert isinstance(BNConvNet().dropout, nn.Identity)


def test_conv_output_size():
    assert conv_output_size(28, 3, "valid") == 13
    assert conv_output_size(3, 5, "valid") == 0
    assert conv_output_size(5, 5, "same") == 2


@pytest.mark.parametrize(
    ("position", "expected"),
    [
        ("post_activation", ["conv", "act", "drop", "norm", "pool"]),
        ("pre_activation", ["conv", "drop", "norm", "act", "pool"]),
    ],
)
def test_block_dropout_sits_right_before_batchnorm(position, expected):
    net = BNConvNet(input_size=8, padding="same", norm_position=position, block_dropout=0.3)
    for block in net.features:
        assert [name for name, _ in block.named_children()] == expected
        assert block.drop.p == 0.3
    net.train()
    x = torch.randn(4, 1, 8, 8)
    assert not torch.equal(net(x), net(x))  # dropout active in training
    net.eval()
    assert torch.equal(net(x), net(x))


def test_without_batch_norm_is_the_same_network_minus_bn():
    with_bn = BNConvNet(input_size=8, padding="same")
    without = BNConvNet(input_size=8, padding="same", batch_norm=False)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in without.modules())
    assert all(m.bias is not None for m in without.modules() if isinstance(m, nn.Conv2d))
    bn_params = sum(p.numel() for m in with_bn.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    assert sum(p.numel() for p in with_bn.parameters()) - bn_params == sum(p.numel() for p in without.parameters())
    assert without(torch.randn(2, 1, 8, 8)).shape == (2, 10)
