"""Reading a run's batches from a callback without disturbing the run.

Loader copies that cannot reset the training loop's workers, the random states a read must put back, the batch
transfer hooks, the debug limits, a trial forward. ``BNRecalibration``, ``BNFoldExport`` and the ``export``
subcommand share these; which batches ``BNRecalibration`` reads is in `_recalibration_sources`.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from lightning_utilities.core.overrides import is_overridden
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy
from torch.utils.data import DataLoader, IterableDataset

from lightning_bnsgd._compat import namespace_of
from lightning_bnsgd.bn._modes import preserved_modes
from lightning_bnsgd.bn.batches import length_or_none
from lightning_bnsgd.callbacks._own_forwards import own_forwards

_TRANSFER_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")


def without_persistent_workers(loader: Iterable[Any]) -> Iterable[Any]:
    """``loader``, or for a DataLoader with persistent workers a copy whose iterator cannot reset the run's own."""
    if not isinstance(loader, DataLoader) or loader.num_workers == 0 or not loader.persistent_workers:
        return loader
    return rebuilt_loader(loader)


def rebuilt_loader(loader: DataLoader, batch_sampler: Any = None) -> DataLoader:
    """A new DataLoader over ``loader``'s data, with its workers, collation and generator.

    It never has persistent workers, and takes ``batch_sampler`` instead of ``loader``'s own when given.

    Examples:
        >>> loader = DataLoader(range(6), batch_size=4)
        >>> [b.tolist() for b in rebuilt_loader(loader)]
        [[0, 1, 2, 3], [4, 5]]
    """
    common: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "worker_init_fn": loader.worker_init_fn,
        "timeout": loader.timeout,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
        "persistent_workers": False,
    }
    if batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=batch_sampler, **common)
    if isinstance(loader.dataset, IterableDataset):
        return DataLoader(loader.dataset, batch_size=loader.batch_size, drop_last=loader.drop_last, **common)
    if loader.batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, **common)
    return DataLoader(loader.dataset, batch_size=None, sampler=loader.sampler, **common)


def loader_generators(loader: object) -> list[torch.Generator]:
    """The ``torch.Generator`` objects that iterating ``loader`` advances.

    Its own, its sampler's, its batch sampler's sampler's.

    Examples:
        >>> g = torch.Generator()
        >>> loader_generators(DataLoader(range(4), shuffle=True, generator=g)) == [g]
        True
    """
    found: list[torch.Generator] = []
    for owner in (
        loader,
        getattr(loader, "sampler", None),
        getattr(loader, "batch_sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


@contextlib.contextmanager
def preserved_rng(generators: Iterable[torch.Generator] = ()) -> Iterator[None]:
    """Run the block, then put back every random state it may have drawn from.

    These are Python's, NumPy's global one (if NumPy is imported), torch's CPU and CUDA/MPS generators, and the given
    ``generators``.

    Iterating a DataLoader draws its shuffling and worker seeds from these, so without this a callback that reads
    the training data would change every later shuffle of the training run.

    Examples:
        >>> torch.manual_seed(0) and None
        >>> with preserved_rng():
        ...     _ = torch.rand(3)
        >>> after = torch.rand(1)
        >>> torch.manual_seed(0) and None
        >>> bool(after == torch.rand(1))
        True
    """
    generators = list(generators)
    saved = [g.get_state() for g in generators]
    python_state = random.getstate()
    numpy = sys.modules.get("numpy")
    numpy_state = numpy.random.get_state() if numpy is not None else None
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    mps_state = torch.mps.get_rng_state() if torch.backends.mps.is_available() else None
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        for generator, state in zip(generators, saved, strict=True):
            generator.set_state(state)
        random.setstate(python_state)
        if numpy is not None and numpy_state is not None:
            numpy.random.set_state(numpy_state)
        if mps_state is not None:
            torch.mps.set_rng_state(mps_state)


class TransferredBatches:
    """Re-iterable view of a loader that stops after ``limit`` batches (``None``: no limit).

    Each batch is passed through ``move`` (the Lightning batch-transfer hooks).
    """

    def __init__(self, loader: Iterable[Any], move: Callable[[Any], Any], limit: int | None = None) -> None:
        self.loader = loader
        self.move = move
        self.limit = limit

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.loader):
            if self.limit is not None and i >= self.limit:
                return
            yield self.move(batch)

    def __len__(self) -> int:
        length = length_or_none(self.loader)
        if length is None:
            raise TypeError("the underlying loader has no length")
        return length if self.limit is None else min(length, self.limit)


def transfer_batch(batch: Any, trainer: Any, pl_module: Any) -> Any:
    """Move ``batch`` as Lightning's training loop does.

    Each batch-transfer hook comes from the DataModule when it overrides it (checked against the DataModule's own
    Lightning namespace), else from the LightningModule.
    """
    datamodule = getattr(trainer, "datamodule", None)
    base = None
    if datamodule is not None:
        with contextlib.suppress(TypeError):
            base = namespace_of(datamodule).LightningDataModule
    for hook in _TRANSFER_HOOKS:
        owner: Any = pl_module
        if base is not None and isinstance(datamodule, base) and is_overridden(hook, datamodule, base):
            owner = datamodule
        if hook == "transfer_batch_to_device":
            batch = owner.transfer_batch_to_device(batch, pl_module.device, 0)
        else:
            batch = getattr(owner, hook)(batch, 0)
    return batch


def debug_batch_limit(trainer: Any, from_trainer_loader: bool) -> int | None:
    """How many batches a recalibration may read under the Trainer's debug limits.

    ``fast_dev_run`` for any loader, ``limit_train_batches`` (through ``trainer.num_training_batches``) for the
    trainer's own train loader.
    """
    fast = getattr(trainer, "fast_dev_run", False)
    if fast:
        return 1 if fast is True else int(fast)
    if from_trainer_loader:
        limit = getattr(trainer, "num_training_batches", None)
        if isinstance(limit, int) and limit > 0:
            return limit
    return None


def first_batch(loader: Iterable[Any]) -> Any:
    """The first batch of a fresh iterator over ``loader`` (``None`` when it yields nothing).

    The random states are left as they were.

    Examples:
        >>> first_batch([[1, 2], [3]]), first_batch([])
        ([1, 2], None)
    """
    with preserved_rng(loader_generators(loader)):
        return next(iter(loader), None)


def trial_forward(
    module: nn.Module,
    batch: Any,
    forward: Callable[[nn.Module, Any], Any],
    dropout: str,
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> None:
    """Run ``forward(module, batch)`` once as a recalibration would, changing nothing.

    It runs without gradients, with every BatchNorm layer in eval mode (no statistic moves, SyncBatchNorm runs no
    collective), the other modules in eval mode too unless ``dropout="train"``, the random states put back and the
    forward marked as the plugin's own.

    A model with uninitialized lazy modules is left alone (a forward would initialize them).

    Examples:
        >>> bn = nn.BatchNorm1d(2)
        >>> trial_forward(bn, torch.randn(4, 2), lambda m, b: m(b), "eval")
        >>> bn.running_mean.tolist(), bn.training
        ([0.0, 0.0], True)
    """
    if any(is_lazy(t) for t in (*module.parameters(), *module.buffers())):
        return
    with preserved_modes(module) as modules:
        for m in modules:
            if dropout == "eval" or isinstance(m, _BatchNorm):
                m.training = False
        with torch.no_grad(), own_forwards(), preserved_rng(), context():
            forward(module, batch)
