"""Which batches a ``BNRecalibration`` reads at each moment, and their agreement across ranks.

Each ``*_source`` function returns ``(batches, limit)``: an iterable of batches and the most batches to read of it
(``None``: no limit besides ``num_samples``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

from lightning_utilities.core.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader

from lightning_bnsgd._compat import (
    Trainer,
    index_wrapped_batch_sampler,
    prepare_train_dataloader,
    request_train_dataloaders,
)
from lightning_bnsgd.bn.batches import length_or_none
from lightning_bnsgd.bn.distributed import agree_on_failure
from lightning_bnsgd.callbacks._batches import debug_batch_limit, rebuilt_loader, without_persistent_workers

#: The callback's name, which every message of it starts with.
OWNER = "BNRecalibration"

#: ``(batches, limit)``: what to recalibrate from and how many batches of it at most.
Source = tuple[Iterable[Any], int | None]
#: The callback's ``dataloader`` argument.
UserLoader = DataLoader | Callable[[], Iterable[Any]] | None


def first_loader(loaders: Any, what: str, hint: str = "") -> Any:
    """The first of several dataloaders (a dict, or a list/tuple of DataLoaders), with a warning ending in ``hint``.

    A one-item collection gives its item, anything else is ``loaders`` itself.

    Examples:
        >>> loader = DataLoader(range(4))
        >>> first_loader({"a": loader}, "test") is loader, first_loader([1, 2], "train")
        (True, [1, 2])
    """
    if isinstance(loaders, Mapping) or (
        isinstance(loaders, (list, tuple)) and loaders and all(isinstance(x, DataLoader) for x in loaders)
    ):
        if len(loaders) > 1:
            rank_zero_warn(f"{OWNER}: several {what} dataloaders; recalibrating from the first.{hint}")
        return next(iter(loaders.values())) if isinstance(loaders, Mapping) else loaders[0]
    return loaders


def _limit(limit: float) -> int | None:
    return None if limit == float("inf") else int(limit)


def loader_of(trainer: Trainer, dataloader: UserLoader) -> Iterable[Any]:
    """``dataloader`` (called, if it is a callable), or the trainer's (first) train dataloader when it is ``None``."""
    if dataloader is None:
        loaders = trainer.train_dataloader
        if loaders is None:
            raise RuntimeError(f"{OWNER}: the trainer has no train dataloader at this point; pass `dataloader=`.")
        loader: Iterable[Any] = first_loader(loaders, "train", " Pass `dataloader=`.")
    elif isinstance(dataloader, DataLoader):
        loader = dataloader
    else:
        loader = dataloader()
        if not isinstance(loader, Iterable):
            raise TypeError(f"{OWNER}: `dataloader()` must return an iterable of batches, got {type(loader).__name__}.")
    return without_persistent_workers(loader)


def fit_source(trainer: Trainer, dataloader: UserLoader) -> Source:
    """During ``fit``: ``dataloader`` or the train dataloader, cut to the Trainer's debug limits."""
    return loader_of(trainer, dataloader), debug_batch_limit(trainer, from_trainer_loader=dataloader is None)


def stage_train_source(trainer: Trainer, stage: str, dataloader: UserLoader) -> Source:
    """``before_<stage>="train_data"``: ``dataloader`` if given, else the run's train dataloader.

    The train dataloader is requested and prepared as ``fit`` would (its own shard on each process under DDP), and
    cut to ``limit_train_batches``.
    """
    if dataloader is not None:
        return loader_of(trainer, dataloader), debug_batch_limit(trainer, from_trainer_loader=False)
    setting = f"`before_{stage}='train_data'`"
    try:
        loaders = request_train_dataloaders(trainer)
    except Exception as err:
        message = (
            f"{OWNER}: {setting} requests the train dataloader, and `train_dataloader()` raised "
            f"{type(err).__name__}: {err}. In `Trainer.{stage}` Lightning sets the data up with "
            f"`setup('{stage}')`: create the train data there too, or pass `dataloader=`."
        )
        try:
            named = type(err)(message)
        except Exception:  # an exception class whose constructor takes other arguments
            named = RuntimeError(message)
        raise named from err
    if loaders is None:
        raise RuntimeError(
            f"{OWNER}: {setting}, but this run has no train dataloader (its DataModule, or its "
            f"LightningModule, defines no `train_dataloader()`); pass `dataloader=`, or use "
            f"`before_{stage}='{stage}_data'`."
        )
    loader, limit = prepare_train_dataloader(trainer, first_loader(loaders, "train", " Pass `dataloader=`."))
    if limit == 0:
        raise ValueError(
            f"{OWNER}: {setting}, but the Trainer's `limit_train_batches={trainer.limit_train_batches}` "
            "leaves no batch of the train dataloader to recalibrate from."
        )
    return without_persistent_workers(cast("Iterable[Any]", loader)), _limit(limit)


def stage_own_source(trainer: Trainer, stage: str) -> Source:
    """``before_<stage>="<stage>_data"``: the stage's own (first) dataloader.

    As many batches as the stage reads (``limit_<stage>_batches``), iterated without disturbing the stage's own
    iterator.
    """
    loaders = trainer.test_dataloaders if stage == "test" else trainer.predict_dataloaders
    counts = trainer.num_test_batches if stage == "test" else trainer.num_predict_batches
    if loaders is None or not counts:
        raise RuntimeError(f"{OWNER}: `before_{stage}='{stage}_data'`, but the trainer has no {stage} dataloader.")
    loader = first_loader(loaders, stage)
    if not isinstance(loader, DataLoader) and iter(loader) is loader:
        raise TypeError(
            f"{OWNER}: `before_{stage}='{stage}_data'`, but the {stage} dataloader is a one-shot iterator "
            f"({type(loader).__name__}): reading it would use up the batches the {stage} needs. Pass a "
            f"re-iterable (a DataLoader, a list), or use `before_{stage}='train_data'`."
        )
    if isinstance(loader, DataLoader):
        inner = index_wrapped_batch_sampler(loader)  # predict: an iterator of its own, shared by every iteration
        loader = rebuilt_loader(loader, inner) if inner is not None else without_persistent_workers(loader)
    return loader, _limit(counts[0])


def agreed_source(read: Callable[[], Source], num_samples: int | None, frozen: bool = False) -> tuple[Source, bool]:
    """The batches ``read()`` gives, checked on every rank together.

    An error on one rank is raised on every rank (naming it), and data that is empty on every rank is refused (one
    rank's empty shard is fine). ``frozen``: every BatchNorm layer of this rank's model is frozen; the same
    agreement tells whether they are on every rank (returned second: then every rank skips); ranks that disagree
    are an error on every rank.
    """
    loader: Iterable[Any] = ()
    limit: int | None = None
    error, empty = None, False
    try:
        loader, limit = read()
        length = length_or_none(loader)
        if length is None and num_samples is None:
            raise ValueError(
                f"{OWNER}: the dataloader has no length (it may be infinite) and `num_samples` is "
                "None; set `num_samples` to bound the recalibration."
            )
        empty = length == 0 or limit == 0
    except Exception as err:
        error = err
    rows = agree_on_failure([int(empty), int(frozen)], error, OWNER)
    if all(row[0] for row in rows):
        where = " on every rank" if len(rows) > 1 else ""
        raise ValueError(f"{OWNER}: the dataloader is empty{where}; there is nothing to recalibrate from.")
    frozen_on = [r for r, row in enumerate(rows) if row[1]]
    if frozen_on and len(frozen_on) < len(rows):
        raise ValueError(
            f"{OWNER}: every BatchNorm layer is frozen (in eval mode during training) on rank(s) {frozen_on} "
            f"of {len(rows)} but not on the others; the ranks' models must have the same modes."
        )
    return (loader, limit), bool(frozen_on)
