"""One pass of ``recalibrate_bn`` over the data, in one process or several, with a global sample budget.

Three ways to run a pass, chosen once at its start:

* ``"local"`` (one process): forward the batches until the data or the budget ends.
* ``"planned"`` (several processes, every loader has a length, no SyncBatchNorm): one small all-reduce at the
  start shares the lengths and splits the budget; each process then runs its share with no collective per
  batch. A final all-reduce counts what was used; if the split left part of the budget unused while some
  process still has data (its length overstated its samples), the rest continues per batch.
* ``"per_batch"`` (a loader without a length, or SyncBatchNorm): before every forward the processes share
  whether they still have a batch and its size (one small all-reduce). Processes that have run out keep
  answering until every process is done; with SyncBatchNorm they forward an empty batch meanwhile, so its
  collectives stay in step, and an empty batch adds nothing to the statistics.

Either way the union of the samples used is what a one-process run over the concatenated data would use, and the
budget is split in rank order.

An error on one process (its data, its transfer, the user's forward) reaches every process: each agreement of a pass
also says whether a process failed since the previous one (`agree_on_failure`), and all agreements of a pass have
the same width, so the failed process answers whichever agreement the others reach next, with its error, and every
process raises there. This rides on the agreements the pass makes anyway: no extra collective. (With SyncBatchNorm,
an error inside a forward on one process leaves the others in SyncBatchNorm's own collective: that one is the
model's, not ours.) Pure torch, no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_bnsgd.bn.batches import BatchStream, length_or_none, take_samples
from lightning_bnsgd.bn.distributed import agree_on_failure, is_agreed, mark_agreed, rank, world_size

Agreement = str  # "local" | "planned" | "per_batch"
#: Values in every agreement of a pass (padded to it), so that a failed process can answer whichever comes next.
_WIDTH = 4
_OWNER = "recalibrate_bn"


class UncountableBatches(TypeError):
    """A sample budget was set, but a batch had no tensor whose leading dimension gives its size.

    Attributes:
        batch_type: the type name of the batch without a size (``None`` when it was another process's).
    """

    #: What to do about it, for ``recalibrate_bn``'s arguments (a caller with other arguments replaces it).
    HINT = "Pass `num_batches` instead of `num_samples` (or `num_samples=None` for all the data)."

    def __init__(self, batch_type: str | None) -> None:
        self.batch_type = batch_type
        got = f"got a batch of type {batch_type}" if batch_type is not None else "got a batch"
        super().__init__(
            f"{_OWNER}: a sample budget (`num_samples`) needs batches with a tensor whose leading dimension is the "
            f"batch size; {got} without one. {self.HINT}"
        )


@dataclass
class PassStats:
    """What one pass did.

    Attributes:
        forwards: forwards with samples on this process.
        samples: samples used over all processes (``None`` when some batch had no tensor to count).
        stopped_by: ``"data"``, ``"num_samples"`` or ``"num_batches"``.
        agreement: ``"local"``, ``"planned"`` or ``"per_batch"``.
        samples_per_rank: samples used by each process, in rank order.
        joined: one-sample batches (or cut remainders) joined to a neighbour, over all processes.
        left_out: lone samples left out (no batch to join), over all processes.
        empty_forwards: forwards of an empty batch on this process (SyncBatchNorm lockstep).
    """

    forwards: int = 0
    samples: int | None = 0
    stopped_by: str = "data"
    agreement: Agreement = "local"
    samples_per_rank: list[int] = field(default_factory=list)
    joined: int = 0
    left_out: int = 0
    empty_forwards: int = 0


def split_budget(budget: int, capacities: list[int]) -> list[int]:
    """Split ``budget`` samples over processes as evenly as their ``capacities`` allow, never a share of one.

    Examples:
        >>> split_budget(900, [600, 408]), split_budget(100, [600, 20]), split_budget(3, [1, 5])
        ([492, 408], [80, 20], [0, 3])
    """
    shares = [0] * len(capacities)
    remaining = budget
    order = sorted(range(len(capacities)), key=lambda r: (capacities[r], r))
    for k, r in enumerate(order):
        share = min(capacities[r], max(0, -(-remaining // (len(order) - k))))
        if share == 1:  # one sample alone cannot be forwarded in train mode
            share = 2 if capacities[r] >= 2 else 0
        shares[r] = share
        remaining -= share
    return shares


class PassRunner:
    """Runs one pass: ``forward(batch)`` for each batch this process uses (see the module doc).

    Args:
        batches: this process's data.
        device: where to move each batch.
        num_batches: at most this many forwards on this process.
        budget: samples over all processes (``None``: no limit).
        forward: runs one forward of a batch.
        lockstep: the model synchronizes in its forward (SyncBatchNorm): all processes forward together.
    """

    def __init__(
        self,
        batches: Iterable[Any],
        device: torch.device | None,
        num_batches: int | None,
        budget: int | None,
        forward: Callable[[Any], None],
        lockstep: bool,
    ) -> None:
        self.stream = BatchStream(batches, device, num_batches)
        self.length = length_or_none(batches)
        if self.length is not None and num_batches is not None:
            self.length = min(self.length, num_batches)
        self.budget = budget
        self.forward = forward
        self.lockstep = lockstep
        self.stats = PassStats()
        self._local_samples = 0

    def run(self) -> PassStats:
        """Run the pass and return its statistics (identical on every process, except `forwards`).

        An error on one process is raised on every process (see the module doc).
        """
        try:
            if world_size() == 1:
                self._run_local(self.budget)
            else:
                self._run_distributed()
            self._finish()
        except Exception as err:
            if world_size() == 1 or is_agreed(err):
                raise
            self._agree([], err)  # the others wait in their next agreement: answer it with the error (raises)
            raise
        return self.stats

    def _agree(self, values: list[int], error: Exception | None = None) -> list[list[int]]:
        """Every process's ``values`` (at most `_WIDTH`), in rank order; raises on every process if one failed."""
        try:
            rows = agree_on_failure([*values, *[0] * (_WIDTH - len(values))], error, _OWNER)
        except Exception as err:
            mark_agreed(err)  # every process raises here: nothing more to tell the others
            raise
        return [row[: len(values)] for row in rows]

    def _use(self, batch: Any, size: int | None) -> None:
        self.forward(batch)
        self.stats.forwards += 1
        self._local_samples += size or 0

    def _run_local(self, quota: int | None) -> None:
        while quota is None or self._local_samples < quota:
            item = self._take(None if quota is None else quota - self._local_samples)
            if item is None:
                break
            self._use(*item)

    def _take(self, quota: int | None) -> tuple[Any, int | None] | None:
        countable = self.stream.countable
        try:
            return self.stream.take(quota)
        except TypeError as err:
            if countable and not self.stream.countable:  # the stream met a batch without a size under a quota
                raise UncountableBatches(None) from err
            raise

    def _run_distributed(self) -> None:
        first_size = self.stream.next_size()
        sized = first_size is not None or self.stream.exhausted()
        table = self._agree(
            [-1 if self.length is None else self.length, first_size or 0, int(self.lockstep), int(sized)]
        )
        if self.budget is not None and not all(row[3] for row in table):
            raise mark_agreed(UncountableBatches(None))  # on every process alike
        self.lockstep = any(row[2] for row in table)
        if self.lockstep or any(row[0] < 0 for row in table):
            self.stats.agreement = "per_batch"
            self._run_per_batch(0)
            return
        self.stats.agreement = "planned"
        quotas: list[int | None] = [None] * len(table)
        if self.budget is not None:
            quotas = list(split_budget(self.budget, [row[0] * row[1] for row in table]))
        self._run_local(quotas[rank()])
        settle = self._agree([self._local_samples, int(not self.stream.exhausted())])
        used = sum(row[0] for row in settle)
        if self.budget is not None and used < self.budget and any(row[1] for row in settle):
            self._run_per_batch(used)

    def _run_per_batch(self, used: int) -> None:
        """Forward step by step, agreeing before each forward; ``used``: samples already used by all processes."""
        while self.budget is None or used < self.budget:
            item = self.stream.take(None)
            size = 0 if item is None else (-1 if item[1] is None else item[1])
            has_template = item is not None or self.stream.template is not None
            table = self._agree([int(item is not None), size, int(has_template)])
            if not any(row[0] for row in table):
                break
            takes = self._allocate([row[1] for row in table], used)
            self._check_step(table, takes, None if item is None else item[0])
            mine = takes[rank()]
            if mine > 0 and item is not None:
                batch, full = item
                self._use(take_samples(batch, mine, full) if full is not None and mine < full else batch, mine)
            elif self.lockstep:
                self.forward(self.stream.empty_batch())
                self.stats.empty_forwards += 1
            used += sum(takes)

    def _allocate(self, sizes: list[int], used: int) -> list[int]:
        """Samples each process uses in this step (the budget's end is split in rank order, never one sample)."""
        if self.budget is None or any(s < 0 for s in sizes):
            return [max(s, 0) for s in sizes]
        left = self.budget - used
        takes = []
        for size in sizes:
            take = min(size, left)
            if take == 1 and size >= 2:
                take = 2
            takes.append(take)
            left = max(0, left - take)
        return takes

    def _check_step(self, table: list[list[int]], takes: list[int], batch: Any) -> None:
        """Raise on every process alike when the step cannot run as agreed."""
        if self.budget is not None and any(row[1] < 0 for row in table):
            raise mark_agreed(UncountableBatches(type(batch).__name__ if table[rank()][1] < 0 else None))
        if self.lockstep and any(t == 0 and not row[2] for t, row in zip(takes, table, strict=True)):
            raise mark_agreed(
                ValueError(
                    "recalibrate_bn: with SyncBatchNorm every process must forward in every step, but a process had no "
                    "batch at all to build an empty batch from. Give every process at least one batch."
                )
            )

    def _finish(self) -> None:
        stream = self.stream
        rows = self._agree([self._local_samples, int(stream.countable), stream.joined, stream.left_out])
        self.stats.samples_per_rank = [row[0] for row in rows]
        total = sum(self.stats.samples_per_rank)
        self.stats.samples = total if all(row[1] for row in rows) else None
        self.stats.joined = sum(row[2] for row in rows)
        self.stats.left_out = sum(row[3] for row in rows)
        if self.budget is not None and total >= self.budget:
            self.stats.stopped_by = "num_samples"
        elif stream.batches_left == 0:
            self.stats.stopped_by = "num_batches"


__all__ = ["PassRunner", "PassStats", "UncountableBatches"]
