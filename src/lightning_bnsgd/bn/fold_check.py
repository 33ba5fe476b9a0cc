"""The exactness check of `fold_batchnorm`.

A folded model (or a separated layer) must give the unfolded eval model's outputs, within float32 rounding, on the
example inputs and on random inputs of the same shapes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

#: Relative and absolute (times the largest output magnitude) tolerance of the exactness check: float32 rounding.
RTOL = 1e-4
ATOL = 1e-5


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def random_like(inputs: tuple[Any, ...], generator: torch.Generator) -> tuple[Any, ...]:
    """``inputs`` with every floating-point tensor replaced by a random one of its shape, dtype and rough scale."""

    def replace(value: Any) -> Any:
        if isinstance(value, Tensor) and value.is_floating_point():
            noise = torch.randn(value.shape, generator=generator, dtype=torch.float64)
            return (noise * value.double().std().clamp(min=1e-3) + value.double().mean()).to(value)
        if isinstance(value, (list, tuple)):
            return type(value)(replace(v) for v in value)
        if isinstance(value, dict):
            return {k: replace(v) for k, v in value.items()}
        return value

    return tuple(replace(v) for v in inputs)


@torch.no_grad()
def output_difference(reference: nn.Module, folded: nn.Module, inputs: Sequence[tuple[Any, ...]]) -> float | None:
    """The largest output difference, or ``None`` when an output is outside the tolerance."""
    worst = 0.0
    for args in inputs:
        expected, actual = list(_tensors(reference(*args))), list(_tensors(folded(*args)))
        if len(expected) != len(actual):
            return None
        for e, a in zip(expected, actual, strict=True):
            if e.shape != a.shape:
                return None
            if not e.is_floating_point():
                if not torch.equal(e, a):
                    return None
                continue
            e64, a64 = e.double(), a.double()
            diff = (a64 - e64).abs()
            bound = RTOL * e64.abs() + ATOL * float(e64.abs().max().clamp(min=1.0)) if e64.numel() else e64
            if diff.numel() and not bool((diff <= bound).all()):
                return None
            worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
    return worst


__all__ = ["ATOL", "RTOL", "output_difference", "random_like"]
