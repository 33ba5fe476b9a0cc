"""The few ``torch.distributed`` helpers the BatchNorm code needs: world, communication device, small gathers.

Every helper works without an initialized process group (one process: the world is 1 and the gathers return
this process's values), so callers need no separate single-process branch. Pure torch, no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialized.

    Examples:
        >>> is_distributed()
        False
    """
    return dist.is_available() and dist.is_initialized()


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Processes in ``group`` (default: the world); 1 without an initialized process group.

    Examples:
        >>> world_size()
        1
    """
    return dist.get_world_size(group) if is_distributed() else 1


def rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in ``group``; 0 without an initialized process group.

    Examples:
        >>> rank()
        0
    """
    return dist.get_rank(group) if is_distributed() else 0


def comm_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device collectives of ``group`` take their tensors on: the current CUDA device for NCCL, else the CPU.

    Examples:
        >>> comm_device()
        device(type='cpu')
    """
    if is_distributed() and "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_ints(values: list[int], group: dist.ProcessGroup | None = None) -> list[list[int]]:
    """Every rank's ``values`` (a list of the same length on each rank), one list per rank, in rank order.

    One small ``all_reduce`` of a ``(world, len(values))`` table read once on the host.

    Examples:
        >>> gather_ints([3, 4])
        [[3, 4]]
    """
    if world_size(group) == 1:
        return [list(values)]
    table = torch.zeros(world_size(group), len(values), dtype=torch.float64, device=comm_device(group))
    table[rank(group)] = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(table, group=group)
    return [[int(v) for v in row] for row in table.tolist()]


class RankFailure(RuntimeError):
    """Raised on every rank that did not fail when another rank failed during a step all ranks take together.

    `agree_on_failure` raises it; the message names the failing rank(s) and their errors.
    """


_AGREED = "_lightning_bnsgd_agreed"


def mark_agreed(err: BaseException) -> BaseException:
    """Mark ``err`` as raised on every rank alike (from values all ranks share); returns ``err``.

    No rank then reports it as its own failure again.
    """
    setattr(err, _AGREED, True)
    return err


def is_agreed(err: BaseException) -> bool:
    """Whether ``err`` was raised on every rank alike (`mark_agreed`, or by `agree_on_failure`)."""
    return bool(getattr(err, _AGREED, False))


def agree_on_failure(
    values: list[int], error: Exception | None, owner: str, group: dist.ProcessGroup | None = None
) -> list[list[int]]:
    """`gather_ints` of ``values`` that also tells every rank whether any rank failed.

    Each rank passes the error it hit since the last agreement (or ``None``), and if any rank had one, every rank
    raises.

    The failing rank re-raises its own error (with a note naming its rank); every other rank raises `RankFailure`
    naming the failing rank(s) and their errors. A rank that fails between two agreements only has to take part in
    the next one (with any ``values`` of the agreed length): no rank is left waiting in a collective. It costs no
    collective beyond the gather, except one ``all_gather_object`` of the error messages when a rank failed.

    Examples:
        >>> agree_on_failure([3], None, "recalibrate_bn")
        [[3]]
        >>> agree_on_failure([3], ValueError("bad batch"), "recalibrate_bn")
        Traceback (most recent call last):
        ...
        ValueError: bad batch
    """
    size = world_size(group)
    if size == 1:
        if error is not None:
            raise error
        return [list(values)]
    rows = gather_ints([*values, int(error is not None)], group)
    failed = [r for r, row in enumerate(rows) if row[-1]]
    if not failed:
        return [row[:-1] for row in rows]
    messages: list[object] = [None] * size
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}", group=group)
    where = ", ".join(f"rank {r}" for r in failed)
    if error is not None:
        mark_agreed(error)
        if hasattr(error, "add_note"):  # Python >= 3.11
            others = f" (also failed: {where})" if len(failed) > 1 else ""
            error.add_note(f"{owner}: raised on rank {rank(group)} of {size}; every rank stops{others}.")
        raise error
    details = "; ".join(f"rank {r} raised {messages[r]}" for r in failed)
    raise mark_agreed(RankFailure(f"{owner}: {where} of {size} failed, so every rank stops here. {details}"))


def all_reduce_sum(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Sum of ``tensor`` over the ranks of ``group`` (on ``tensor``'s device); ``tensor`` itself in one process.

    Examples:
        >>> all_reduce_sum(torch.tensor([1.0, 2.0])).tolist()
        [1.0, 2.0]
    """
    if world_size(group) == 1:
        return tensor
    payload = tensor.to(comm_device(group), copy=True)
    dist.all_reduce(payload, group=group)
    return payload.to(tensor.device)


def broadcast_from_zero(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Rank 0's ``tensor`` on every rank of ``group`` (a new tensor on ``tensor``'s device).

    Examples:
        >>> broadcast_from_zero(torch.tensor([5.0])).tolist()
        [5.0]
    """
    if world_size(group) == 1:
        return tensor
    payload = tensor.to(comm_device(group), copy=True)
    dist.broadcast(payload, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return payload.to(tensor.device)


def syncs_across_processes(layer: nn.Module) -> bool:
    """Whether ``layer`` is a ``SyncBatchNorm`` whose forward merges batch statistics over several processes.

    Examples:
        >>> syncs_across_processes(nn.SyncBatchNorm(3)), syncs_across_processes(nn.BatchNorm1d(3))
        (False, False)
    """
    if not isinstance(layer, nn.SyncBatchNorm) or not is_distributed():
        return False
    return world_size(layer.process_group) > 1


def all_ranks_max_min(values: Tensor, reduce_max: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """Elementwise maximum and minimum of ``values`` over all ranks, with ONE max all-reduce.

    ``reduce_max`` all-reduces a tensor with the MAX operation (e.g. `all_reduce_max`); the payload is
    ``cat([values, -values])``, so the minimum comes from the same collective.

    Examples:
        >>> other_rank = torch.tensor([3.0, -1.0])
        >>> fake_reduce = lambda p: torch.maximum(p, torch.cat([other_rank, -other_rank]))
        >>> mx, mn = all_ranks_max_min(torch.tensor([1.0, 2.0]), fake_reduce)
        >>> mx.tolist(), mn.tolist()
        ([3.0, 2.0], [1.0, -1.0])
    """
    n = values.numel()
    flat = values.reshape(-1)
    reduced = reduce_max(torch.cat([flat, -flat]))
    return reduced[:n].view_as(values), (-reduced[n:]).view_as(values)


def all_reduce_max(payload: Tensor) -> Tensor:
    """MAX all-reduce over the default ``torch.distributed`` process group (identity when not initialized).

    Examples:
        >>> all_reduce_max(torch.tensor([1.0, 2.0])).tolist()
        [1.0, 2.0]
    """
    if is_distributed():
        payload = payload.clone()
        torch.distributed.all_reduce(payload, op=torch.distributed.ReduceOp.MAX)
    return payload


__all__ = [
    "RankFailure",
    "agree_on_failure",
    "all_ranks_max_min",
    "all_reduce_max",
    "all_reduce_sum",
    "broadcast_from_zero",
    "comm_device",
    "gather_ints",
    "is_agreed",
    "is_distributed",
    "mark_agreed",
    "rank",
    "syncs_across_processes",
    "world_size",
]
