"""Saving and restoring modules' ``training`` flags: the one rule every BatchNorm tool that switches modes uses.

Pure torch, no Lightning.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


def set_attribute(module: nn.Module, name: str, value: object) -> None:
    """``setattr`` for a plain attribute (not a parameter, buffer or submodule) without ``Module.__setattr__``'s checks.

    Those checks cost more than a small layer's forward on models with hundreds of layers.
    """
    object.__setattr__(module, name, value)


@contextlib.contextmanager
def preserved_modes(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Run the block with ``model``'s modules, then put back every module's ``training`` flag as it was.

    The modules come in ``model.modules()`` order; the flags are put back whatever happened inside.

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
        >>> _ = net[1].eval()
        >>> with preserved_modes(net) as modules:
        ...     _ = net.train()
        >>> [m.training for m in modules]
        [True, True, False]
    """
    flags = [(module, module.training) for module in model.modules()]
    try:
        yield [module for module, _ in flags]
    finally:
        for module, flag in flags:
            set_attribute(module, "training", flag)
