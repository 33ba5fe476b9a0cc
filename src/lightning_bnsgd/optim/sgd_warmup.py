"""PLACEHOLDER written by the lead so the foundation runs; the optimizer issue replaces this file entirely."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class SGDWarmup:
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4

    def build(self, module: nn.Module) -> dict[str, Any]:
        opt = torch.optim.SGD(
            module.parameters(), lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
            weight_decay=self.weight_decay,
        )
        return {"optimizer": opt}
