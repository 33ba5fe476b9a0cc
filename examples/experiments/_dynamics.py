"""What the three training-dynamics experiments share: a logger that keeps ``WeightDynamicsMonitor``'s metrics in
memory, a classifier trained with plain ``torch.optim.SGD`` over `param_groups`, and a running mean.

Kept apart from ``_common.py`` (which every experiment shares) because only the dynamics experiments need it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from _common import pl

from lightning_bnsgd import ConvNetClassifier, param_groups


class DynamicsRecorder(pl.loggers.Logger):  # type: ignore[misc, name-defined]
    """A Lightning logger that keeps every ``dynamics/...`` metric: ``rows`` is a list of ``(step, metrics)``."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "dynamics"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        kept = {k: float(v) for k, v in metrics.items() if k.startswith("dynamics/")}
        if kept:
            self.rows.append((-1 if step is None else int(step), kept))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """Steps and values of one metric, e.g. ``dynamics/net.features.0.conv/angular_update``."""
        pairs = [(s, m[key]) for s, m in self.rows if key in m]
        return [s for s, _ in pairs], [v for _, v in pairs]


class SGDClassifier(ConvNetClassifier):
    """``ConvNetClassifier`` trained with a constant-LR ``torch.optim.SGD``: weight decay on conv/linear weights
    only (`param_groups`), as the equilibrium theory assumes (no schedule)."""

    def __init__(self, lr: float, weight_decay: float, momentum: float, nesterov: bool = False, **model: Any) -> None:
        super().__init__(**model)
        self.sgd = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov}

    def configure_optimizers(self) -> Any:
        groups = param_groups(self, weight_decay=self.sgd["weight_decay"], norm_weight_decay=0.0)
        return torch.optim.SGD(groups, lr=self.sgd["lr"], momentum=self.sgd["momentum"], nesterov=self.sgd["nesterov"])


def running_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each position (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
