"""``BNRecalibration``: exact BatchNorm statistics before every validation and at the end of training."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from lightning_utilities.core.overrides import is_overridden
from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from lightning_bnsgd._compat import Callback, LightningDataModule, LightningModule, Trainer, pl
from lightning_bnsgd._validation import check_choice
from lightning_bnsgd.bn.recalibrate import (
    DROPOUT_MODES,
    MODES,
    NONFINITE_ACTIONS,
    DropoutMode,
    ForwardFn,
    Mode,
    NonFinite,
    RecalibrationReport,
    recalibrate_bn,
)

_TRANSFER_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")
#: The method a LightningModule may define to run one recalibration forward: ``bn_recalibration_step(batch)``.
STEP_METHOD = "bn_recalibration_step"


def _loader_length(loader: Iterable[Any]) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except (TypeError, NotImplementedError):
        return None


def _without_persistent_workers(loader: DataLoader) -> DataLoader:
    """A DataLoader over the same data whose iterator cannot reset the one the training loop is using."""
    if loader.num_workers == 0 or not loader.persistent_workers:
        return loader
    common: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "worker_init_fn": loader.worker_init_fn,
        "timeout": loader.timeout,
        "multiprocessing_context": loader.multiprocessing_context,
        "persistent_workers": False,
    }
    if isinstance(loader.dataset, IterableDataset):
        return DataLoader(loader.dataset, batch_size=loader.batch_size, drop_last=loader.drop_last, **common)
    if loader.batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, **common)
    return DataLoader(loader.dataset, batch_size=None, sampler=loader.sampler, **common)


class _TransferredBatches:
    """Re-iterable view of a loader whose batches go through the LightningModule's batch-transfer hooks."""

    def __init__(self, loader: Iterable[Any], move: Callable[[Any], Any]) -> None:
        self.loader = loader
        self.move = move

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            yield self.move(batch)


def _in_swa_bn_update_epoch(trainer: Trainer) -> bool:
    """True in the extra BatchNorm-update epoch of Lightning's ``StochasticWeightAveraging`` (backward skipped)."""
    swa = getattr(pl.callbacks, "StochasticWeightAveraging", None)
    if swa is None or not any(isinstance(cb, swa) for cb in trainer.callbacks):
        return False
    return bool(getattr(trainer.fit_loop, "_skip_backward", False))


class BNRecalibration(Callback):
    """Recompute BatchNorm population statistics exactly (``recalibrate_bn``) at the right moments of ``fit``.

    It runs in ``on_validation_epoch_start`` (never during the sanity check), so validation metrics and the
    checkpoints ``ModelCheckpoint`` writes at validation end carry the recalibrated statistics, and in
    ``on_train_end``, so the final model does. Lightning's ``StochasticWeightAveraging`` and
    ``WeightAveraging`` callbacks must come before it in ``callbacks=[...]``: it then recalibrates the
    averaged weights. With ``StochasticWeightAveraging`` it also clears the gradients at the start of SWA's extra
    BatchNorm-update epoch: Lightning skips backward there but still takes one optimizer step with the previous
    step's gradients, which would move the final weights off the average.

    Batches come from a fresh iterator over the trainer's train dataloader (each process its own shard under
    DDP), or from ``dataloader``; they are moved with the LightningModule's (or DataModule's) batch-transfer
    hooks and run under the Trainer's precision context on the unwrapped LightningModule. BatchNorm layers
    that were in eval mode during training (frozen) are left alone. The forward is, in this order of
    preference, ``forward_fn(module, batch)``, the module's ``bn_recalibration_step(batch)`` if it defines
    one, or ``module(batch[0])`` (``module(batch)`` for a tensor batch).

    Logs ``<log_prefix>/samples``, ``<log_prefix>/mean_shift`` and ``<log_prefix>/var_shift`` (the largest
    shift over the layers, see ``LayerShift``) to every logger, from rank zero.

    Args:
        num_samples: samples per recalibration, counted over all processes (``None``: the whole dataloader).
            Wu & Johnson (2021) found 10^3 to 10^4 samples enough.
        every_n_epochs: recalibrate before validation every ``n`` epochs.
        before_validation: recalibrate in ``on_validation_epoch_start``.
        on_train_end: recalibrate in ``on_train_end``.
        dataloader: a DataLoader, or a callable returning an iterable of batches (called at each use);
            ``None``: the trainer's train dataloader.
        forward_fn: ``forward_fn(module, batch)`` runs one forward (the return value is ignored).
        mode: ``"train"`` (one pass, precise BN) or ``"sequential"`` (layer by layer, inference semantics).
        dropout: ``"eval"`` (dropout and other non-BN modules in eval mode) or ``"train"`` (training modes).
        nonfinite: ``"raise"`` (NaN/Inf statistics are an error, nothing changed) or ``"skip"`` those batches.
        log_prefix: prefix of the logged metric names (give two instances different prefixes).
        verbose: also print a one-line summary of each recalibration from rank zero.

    Examples:
        >>> from lightning_bnsgd._compat import Trainer
        >>> callback = BNRecalibration(num_samples=2048, mode="sequential")
        >>> callback.state_key
        "BNRecalibration{'num_samples': 2048, 'mode': 'sequential', 'log_prefix': 'bn_recalibration'}"
        >>> trainer = Trainer(callbacks=[callback], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        num_samples: int | None = 4096,
        every_n_epochs: int = 1,
        before_validation: bool = True,
        on_train_end: bool = True,
        dataloader: DataLoader | Callable[[], Iterable[Any]] | None = None,
        forward_fn: ForwardFn | None = None,
        mode: Mode = "train",
        dropout: DropoutMode = "eval",
        nonfinite: NonFinite = "raise",
        log_prefix: str = "bn_recalibration",
        verbose: bool = False,
    ) -> None:
        super().__init__()
        if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)):
            raise TypeError(f"`num_samples` must be None or an integer >= 1, got {num_samples!r}.")
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"`num_samples` must be None or an integer >= 1, got {num_samples!r}.")
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int):
            raise TypeError(f"`every_n_epochs` must be an integer >= 1, got {every_n_epochs!r}.")
        if every_n_epochs < 1:
            raise ValueError(f"`every_n_epochs` must be an integer >= 1, got {every_n_epochs!r}.")
        for name, flag in (
            ("before_validation", before_validation),
            ("on_train_end", on_train_end),
            ("verbose", verbose),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}` must be a bool, got {flag!r}.")
        if dataloader is not None and not isinstance(dataloader, DataLoader) and not callable(dataloader):
            raise TypeError(
                f"`dataloader` must be None, a DataLoader or a callable returning batches, got {dataloader!r}."
            )
        if forward_fn is not None and not callable(forward_fn):
            raise TypeError(f"`forward_fn` must be None or callable as forward_fn(module, batch), got {forward_fn!r}.")
        check_choice("mode", mode, MODES)
        check_choice("dropout", dropout, DROPOUT_MODES)
        check_choice("nonfinite", nonfinite, NONFINITE_ACTIONS)
        if not isinstance(log_prefix, str) or not log_prefix:
            raise ValueError(f"`log_prefix` must be a non-empty string, got {log_prefix!r}.")
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.before_validation = before_validation
        self.at_train_end = on_train_end
        self.dataloader = dataloader
        self.forward_fn = forward_fn
        self.mode: Mode = mode
        self.dropout: DropoutMode = dropout
        self.nonfinite: NonFinite = nonfinite
        self.log_prefix = log_prefix
        self.verbose = verbose
        #: How many recalibrations ran (restored on resume).
        self.recalibrations = 0
        #: ``(epoch, global_step)`` of the last recalibration (restored on resume).
        self.last_run: tuple[int, int] | None = None
        #: The report of the last recalibration in this process.
        self.last_report: RecalibrationReport | None = None
        self._train_flags: dict[str, bool] | None = None

    @property
    @override
    def state_key(self) -> str:
        key = {
            "num_samples": self.num_samples,
            "mode": self.mode,
            "log_prefix": self.log_prefix,
        }
        return f"{type(self).__qualname__}{key!r}"

    # ------------------------------------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        averaging = tuple(
            cls
            for cls in (
                getattr(pl.callbacks, "StochasticWeightAveraging", None),
                getattr(pl.callbacks, "WeightAveraging", None),
            )
            if cls is not None
        )
        callbacks = list(trainer.callbacks)
        mine = next((i for i, cb in enumerate(callbacks) if cb is self), len(callbacks))
        late = [type(cb).__name__ for cb in callbacks[mine + 1 :] if isinstance(cb, averaging)]
        if late:
            raise ValueError(
                f"BNRecalibration must come after {', '.join(late)} in `callbacks=[...]` so that it "
                "recalibrates the averaged weights (hooks run in list order); move it after them."
            )

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning's StochasticWeightAveraging runs one extra epoch to refresh BatchNorm: it copies the averaged
        # weights into the model and skips backward and zero_grad, but the optimizer still steps once at the end of
        # that epoch, with the gradients left over from the last real step (plus momentum and weight decay), which
        # moves the weights off the average. Dropping the gradients makes that step a no-op (optimizers skip
        # parameters whose .grad is None), so the final model is the average we then recalibrate.
        if _in_swa_bn_update_epoch(trainer):
            pl_module.zero_grad(set_to_none=True)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # The validation loop puts the model in eval mode before our hook runs: remember the training modes
        # (which BatchNorm layers are trained, which are frozen) once per epoch.
        if batch_idx == 0 or self._train_flags is None:
            self._train_flags = {name: module.training for name, module in pl_module.named_modules()}

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.before_validation or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        self.recalibrate(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_train_end:
            self.recalibrate(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"recalibrations": self.recalibrations, "last_run": self.last_run}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.recalibrations = int(state_dict.get("recalibrations", self.recalibrations))
        last = state_dict.get("last_run", self.last_run)
        self.last_run = (int(last[0]), int(last[1])) if last is not None else None

    # ------------------------------------------------------------------------------------------------- work

    def recalibrate(self, trainer: Trainer, pl_module: LightningModule) -> RecalibrationReport:
        """Recalibrate ``pl_module`` now (on every process) and log the result; returns the report."""
        loader = self._source(trainer)
        length = _loader_length(loader)
        if length == 0:
            raise ValueError("BNRecalibration: the dataloader is empty; there is nothing to recalibrate from.")
        if length is None and self.num_samples is None:
            raise ValueError(
                "BNRecalibration: the dataloader has no length (it may be infinite) and `num_samples` is "
                "None; set `num_samples` to bound the recalibration."
            )
        batches = _TransferredBatches(loader, lambda batch: self._transfer(batch, trainer, pl_module))
        current = {module: module.training for module in pl_module.modules()}
        self._apply_train_flags(pl_module)
        try:
            with trainer.precision_plugin.forward_context():
                report = recalibrate_bn(
                    pl_module,
                    batches,
                    num_samples=self.num_samples,
                    forward_fn=self._forward_fn(pl_module),
                    mode=self.mode,
                    dropout=self.dropout,
                    nonfinite=self.nonfinite,
                )
        finally:
            for module, flag in current.items():
                module.training = flag
        self.recalibrations += 1
        self.last_run = (trainer.current_epoch, trainer.global_step)
        self.last_report = report
        self._log(trainer, report)
        return report

    def _source(self, trainer: Trainer) -> Iterable[Any]:
        if self.dataloader is None:
            loaders = trainer.train_dataloader
            if loaders is None:
                raise RuntimeError(
                    "BNRecalibration: the trainer has no train dataloader at this point; pass `dataloader=`."
                )
            if isinstance(loaders, Mapping) or (
                isinstance(loaders, (list, tuple)) and loaders and all(isinstance(x, DataLoader) for x in loaders)
            ):
                first = next(iter(loaders.values())) if isinstance(loaders, Mapping) else loaders[0]
                rank_zero_warn("BNRecalibration: several train dataloaders; using the first. Pass `dataloader=`.")
                loaders = first
            loader: Iterable[Any] = loaders
        elif isinstance(self.dataloader, DataLoader):
            loader = self.dataloader
        else:
            loader = self.dataloader()
            if not isinstance(loader, Iterable):
                raise TypeError(
                    f"BNRecalibration: `dataloader()` must return an iterable of batches, got {type(loader).__name__}."
                )
        return _without_persistent_workers(loader) if isinstance(loader, DataLoader) else loader

    def _transfer(self, batch: Any, trainer: Trainer, pl_module: LightningModule) -> Any:
        datamodule = getattr(trainer, "datamodule", None)
        for hook in _TRANSFER_HOOKS:
            owner: Any = pl_module
            if isinstance(datamodule, LightningDataModule) and is_overridden(hook, datamodule, LightningDataModule):
                owner = datamodule
            if hook == "transfer_batch_to_device":
                batch = owner.transfer_batch_to_device(batch, pl_module.device, 0)
            else:
                batch = getattr(owner, hook)(batch, 0)
        return batch

    def _forward_fn(self, pl_module: LightningModule) -> ForwardFn | None:
        if self.forward_fn is not None:
            return self.forward_fn
        step = getattr(pl_module, STEP_METHOD, None)
        if callable(step):
            return lambda module, batch: step(batch)
        return None

    def _apply_train_flags(self, pl_module: nn.Module) -> None:
        if self._train_flags is None:
            rank_zero_warn(
                "BNRecalibration: no training batch seen yet in this run; treating every module as in train mode."
            )
            pl_module.train()
            return
        for name, module in pl_module.named_modules():
            flag = self._train_flags.get(name)
            if flag is not None:
                module.training = flag

    def _log(self, trainer: Trainer, report: RecalibrationReport) -> None:
        mean_shift, var_shift = report.max_shift()
        samples = float(report.num_samples) if report.num_samples is not None else float("nan")
        metrics = {
            f"{self.log_prefix}/samples": samples,
            f"{self.log_prefix}/mean_shift": mean_shift,
            f"{self.log_prefix}/var_shift": var_shift,
        }
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        if self.verbose:
            rank_zero_info(
                f"BNRecalibration: {len(report.layers)} layer(s) from {report.num_samples} samples "
                f"({report.num_batches} batches, {report.passes} pass(es)); largest shift: mean "
                f"{mean_shift:.4g}, var {var_shift:.4g}."
            )


__all__ = ["STEP_METHOD", "BNRecalibration"]
