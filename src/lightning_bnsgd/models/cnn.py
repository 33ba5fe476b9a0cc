"""The BatchNorm CNN as a plain ``nn.Module`` (no Lightning import)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import nn

from lightning_bnsgd._validation import check_bool, check_choice, check_int, check_number

Padding = Literal["valid", "same"]
NormPosition = Literal["post_activation", "pre_activation"]
_PADDINGS: tuple[str, ...] = get_args(Padding)
_NORM_POSITIONS: tuple[str, ...] = get_args(NormPosition)


def conv_output_size(size: int, kernel_size: int, padding: str) -> int:
    """Spatial size after one conv (stride 1) and one 2x2 max-pool.

    Examples:
        >>> conv_output_size(28, 3, "valid"), conv_output_size(8, 3, "same")
        (13, 4)
    """
    after_conv = size if padding == "same" else size - kernel_size + 1
    return after_conv // 2 if after_conv > 0 else 0


class ConvBlock(nn.Sequential):
    """One Conv -> ReLU -> BN -> MaxPool block (or Conv -> BN -> ReLU -> MaxPool with ``pre_activation``).

    The layers are named ``conv``, ``act``, ``norm`` and ``pool`` whatever their order. ``block_dropout > 0`` adds
    ``drop`` right before ``norm``; ``batch_norm=False`` leaves ``norm`` out (the same block without BatchNorm).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        padding: Padding,
        norm_position: NormPosition,
        batch_norm: bool = True,
        block_dropout: float = 0.0,
    ) -> None:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=0 if padding == "valid" else "same")
        act = nn.ReLU(inplace=True)
        norm: list[tuple[str, nn.Module]] = [("drop", nn.Dropout(block_dropout))] if block_dropout > 0 else []
        if batch_norm:
            norm.append(("norm", nn.BatchNorm2d(out_channels)))
        pool = nn.MaxPool2d(2)
        order = (
            [("conv", conv), ("act", act), *norm]
            if norm_position == "post_activation"
            else [("conv", conv), *norm, ("act", act)]
        )
        super().__init__()
        for name, layer in [*order, ("pool", pool)]:
            self.add_module(name, layer)


class BNConvNet(nn.Module):
    """A BatchNorm CNN: ``len(channels)`` conv blocks, then a linear classifier head.

    The defaults are the classic MNIST BatchNorm CNN: input 1x28x28; Conv2d(32, 3x3) + ReLU -> BatchNorm2d ->
    MaxPool 2x2 -> Conv2d(64, 3x3) + ReLU -> BatchNorm2d -> MaxPool 2x2 -> Flatten -> Linear(10). The network
    returns logits; softmax belongs in the loss.

    Args:
        in_channels: channels of the input images.
        num_classes: number of output logits.
        input_size: height and width of the (square) input images; sets the flatten size.
        channels: output channels of each conv block, one entry per block.
        kernel_size: square kernel size of every convolution (stride 1).
        padding: ``"valid"`` (no padding) or ``"same"`` (keeps the spatial size before pooling).
        norm_position: ``"post_activation"`` (Conv -> ReLU -> BN, the classic Keras layout) or
            ``"pre_activation"`` (Conv -> BN -> ReLU, as in Ioffe & Szegedy 2015).
        dropout: dropout probability before the linear head (0 disables it). It comes after the last BatchNorm,
            so it does not shift any BatchNorm's input variance.
        block_dropout: dropout probability right before the BatchNorm of every conv block (0 disables it). This
            is the layout in which dropout shifts the variance BatchNorm sees between training and inference
            (Li et al. 2019); it exists to study that effect (``BNRecalibration(dropout="eval")`` removes it).
        batch_norm: ``False`` builds the same network without any BatchNorm layer (the convolutions keep their
            bias), the baseline for measuring what BatchNorm buys.

    Raises:
        ValueError: for invalid arguments, or when a block would shrink the feature map to nothing.

    Examples:
        >>> net = BNConvNet()
        >>> net(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
        >>> BNConvNet(input_size=8, padding="same")(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
        >>> [name for name, _ in BNConvNet(block_dropout=0.2).features[0].named_children()]
        ['conv', 'act', 'drop', 'norm', 'pool']
        >>> any(isinstance(m, nn.BatchNorm2d) for m in BNConvNet(batch_norm=False).modules())
        False
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 28,
        channels: Sequence[int] = (32, 64),
        kernel_size: int = 3,
        padding: Padding = "valid",
        norm_position: NormPosition = "post_activation",
        dropout: float = 0.0,
        block_dropout: float = 0.0,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        owner = "BNConvNet"
        check_int("in_channels", in_channels, minimum=1, owner=owner)
        check_int("num_classes", num_classes, minimum=1, owner=owner)
        check_int("input_size", input_size, minimum=1, owner=owner)
        check_int("kernel_size", kernel_size, minimum=1, owner=owner)
        if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence):
            raise TypeError(f"{owner}: `channels` must be a non-empty sequence of positive integers, got {channels!r}.")
        if len(channels) == 0:
            raise ValueError(
                f"{owner}: `channels` must be a non-empty sequence of positive integers, got {channels!r}."
            )
        for i, c in enumerate(channels):
            check_int(f"channels[{i}]", c, minimum=1, owner=owner)
        check_choice("padding", padding, _PADDINGS, owner=owner)
        check_choice("norm_position", norm_position, _NORM_POSITIONS, owner=owner)
        check_number("dropout", dropout, 0.0, 1.0, max_open=True, owner=owner)
        check_number("block_dropout", block_dropout, 0.0, 1.0, max_open=True, owner=owner)
        check_bool("batch_norm", batch_norm, owner=owner)

        size = input_size
        blocks = []
        prev = in_channels
        for i, out in enumerate(channels):
            new_size = conv_output_size(size, kernel_size, padding)
            if new_size < 1:
                raise ValueError(
                    f"Conv block {i} (kernel_size={kernel_size}, padding={padding!r}) shrinks the {size}x{size} "
                    f"feature map to nothing (input_size={input_size}, channels={list(channels)}). "
                    'Use padding="same", a larger input_size, a smaller kernel_size or fewer blocks.'
                )
            blocks.append(ConvBlock(prev, out, kernel_size, padding, norm_position, batch_norm, block_dropout))
            prev, size = out, new_size
        self.features = nn.Sequential(*blocks)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(prev * size * size, num_classes)
        self.feature_size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits of shape ``(batch, num_classes)``."""
        return self.head(self.dropout(self.flatten(self.features(x))))
