"""Batches for ``recalibrate_bn``: the default forward, sizes, cuts, joins, and one process's stream of batches.

A batch is whatever the data yields (a tensor, a tuple/list, a mapping, nested). Its size is the leading
dimension of its first tensor. `BatchStream` hands out the batches of one pass over the data: moved to the
device, cut to a sample quota, and never with a single sample (BatchNorm refuses one value per channel in
train mode): a one-sample batch is joined to its neighbour, so its sample still counts exactly.
Pure torch, no Lightning.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

ForwardFn = Callable[[nn.Module, Any], Any]
_END = object()


def length_or_none(batches: Iterable[Any]) -> int | None:
    """``len(batches)``, or ``None`` for an iterable without a length.

    Examples:
        >>> length_or_none([1, 2, 3]), length_or_none(iter([1]))
        (3, None)
    """
    try:
        return len(batches)  # type: ignore[arg-type]
    except (TypeError, NotImplementedError):
        return None


def default_forward_problem(batch: Any) -> str | None:
    """Why the default forward cannot feed ``batch`` to a model (``None`` when it can).

    The default forward passes a tensor batch as ``model(batch)`` and a tuple/list as ``model(batch[0])``; what it
    passes must be or hold a tensor (a string, or a list of strings, holds none).

    Examples:
        >>> default_forward_problem((torch.zeros(2), 1)) is None, default_forward_problem(["a", "b"])
        (True, 'a list whose first item (passed as model(batch[0])) is a str, which holds no tensor')
    """
    if isinstance(batch, Tensor):
        return None
    if isinstance(batch, (tuple, list)) and batch:
        first = batch[0]
        if isinstance(first, Tensor) or _holds_tensor(first):
            return None
        return (
            f"a {type(batch).__name__} whose first item (passed as model(batch[0])) is a {type(first).__name__}, "
            "which holds no tensor"
        )
    if isinstance(batch, (tuple, list)):
        return f"an empty {type(batch).__name__}"
    return f"a {type(batch).__name__}"


def _holds_tensor(value: Any) -> bool:
    found: list[bool] = []
    apply_to_collection(value, Tensor, lambda t: found.append(True))
    return bool(found)


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run ``model(batch)`` for a tensor, ``model(batch[0])`` for a tuple or list; anything else is an error.

    What is passed to the model must be or hold a tensor (`default_forward_problem`).

    Examples:
        >>> default_forward(nn.Identity(), (torch.ones(2), torch.zeros(2)))
        tensor([1., 1.])
    """
    if isinstance(batch, Tensor):
        return model(batch)
    problem = default_forward_problem(batch)
    if problem is None:
        return model(batch[0])
    raise TypeError(
        f"recalibrate_bn: the default forward cannot feed this batch of `batches` to the model: it is {problem}. "
        "Allowed: a tensor (passed as model(x)) or a non-empty tuple/list whose first item is or holds a tensor "
        "(passed as model(batch[0])); for anything else pass `forward_fn=lambda model, batch: ...`."
    )


def takes_two_positional(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` can be called as ``fn(module, batch)`` (``True`` when its signature cannot be read).

    Examples:
        >>> takes_two_positional(lambda module, batch: None), takes_two_positional(lambda batch: None)
        (True, False)
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C extensions have none
        return True
    try:
        signature.bind(None, None)
    except TypeError:
        return False
    return True


def meta_tensor_problem(batch: Any) -> str | None:
    """A description of the first tensor of ``batch`` on the ``meta`` device (shape, no data), or ``None``.

    Examples:
        >>> meta_tensor_problem((torch.zeros(2), torch.empty(3, device="meta")))
        'a tensor of shape (3,) on the meta device'
        >>> meta_tensor_problem(torch.zeros(2)) is None
        True
    """
    if isinstance(batch, Tensor):
        return f"a tensor of shape {tuple(batch.shape)} on the meta device" if batch.is_meta else None
    found: list[Tensor] = []
    apply_to_collection(batch, Tensor, lambda t: found.append(t) if t.is_meta else None)
    return meta_tensor_problem(found[0]) if found else None


def batch_size_of(batch: Any) -> int | None:
    """Leading dimension of the batch's first tensor (depth-first through mappings, sequences), or ``None``.

    Examples:
        >>> batch_size_of({"x": torch.zeros(5, 3), "y": torch.zeros(5)}), batch_size_of("text")
        (5, None)
    """
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        items: Iterable[Any] = batch.values()
    elif isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        items = batch
    else:
        return None
    for item in items:
        size = batch_size_of(item)
        if size is not None:
            return size
    return None


def take_samples(batch: Any, k: int, size: int, start: int = 0) -> Any:
    """Samples ``start`` to ``start + k`` of a batch: every tensor whose leading dimension is ``size`` is cut.

    Examples:
        >>> x, y = take_samples((torch.arange(6).view(3, 2), torch.arange(3)), 2, 3)
        >>> x.tolist(), y.tolist()
        ([[0, 1], [2, 3]], [0, 1])
    """
    return apply_to_collection(
        batch, Tensor, lambda t: t[start : start + k] if t.dim() > 0 and t.shape[0] == size else t
    )


def join_batches(a: Any, b: Any, size_a: int, size_b: int) -> Any:
    """One batch holding the samples of ``a`` then those of ``b`` (same structure, sizes ``size_a``, ``size_b``).

    Tensors with the batch's leading dimension are concatenated, as are lists with one item per sample;
    anything else (metadata) is taken from ``a``.

    Examples:
        >>> batch = join_batches((torch.zeros(2, 3), ["a", "b"]), (torch.ones(1, 3), ["c"]), 2, 1)
        >>> batch[0].shape, batch[1]
        (torch.Size([3, 3]), ['a', 'b', 'c'])
    """
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.dim() > 0 and b.dim() > 0 and a.shape[0] == size_a and b.shape[0] == size_b:
            return torch.cat((a, b))
        return a
    if isinstance(a, Mapping) and isinstance(b, Mapping) and a.keys() == b.keys():
        joined = {key: join_batches(a[key], b[key], size_a, size_b) for key in a}
        return joined if type(a) is dict else type(a)(joined)  # type: ignore[call-arg]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) == size_a and len(b) == size_b and len(a) != len(b) and not any(isinstance(v, Tensor) for v in a):
            return type(a)([*a, *b]) if not hasattr(a, "_fields") else a
        if len(a) == len(b):
            items = [join_batches(x, y, size_a, size_b) for x, y in zip(a, b, strict=True)]
            return type(a)(*items) if hasattr(a, "_fields") else type(a)(items)
    return a


def move_batch(batch: Any, device: torch.device | None) -> Any:
    """Every tensor of ``batch`` on ``device`` (the batch itself when ``device`` is ``None``).

    Examples:
        >>> move_batch([torch.zeros(1)], torch.device("cpu"))[0].device
        device(type='cpu')
    """
    if device is None:
        return batch
    return apply_to_collection(batch, Tensor, lambda t: t.to(device, non_blocking=True))


class BatchStream:
    """One process's batches for one pass: moved, cut to a sample quota, never a lone sample.

    `take` returns the next batch to forward and its size. A batch with one sample is joined to the next one;
    a one-sample batch at the end of the data is joined to the batch before it; a quota is never cut so that a
    single sample would remain for a later batch. Only a lone sample with no batch at all to join (data of one
    sample) is left out, and counted in `left_out`. Batches without a size (no tensor) are passed through
    unchanged and make the stream uncountable.

    Args:
        batches: the data (any iterable of batches).
        device: where to move every tensor of each batch (``None``: leave them).
        num_batches: at most this many batches are handed out (``None``: no limit).

    Examples:
        >>> stream = BatchStream([torch.zeros(4, 2), torch.zeros(3, 2), torch.zeros(1, 2)], None, None)
        >>> [size for _, size in iter(lambda: stream.take(None), None)], stream.joined
        ([4, 4], 1)
    """

    def __init__(self, batches: Iterable[Any], device: torch.device | None, num_batches: int | None) -> None:
        self._iterator: Iterator[Any] = iter(batches)
        self._ahead: list[Any] = []
        self._read = 0  # batches read from the data so far
        self._device = device
        self.batches_left = num_batches
        #: Whether every batch so far had a size.
        self.countable = True
        #: One-sample batches (or cut remainders) joined to a neighbour.
        self.joined = 0
        #: Samples left out: a lone sample at the end of the data with no batch to join.
        self.left_out = 0
        #: The last batch handed out (to build an empty batch from).
        self.template: tuple[Any, int] | None = None

    def _peek(self, k: int) -> Any:
        while len(self._ahead) <= k:
            batch = next(self._iterator, _END)
            if batch is _END:
                return _END
            batch = move_batch(batch, self._device)
            problem = meta_tensor_problem(batch)
            if problem is not None:
                raise ValueError(
                    f"recalibrate_bn: batch {self._read} of `batches` holds {problem}: meta tensors have a shape but "
                    "no values, so there are no statistics to compute from them. Pass batches of real data (on the "
                    "model's device, or give `device=`)."
                )
            self._read += 1
            self._ahead.append(batch)
        return self._ahead[k]

    def _pop(self) -> Any:
        batch = self._peek(0)
        if batch is not _END:
            self._ahead.pop(0)
        return batch

    def _split(self, batch: Any, size: int, keep: int) -> Any:
        """The first ``keep`` samples of ``batch``; the rest goes back to the front of the stream."""
        if keep >= size:
            return batch
        self._ahead.insert(0, take_samples(batch, size - keep, size, start=keep))
        return take_samples(batch, keep, size)

    def take(self, quota: int | None) -> tuple[Any, int | None] | None:
        """The next batch and its size, with at most ``quota`` samples (``None``: any); ``None`` at the end."""
        if self.batches_left == 0:
            return None
        batch = self._pop()
        size = batch_size_of(batch) if batch is not _END else None
        while size == 0:  # a batch without samples adds nothing: skip it
            batch = self._pop()
            size = batch_size_of(batch) if batch is not _END else None
        if batch is _END:
            return None
        if size is None:
            self.countable = False
            if quota is not None:
                raise TypeError(
                    f"a sample budget needs batches with a tensor whose leading dimension is the batch size; got "
                    f"a batch of type {type(batch).__name__} without one. Use `num_batches`."
                )
            return self._hand_out(batch, None)
        total = size if quota is None else min(size, quota)
        batch = self._split(batch, size, total)
        while quota is None or total < quota:
            room = None if quota is None else quota - total
            following = self._peek(0)
            n = batch_size_of(following) if following is not _END else None
            if not n:
                break
            if not (total == 1 or room == 1 or (n == 1 and self._peek(1) is _END)):
                break
            add = n if room is None else min(n, room)
            batch = join_batches(batch, self._split(self._pop(), n, add), total, add)
            total += add
            self.joined += 1
        if total == 1:  # nothing to join it to: BatchNorm would refuse it in train mode
            self.left_out += 1
            return None
        return self._hand_out(batch, total)

    def next_size(self) -> int | None:
        """Size of the next batch of the data as it comes (``None`` at the end or for a batch without a size)."""
        following = self._peek(0)
        return None if following is _END else batch_size_of(following)

    def exhausted(self) -> bool:
        """Whether `take` has nothing more to hand out (data or ``num_batches`` used up)."""
        return self.batches_left == 0 or self._peek(0) is _END

    def _hand_out(self, batch: Any, size: int | None) -> tuple[Any, int | None]:
        if self.batches_left is not None:
            self.batches_left -= 1
        if size is not None:
            self.template = (batch, size)
        return batch, size

    def empty_batch(self) -> Any:
        """A batch with no sample, of the structure of the last batch handed out (``None`` before any)."""
        if self.template is None:
            return None
        batch, size = self.template
        return take_samples(batch, 0, size)


__all__ = [
    "BatchStream",
    "ForwardFn",
    "batch_size_of",
    "default_forward",
    "default_forward_problem",
    "join_batches",
    "length_or_none",
    "move_batch",
    "take_samples",
]
