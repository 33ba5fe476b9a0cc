"""Move tensors to the host in one transfer: the monitors' logged steps and recalibrate_bn's write-back share it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


def _leaves(values: Any, out: list[Tensor]) -> list[Tensor]:
    if isinstance(values, Tensor):
        out.append(values)
    elif isinstance(values, (list, tuple)):
        for value in values:
            _leaves(value, out)
    return out


def _rebuild(values: Any, chunks: Iterator[Any]) -> Any:
    if isinstance(values, Tensor):
        chunk = next(chunks)
        return chunk.view(values.shape) if isinstance(chunk, Tensor) else chunk
    if isinstance(values, (list, tuple)):
        return type(values)([_rebuild(value, chunks) for value in values])
    return values


def to_host(values: T, dtype: torch.dtype = torch.float32) -> T:
    """``values`` with every tensor on the host, in ``dtype`` and its own shape, moved in one device-to-host transfer.

    ``values`` is a tensor, or lists and tuples of them, nested; anything else is kept as it is. The tensors are
    flattened and concatenated on the first one's device, copied once, and split back. When every tensor is a single
    number (0-d), they come back as Python numbers (one ``tolist`` for all: far cheaper than many host tensors).

    Examples:
        >>> summary, (norm, angle), missing = to_host((torch.ones(2, 3), (torch.tensor(2.0), torch.tensor(0.5)), None))
        >>> summary.shape, float(norm), float(angle), missing
        (torch.Size([2, 3]), 2.0, 0.5, None)
        >>> to_host([(torch.tensor(2.0), torch.tensor(0.5)), [torch.tensor(3.0)]], torch.float64)
        [(2.0, 0.5), [3.0]]
    """
    leaves = _leaves(values, [])
    if not leaves:
        return values
    device = leaves[0].device
    if all(t.dim() == 0 for t in leaves):
        numbers = torch.stack([t.to(device=device, dtype=dtype) for t in leaves]).detach().cpu()  # the one transfer
        return _rebuild(values, iter(numbers.tolist()))
    flat = torch.cat([t.reshape(-1).to(device=device, dtype=dtype) for t in leaves]).detach()
    host = flat.cpu()  # the one transfer
    return _rebuild(values, iter(host.split([t.numel() for t in leaves])))


__all__ = ["to_host"]
