"""Finding BatchNorm layers and summarizing their buffers and affine parameters."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """All BatchNorm layers of ``model`` (every ``_BatchNorm`` subclass) in registration order, with their names.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.BatchNorm2d(4))
        >>> [name for name, _ in batchnorm_layers(net)]
        ['1', '3']
    """
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
