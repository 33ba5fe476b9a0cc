"""``BNRecalibration``: exact BatchNorm statistics before every validation, at the end of training, and (when asked)
before ``Trainer.test`` and ``Trainer.predict``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_bnsgd._compat import (
    Callback,
    LightningModule,
    Trainer,
    index_wrapped_batch_sampler,
    logging_step,
    namespace_of,
    prepare_train_dataloader,
    request_train_dataloaders,
    skipping_backward,
)
from lightning_bnsgd._validation import check_bool, check_choice, check_int, check_str
from lightning_bnsgd.bn.batches import batch_size_of, default_forward, length_or_none
from lightning_bnsgd.bn.distributed import agree_on_failure, world_size
from lightning_bnsgd.bn.inspect import batchnorm_layers
from lightning_bnsgd.bn.passes import UncountableBatches
from lightning_bnsgd.bn.recalibrate import (
    DropoutMode,
    ForwardFn,
    Mode,
    NonFinite,
    RecalibrationReport,
    all_frozen,
    recalibrate_bn,
    validate_recalibration_args,
)
from lightning_bnsgd.callbacks._batches import (
    TransferredBatches,
    debug_batch_limit,
    default_forward_accepts,
    first_batch,
    loader_generators,
    preserved_rng,
    rebuilt_loader,
    takes_two_positional,
    transfer_batch,
    trial_forward,
    without_persistent_workers,
)
from lightning_bnsgd.callbacks._own_forwards import own_forwards

#: The method a LightningModule may define to run one recalibration forward: ``bn_recalibration_step(batch)``.
STEP_METHOD = "bn_recalibration_step"
_OWNER = "BNRecalibration"

#: Where ``before_test`` takes its batches from: nowhere (``"off"``), the training data, or the test data.
BeforeTest = Literal["off", "train_data", "test_data"]
#: Where ``before_predict`` takes its batches from: nowhere (``"off"``), the training data, or the predict data.
BeforePredict = Literal["off", "train_data", "predict_data"]
BEFORE_TEST = ("off", "train_data", "test_data")
BEFORE_PREDICT = ("off", "train_data", "predict_data")
#: `RecalibrationReport.data` of each source.
_TRAIN_LOADER = "train data (the train dataloader)"
_OWN_LOADER = "the callback's `dataloader`"
_STAGE_TRAIN_OWN = "train data (the callback's `dataloader`)"
_STAGE_DATA = {
    "test": "test data (the test dataloader, labels unused)",
    "predict": "predict data (the predict dataloader)",
}


def _averaging_callbacks(trainer: Trainer) -> tuple[type, ...]:
    """Lightning's weight-averaging callback classes, from the Trainer's own namespace."""
    callbacks = namespace_of(trainer).callbacks
    names = ("StochasticWeightAveraging", "WeightAveraging")
    return tuple(cls for cls in (getattr(callbacks, n, None) for n in names) if isinstance(cls, type))


def _in_swa_bn_update_epoch(trainer: Trainer) -> bool:
    """True in the extra BatchNorm-update epoch of Lightning's ``StochasticWeightAveraging`` (backward skipped)."""
    swa = getattr(namespace_of(trainer).callbacks, "StochasticWeightAveraging", None)
    if swa is None or not any(isinstance(cb, swa) for cb in trainer.callbacks):
        return False
    return skipping_backward(trainer)


_NO_SIZE_HINT = "Set `num_samples=None` to use every batch, or give batches that hold such a tensor."


def _uncountable(num_samples: int | None, batch_type: str | None) -> TypeError:
    got = f"a batch of type {batch_type}" if batch_type is not None else "a batch"
    return TypeError(
        f"{_OWNER}: `num_samples={num_samples}` needs batches with a tensor whose leading dimension is the batch "
        f"size, but {got} has none. {_NO_SIZE_HINT}"
    )


def _renamed(err: Exception, num_samples: int | None) -> Exception:
    """``err`` with its message naming the class the user wrote (and its arguments) instead of the function it
    calls; ``err`` itself when there is nothing to rename. Notes (the rank that raised it) are kept."""
    notes = getattr(err, "__notes__", None)
    if isinstance(notes, list):  # e.g. the rank that raised it, noted by recalibrate_bn
        notes[:] = [
            f"{_OWNER}: {n[len('recalibrate_bn: ') :]}" if n.startswith("recalibrate_bn: ") else n for n in notes
        ]
    if isinstance(err, UncountableBatches):
        renamed: Exception = _uncountable(num_samples, err.batch_type)
    else:
        message = str(err).replace(UncountableBatches.HINT, _NO_SIZE_HINT)
        for prefix in ("recalibrate_bn: ", "recalibrate_bn "):
            if message.startswith(prefix):
                message = f"{_OWNER}{': ' if prefix.endswith(': ') else ' '}{message[len(prefix) :]}"
                break
        if message == str(err):
            return err
        try:
            renamed = type(err)(message)
        except Exception:  # an exception class whose constructor takes other arguments
            return err
    for note in getattr(err, "__notes__", []):
        renamed.add_note(note)
    return renamed


def _check_callback_args(
    every_n_epochs: object,
    before_validation: object,
    at_train_end: object,
    dataloader: object,
    forward_fn: object,
    before_test: object = "off",
    before_predict: object = "off",
) -> None:
    """The arguments only the callback has (``recalibrate_bn``'s own are checked by `validate_recalibration_args`).

    Examples:
        >>> _check_callback_args(1, False, False, None, None, before_test="test_data")  # acts only before test
        >>> _check_callback_args(1, True, True, None, None, before_test="test")
        Traceback (most recent call last):
        ...
        ValueError: BNRecalibration: `before_test` must be one of ('off', 'train_data', 'test_data'), got 'test'.
    """
    check_int("every_n_epochs", every_n_epochs, owner=_OWNER)
    check_bool("before_validation", before_validation, owner=_OWNER)
    check_bool("at_train_end", at_train_end, owner=_OWNER)
    check_choice("before_test", before_test, BEFORE_TEST, owner=_OWNER)
    check_choice("before_predict", before_predict, BEFORE_PREDICT, owner=_OWNER)
    if not before_validation and not at_train_end and before_test == "off" and before_predict == "off":
        raise ValueError(
            f"{_OWNER}: `before_validation=False` and `at_train_end=False`, with `before_test='off'` and "
            "`before_predict='off'`, leave it no moment to recalibrate: it would never act. Set one of them (e.g. "
            "`before_validation=True`, or `before_test='train_data'` for a callback meant only for testing), or "
            "remove the callback."
        )
    if dataloader is not None and not isinstance(dataloader, DataLoader) and not callable(dataloader):
        raise TypeError(
            f"{_OWNER}: `dataloader` must be None, a DataLoader or a callable returning batches, got {dataloader!r}."
        )
    if forward_fn is not None and not takes_two_positional(forward_fn):  # type: ignore[arg-type]
        raise TypeError(
            f"{_OWNER}: `forward_fn` is called as `forward_fn(module, batch)` (two positional arguments), but "
            f"{forward_fn!r} cannot take them. For a forward of the batch alone, define "
            f"`{STEP_METHOD}(self, batch)` on your LightningModule instead."
        )


_STATE_OWNER = f"{_OWNER} checkpoint state"
_STATE_KEYS = ("recalibrations", "last_run")


def _checked_state(state: object) -> tuple[int, tuple[int, int] | None]:
    """``(recalibrations, last_run)`` from a checkpoint's callback state, checked: a wrong type or value (a
    corrupted or foreign state) is an error naming the key; a missing key falls back to a fresh run's value with a
    warning.

    Examples:
        >>> _checked_state({"recalibrations": 2, "last_run": [1, 8]})
        (2, (1, 8))
        >>> _checked_state({"recalibrations": -7, "last_run": None})
        Traceback (most recent call last):
        ...
        ValueError: BNRecalibration checkpoint state: `recalibrations` must be an integer >= 0, got -7.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"{_STATE_OWNER} must be a dict with keys {list(_STATE_KEYS)}, got {type(state).__name__}.")
    if not any(key in state for key in _STATE_KEYS):
        raise ValueError(
            f"{_STATE_OWNER} has none of the keys {list(_STATE_KEYS)} (it has {sorted(map(str, state))}): it is "
            "not a BNRecalibration state."
        )
    missing = [key for key in _STATE_KEYS if key not in state]
    unknown = sorted(str(key) for key in state if key not in _STATE_KEYS)
    parts = [f"missing keys {missing} (a fresh run's values are used)"] if missing else []
    parts += [f"unknown keys {unknown} (ignored)"] if unknown else []
    if parts:
        rank_zero_warn(
            f"{_STATE_OWNER}: {' and '.join(parts)}; the checkpoint was written by another version or edited."
        )
    count = check_int("recalibrations", state.get("recalibrations", 0), minimum=0, owner=_STATE_OWNER)
    last = state.get("last_run")
    if last is None:
        return count, None
    if not isinstance(last, (tuple, list)) or len(last) != 2:
        raise TypeError(f"{_STATE_OWNER}: `last_run` must be None or a pair (epoch, global_step), got {last!r}.")
    epoch = check_int("last_run[0] (epoch)", last[0], minimum=0, owner=_STATE_OWNER)
    step = check_int("last_run[1] (global_step)", last[1], minimum=0, owner=_STATE_OWNER)
    return count, (epoch, step)


def _weights_version(module: nn.Module) -> tuple[int, ...]:
    """A fingerprint that changes whenever a parameter is modified in place (optimizer steps, weight averaging)."""
    return tuple(p._version for p in module.parameters())


def _train_mode_flags(module: nn.Module) -> dict[str, bool]:
    """Each submodule's ``training`` flag after ``module.train()`` (a user's override of ``train()`` included), with
    every module's own flag put back: the modes a training step would run in, read outside ``fit``.

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).eval()
        >>> _train_mode_flags(net), net.training
        ({'': True, '0': True, '1': True}, False)
    """
    current = [(m, m.training) for m in module.modules()]
    try:
        module.train()
        return {name: m.training for name, m in module.named_modules()}
    finally:
        for m, flag in current:
            m.training = flag


_Saved = list[tuple[nn.Module, dict[str, Tensor]]]


def _saved_statistics(module: nn.Module) -> dict[str, tuple[nn.Module, dict[str, Tensor]]]:
    """A copy of every BatchNorm layer's running statistics (and its ``num_batches_tracked``), by layer name."""
    saved: dict[str, tuple[nn.Module, dict[str, Tensor]]] = {}
    for name, layer in batchnorm_layers(module):
        buffers = {
            key: value.detach().clone()
            for key in ("running_mean", "running_var", "num_batches_tracked")
            if isinstance(value := getattr(layer, key, None), Tensor)
        }
        if buffers:
            saved[name] = (layer, buffers)
    return saved


def _put_back(saved: _Saved) -> None:
    """Copy the saved buffers back into the layers' own (current) buffers, in place, on their current devices.

    Examples:
        >>> bn = nn.BatchNorm1d(2)
        >>> saved = list(_saved_statistics(nn.Sequential(bn)).values())
        >>> bn.running_mean += 3.0
        >>> _put_back(saved)
        >>> bn.running_mean.tolist()
        [0.0, 0.0]
    """
    with torch.no_grad():
        for layer, buffers in saved:
            for key, value in buffers.items():
                getattr(layer, key).copy_(value)


def _first_loader(loaders: Any, what: str, hint: str = "") -> Any:
    """The first of several dataloaders (a dict, or a list/tuple of DataLoaders), with a warning ending in
    ``hint``; a one-item collection gives its item, anything else is ``loaders`` itself.

    Examples:
        >>> loader = DataLoader(range(4))
        >>> _first_loader({"a": loader}, "test") is loader, _first_loader([1, 2], "train")
        (True, [1, 2])
    """
    if isinstance(loaders, Mapping) or (
        isinstance(loaders, (list, tuple)) and loaders and all(isinstance(x, DataLoader) for x in loaders)
    ):
        if len(loaders) > 1:
            rank_zero_warn(f"{_OWNER}: several {what} dataloaders; recalibrating from the first.{hint}")
        return next(iter(loaders.values())) if isinstance(loaders, Mapping) else loaders[0]
    return loaders


def _idle_message(stage: str) -> str:
    """The one warning of a callback that does nothing in ``Trainer.<stage>`` (outside ``fit``)."""
    if stage not in ("test", "predict"):
        return (
            f"{_OWNER} recalibrates only during `fit`: in `Trainer.{stage}` it does nothing, and the model's "
            "BatchNorm statistics are used as they are (to recalibrate a loaded model, call "
            "`lightning_bnsgd.recalibrate_bn` before it; before test and predict, see `before_test` and "
            "`before_predict`)."
        )
    return (
        f"{_OWNER} does nothing in `Trainer.{stage}` with `before_{stage}='off'` (the default): the model's BatchNorm "
        f"statistics are used as they are. Set `before_{stage}='train_data'` to recalibrate them from the training "
        f"data first (precise BN, for a model trained without it), or `before_{stage}='{stage}_data'` to adapt them "
        f"to the {stage} data (labels unused)."
    )


class BNRecalibration(Callback):
    """Recompute BatchNorm population statistics exactly (``recalibrate_bn``) at the right moments of ``fit``, and
    before ``test`` and ``predict`` when asked.

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
    that were in eval mode during training (frozen) are left alone; while every one is frozen, each recalibration is
    skipped (one warning per fit) and it recalibrates again once one trains. The forward is, in this order of
    preference, ``forward_fn(module, batch)``, the module's ``bn_recalibration_step(batch)`` if it defines
    one, or ``module(batch[0])`` (``module(batch)`` for a tensor batch).

    What can be checked early is: the arguments in the constructor; ``dataloader`` at ``setup``; at the first
    training batch, whether the batches can be fed and counted, and for ``dataloader`` a trial forward of its first
    batch (no gradient, BatchNorm layers in eval mode: nothing changes). Under DDP each check, and every error
    during a recalibration (the user's forward included), is agreed by all ranks: an error on one rank is raised on
    every rank, naming that rank (``RankFailure`` on the others), so no rank waits in a collective.

    Before ``Trainer.test`` and ``Trainer.predict`` it recalibrates only when asked (``before_test``,
    ``before_predict``), in ``on_test_start`` / ``on_predict_start``: after a ``ckpt_path`` checkpoint is restored
    and the dataloaders are built, before the first batch. ``"train_data"`` reads ``dataloader`` if given, else
    the ``train_dataloader()`` of the DataModule or LightningModule, requested and sharded as ``fit`` would (precise
    BN for a model trained without it); ``"test_data"`` / ``"predict_data"`` read the stage's own (first)
    dataloader, labels unused (AdaBN, Li et al. 2016: statistics adapted to a shifted test distribution). The
    training modes are those ``pl_module.train()`` sets (layers it leaves in eval mode are frozen). Everything else
    (exactness, DDP, random states, errors) is as in ``fit``. It prints from rank zero which data the statistics came
    from, and when the stage ends, or fails, it puts back the statistics the model had, unless
    ``keep_stage_statistics=True``; these runs are not counted in ``recalibrations``. In ``validate``, and in a test
    or predict run it was not asked to act in, it does nothing and says so once.

    Logs ``<log_prefix>/samples``, ``<log_prefix>/mean_shift`` and ``<log_prefix>/var_shift`` (the largest
    shift over the layers, see ``LayerShift``) to every logger, from rank zero, at the step Lightning logs the
    module's own ``self.log`` metrics of that moment (before validation: the step of that validation's metrics);
    before test and predict, ``<log_prefix>/test/...`` and ``<log_prefix>/predict/...``.

    Args:
        num_samples: samples per recalibration, counted over all processes (``None``: the whole dataloader).
            Wu & Johnson (2021) found 10^3 to 10^4 samples enough.
        every_n_epochs: recalibrate before validation every ``n`` epochs.
        before_validation: recalibrate in ``on_validation_epoch_start``.
        at_train_end: recalibrate in ``on_train_end`` (skipped when the weights have not changed since the last
            recalibration, e.g. right after the last validation already recalibrated them).
        dataloader: a DataLoader, or a callable returning an iterable of batches (called once at ``setup`` to
            check it, at the first training batch and at each use); ``None``: the trainer's train dataloader.
        forward_fn: ``forward_fn(module, batch)`` runs one forward (the return value is ignored).
        mode: ``"train"`` (one pass, precise BN) or ``"sequential"`` (layer by layer, inference semantics).
        dropout: ``"eval"`` (dropout and other non-BN modules in eval mode) or ``"train"`` (training modes).
        nonfinite: ``"raise"`` (NaN/Inf statistics are an error, nothing changed) or ``"skip"`` those batches.
        log_prefix: prefix of the logged metric names (give two instances different prefixes).
        verbose: also print a one-line summary of each recalibration from rank zero.
        before_test: recalibrate in ``on_test_start`` from ``"train_data"`` (``dataloader`` if given, else the train
            dataloader) or ``"test_data"`` (the test dataloader, labels unused); ``"off"``: not before test.
        before_predict: the same before predict: ``"off"``, ``"train_data"`` or ``"predict_data"``.
        keep_stage_statistics: keep the statistics of a recalibration before test or predict in the model after
            that run; by default the statistics the model had are put back when it ends (or fails), so a later
            ``fit``, ``save_checkpoint`` or test sees the model as it was.

    Examples:
        >>> from pytorch_lightning import Trainer  # or: from lightning.pytorch import Trainer
        >>> callback = BNRecalibration(num_samples=2048, mode="sequential")
        >>> callback.state_key
        "BNRecalibration{'num_samples': 2048, 'mode': 'sequential', 'log_prefix': 'bn_recalibration'}"
        >>> trainer = Trainer(callbacks=[callback], logger=False, enable_progress_bar=False)
        >>> adapting = BNRecalibration(before_validation=False, at_train_end=False, before_test="test_data")
    """

    def __init__(
        self,
        num_samples: int | None = 4096,
        every_n_epochs: int = 1,
        before_validation: bool = True,
        at_train_end: bool = True,
        dataloader: DataLoader | Callable[[], Iterable[Any]] | None = None,
        forward_fn: ForwardFn | None = None,
        mode: Mode = "train",
        dropout: DropoutMode = "eval",
        nonfinite: NonFinite = "raise",
        log_prefix: str = "bn_recalibration",
        verbose: bool = False,
        before_test: BeforeTest = "off",
        before_predict: BeforePredict = "off",
        keep_stage_statistics: bool = False,
    ) -> None:
        super().__init__()
        validate_recalibration_args(
            _OWNER, num_samples=num_samples, mode=mode, dropout=dropout, nonfinite=nonfinite, forward_fn=forward_fn
        )
        _check_callback_args(
            every_n_epochs, before_validation, at_train_end, dataloader, forward_fn, before_test, before_predict
        )
        check_bool("verbose", verbose, owner=_OWNER)
        check_bool("keep_stage_statistics", keep_stage_statistics, owner=_OWNER)
        check_str("log_prefix", log_prefix, owner=_OWNER)
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.before_validation = before_validation
        self.at_train_end = at_train_end
        self.dataloader = dataloader
        self.forward_fn = forward_fn
        self.mode: Mode = mode
        self.dropout: DropoutMode = dropout
        self.nonfinite: NonFinite = nonfinite
        self.log_prefix = log_prefix
        self.verbose = verbose
        self.before_test: BeforeTest = before_test
        self.before_predict: BeforePredict = before_predict
        self.keep_stage_statistics = keep_stage_statistics
        #: How many recalibrations ran in ``fit`` (restored on resume; those before test and predict not counted).
        self.recalibrations = 0
        #: ``(epoch, global_step)`` of the last recalibration (restored on resume).
        self.last_run: tuple[int, int] | None = None
        #: The report of the last recalibration in this process (``fit``, test or predict; see its ``data``).
        self.last_report: RecalibrationReport | None = None
        self._stage_saved: _Saved | None = None
        self._train_flags: dict[str, bool] | None = None
        self._batch_checked = False
        self._calibrated_version: tuple[int, ...] | None = None
        self._quiet_outside_fit = False
        self._warned_frozen = False

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
            name = str(getattr(stage, "value", stage))
            if self._stage_source(name) == "off" and not self._quiet_outside_fit:
                self._quiet_outside_fit = True
                rank_zero_warn(_idle_message(name))
            return
        self._quiet_outside_fit = True  # after a fit, its model carries the statistics this callback computed
        self._batch_checked = False
        self._calibrated_version = None
        self._warned_frozen = False
        self._check_it_can_act(trainer)
        if self.dataloader is not None:
            self._agreed_source(trainer)  # its type and length, known now on every rank
        averaging = _averaging_callbacks(trainer)
        callbacks = list(trainer.callbacks)
        mine = next((i for i, cb in enumerate(callbacks) if cb is self), len(callbacks))
        late = [type(cb).__name__ for cb in callbacks[mine + 1 :] if isinstance(cb, averaging)]
        if late:
            raise ValueError(
                f"{_OWNER} must come after {', '.join(late)} in `callbacks=[...]` so that it "
                "recalibrates the averaged weights (hooks run in list order); move it after them."
            )

    def _stage_source(self, stage: str) -> str:
        """Its ``before_test`` / ``before_predict`` for that stage (``"off"`` for any other)."""
        return {"test": self.before_test, "predict": self.before_predict}.get(stage, "off")

    def _acts_in_fit(self) -> bool:
        return self.before_validation or self.at_train_end

    def _check_it_can_act(self, trainer: Trainer) -> None:
        """Refuse a fit in which it would never recalibrate (only before validation, and no validation comes). A
        callback asked to act only before test or predict does nothing in fit, by its configuration."""
        if self.at_train_end or not self.before_validation:
            return
        max_epochs = trainer.max_epochs
        if isinstance(max_epochs, int) and 0 <= max_epochs < self.every_n_epochs:
            raise ValueError(
                f"{_OWNER}: `every_n_epochs={self.every_n_epochs}` is larger than the Trainer's "
                f"`max_epochs={max_epochs}` and `at_train_end=False`: it would never recalibrate in this fit. Lower "
                "`every_n_epochs`, or set `at_train_end=True`."
            )
        if trainer.limit_val_batches == 0:
            raise ValueError(
                f"{_OWNER}: the Trainer runs no validation (`limit_val_batches=0`) and `at_train_end=False`: it "
                "would never recalibrate in this fit. Set `at_train_end=True`."
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
        if not self._batch_checked and self._acts_in_fit():
            self._batch_checked = True
            error = None
            try:
                self._check_first_batch(trainer, pl_module, batch)
            except Exception as err:
                error = err
            agree_on_failure([], error, _OWNER)  # every rank raises if one did

    def _check_first_batch(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        """Fail at the first training batch, not after an epoch, when recalibration could not run its batches: the
        default forward cannot take them, a sample budget cannot count them, or (for batches from ``dataloader``,
        which training has not fed to the model) a trial forward of the first one fails."""
        forward_fn = self._forward_fn(pl_module)
        origin = "a training batch"
        if self.dataloader is not None:
            loader = self._source(trainer)
            batch = first_batch(loader)
            if batch is None:
                return  # nothing on this rank: the others' batches are used (all empty is refused at setup)
            with preserved_rng(loader_generators(loader)):
                batch = transfer_batch(batch, trainer, pl_module)
            origin = "the first batch of `dataloader`"
        if forward_fn is None and not default_forward_accepts(batch):
            raise TypeError(
                f"{_OWNER} cannot feed {origin} (of type {type(batch).__name__}) to the model: its default "
                "forward runs `module(batch)` for a tensor and `module(batch[0])` for a tuple or list. Pass "
                "`BNRecalibration(forward_fn=lambda module, batch: module(batch['x']))` (with your batch's key), or "
                f"define `{STEP_METHOD}(self, batch)` on your LightningModule."
            )
        if self.num_samples is not None and batch_size_of(batch) is None:
            raise _uncountable(self.num_samples, type(batch).__name__)
        if self.dataloader is None:
            return  # the training step feeds these batches to the model itself
        forward = forward_fn if forward_fn is not None else default_forward
        try:
            trial_forward(pl_module, batch, forward, self.dropout, trainer.precision_plugin.forward_context)
        except Exception as err:
            kind = next((k for k in (TypeError, ValueError) if isinstance(err, k)), RuntimeError)
            raise kind(
                f"{_OWNER}: a trial forward of {origin} (of type {type(batch).__name__}) failed at the first "
                f"training batch, so every recalibration would fail: {type(err).__name__}: {err}"
            ) from err

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.before_validation or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        self.recalibrate(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.at_train_end:
            return
        if self._calibrated_version is not None and self._calibrated_version == _weights_version(pl_module):
            return  # the last recalibration already saw these exact weights (e.g. the last validation's)
        self.recalibrate(trainer, pl_module)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.before_test != "off":
            self._before_stage(trainer, pl_module, "test", self.before_test)

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.before_predict != "off":
            self._before_stage(trainer, pl_module, "predict", self.before_predict)

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_stage_statistics()

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_stage_statistics()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_stage_statistics()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore_stage_statistics()  # nothing left by then, unless an end hook was skipped

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"recalibrations": self.recalibrations, "last_run": self.last_run}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.recalibrations, self.last_run = _checked_state(state_dict)

    # ------------------------------------------------------------------------------------------------- work

    def recalibrate(self, trainer: Trainer, pl_module: LightningModule) -> RecalibrationReport:
        """Recalibrate ``pl_module`` now (on every process) and log the result; returns the report.

        The random states it draws from (a DataLoader iterator draws shuffling and worker seeds) are restored
        afterwards, so the training run goes on exactly as it would have without it.

        When every BatchNorm layer was in eval mode during training (frozen), there is nothing to recalibrate: it
        does nothing (on every process alike) and returns a report that lists them as skipped, with one warning per
        fit; it recalibrates again as soon as some layer trains (e.g. after ``BackboneFinetuning`` unfreezes it).
        """
        data = _OWN_LOADER if self.dataloader is not None else _TRAIN_LOADER
        report, frozen = self._run(trainer, pl_module, self._train_flags, lambda: self._fit_source(trainer), data)
        if frozen:
            return self._skip_frozen(trainer, frozen)
        self.recalibrations += 1
        self.last_run = (trainer.current_epoch, trainer.global_step)
        self.last_report = report
        self._calibrated_version = _weights_version(pl_module)
        self._log(trainer, report, self.log_prefix)
        return report

    def _run(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        flags: dict[str, bool] | None,
        read: Callable[[], tuple[Iterable[Any], int | None]],
        data: str,
    ) -> tuple[RecalibrationReport, list[str]]:
        """One recalibration of ``pl_module`` (on every process) with the modules in the training modes ``flags``,
        from the batches ``read()`` gives (and how many of them at most); every module's mode is put back.

        Returns the report (its ``data`` set to ``data``) and an empty list, or, when every BatchNorm layer is frozen
        on every process, an empty report and their names: then nothing changed.
        """
        current = {module: module.training for module in pl_module.modules()}
        try:
            self._apply_train_flags(pl_module, flags)
            frozen = all_frozen(pl_module)
            (loader, limit), skip = self._agreed_source(trainer, frozen=bool(frozen), read=read)
            if skip:
                return RecalibrationReport(mode=self.mode, data=data), frozen
            batches = TransferredBatches(loader, lambda batch: transfer_batch(batch, trainer, pl_module), limit)
            with preserved_rng(loader_generators(loader)), trainer.precision_plugin.forward_context(), own_forwards():
                report = recalibrate_bn(
                    pl_module,
                    batches,
                    num_samples=self.num_samples,
                    forward_fn=self._forward_fn(pl_module),
                    mode=self.mode,
                    dropout=self.dropout,
                    nonfinite=self.nonfinite,
                )
        except Exception as err:
            renamed = _renamed(err, self.num_samples)
            if renamed is err:
                raise
            raise renamed from err
        finally:
            for module, flag in current.items():
                module.training = flag
        report.data = data
        return report, []

    def _before_stage(
        self, trainer: Trainer, pl_module: LightningModule, stage: str, source: str
    ) -> RecalibrationReport:
        """Recalibrate before the test or predict run ``stage`` from ``source`` (``"train_data"`` or the stage's own
        data), in the training modes ``pl_module.train()`` sets; remember what to put back when the stage ends."""
        self._restore_stage_statistics()  # a previous stage's, had its end hook been skipped
        if source == "train_data":
            data = _STAGE_TRAIN_OWN if self.dataloader is not None else _TRAIN_LOADER

            def read() -> tuple[Iterable[Any], int | None]:
                return self._stage_train_source(trainer, stage)

        else:
            data = _STAGE_DATA[stage]

            def read() -> tuple[Iterable[Any], int | None]:
                return self._stage_own_source(trainer, stage)

        with preserved_rng():  # the dataloader hooks and `train()` may draw too: a later fit must not see it
            flags = _train_mode_flags(pl_module)
            saved = _saved_statistics(pl_module)
            report, frozen = self._run(trainer, pl_module, flags, read, data)
        if frozen:
            rank_zero_warn(
                f"{_OWNER}: before {stage}, every BatchNorm layer that tracks running statistics is in eval mode after "
                f"`{type(pl_module).__name__}.train()` (frozen: {frozen}), and frozen layers are left alone by "
                f"design: nothing was recalibrated, the {stage} uses the model's own statistics. To recalibrate them, "
                "leave those layers in train mode in `train()`."
            )
            return report
        if not self.keep_stage_statistics:
            self._stage_saved = [saved[name] for name in report.layers if name in saved]
        self.last_report = report
        self._log(trainer, report, f"{self.log_prefix}/{stage}")
        if report.layers:  # else recalibrate_bn warned that the model has no BatchNorm layer to recalibrate
            rank_zero_info(_stage_line(stage, report, self.keep_stage_statistics))
        return report

    def _restore_stage_statistics(self) -> None:
        """Put back the statistics a recalibration before test or predict replaced (once; no-op when none)."""
        saved, self._stage_saved = self._stage_saved, None
        if saved:
            _put_back(saved)

    def _fit_source(self, trainer: Trainer) -> tuple[Iterable[Any], int | None]:
        return self._source(trainer), debug_batch_limit(trainer, from_trainer_loader=self.dataloader is None)

    def _stage_train_source(self, trainer: Trainer, stage: str) -> tuple[Iterable[Any], int | None]:
        """``before_<stage>="train_data"``: ``dataloader`` if given, else the run's train dataloader, requested and
        prepared as ``fit`` would (its own shard on each process under DDP), cut to ``limit_train_batches``."""
        if self.dataloader is not None:
            return self._source(trainer), debug_batch_limit(trainer, from_trainer_loader=False)
        setting = f"`before_{stage}='train_data'`"
        try:
            loaders = request_train_dataloaders(trainer)
        except Exception as err:
            message = (
                f"{_OWNER}: {setting} requests the train dataloader, and `train_dataloader()` raised "
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
                f"{_OWNER}: {setting}, but this run has no train dataloader (its DataModule, or its "
                f"LightningModule, defines no `train_dataloader()`); pass `dataloader=`, or use "
                f"`before_{stage}='{stage}_data'`."
            )
        loader, limit = prepare_train_dataloader(trainer, _first_loader(loaders, "train", " Pass `dataloader=`."))
        if limit == 0:
            raise ValueError(
                f"{_OWNER}: {setting}, but the Trainer's `limit_train_batches={trainer.limit_train_batches}` "
                "leaves no batch of the train dataloader to recalibrate from."
            )
        loader = without_persistent_workers(loader) if isinstance(loader, DataLoader) else loader
        return loader, None if limit == float("inf") else int(limit)  # type: ignore[return-value]

    def _stage_own_source(self, trainer: Trainer, stage: str) -> tuple[Iterable[Any], int | None]:
        """``before_<stage>="<stage>_data"``: the stage's own (first) dataloader, as many batches as the stage
        reads (``limit_<stage>_batches``), iterated without disturbing the stage's own iterator."""
        loaders = trainer.test_dataloaders if stage == "test" else trainer.predict_dataloaders
        counts = trainer.num_test_batches if stage == "test" else trainer.num_predict_batches
        if loaders is None or not counts:
            raise RuntimeError(f"{_OWNER}: `before_{stage}='{stage}_data'`, but the trainer has no {stage} dataloader.")
        loader = _first_loader(loaders, stage)
        if not isinstance(loader, DataLoader) and iter(loader) is loader:
            raise TypeError(
                f"{_OWNER}: `before_{stage}='{stage}_data'`, but the {stage} dataloader is a one-shot iterator "
                f"({type(loader).__name__}): reading it would use up the batches the {stage} needs. Pass a "
                f"re-iterable (a DataLoader, a list), or use `before_{stage}='train_data'`."
            )
        if isinstance(loader, DataLoader):
            inner = index_wrapped_batch_sampler(loader)  # predict: an iterator of its own, shared by every iteration
            loader = rebuilt_loader(loader, inner) if inner is not None else without_persistent_workers(loader)
        limit = counts[0]
        return loader, None if limit == float("inf") else int(limit)

    def _skip_frozen(self, trainer: Trainer, frozen: list[str]) -> RecalibrationReport:
        """Nothing to recalibrate, every BatchNorm layer being frozen: warn once per fit, change nothing."""
        if not self._warned_frozen:
            self._warned_frozen = True
            rank_zero_warn(
                f"{_OWNER}: every BatchNorm layer that tracks running statistics was in eval mode during training "
                f"(frozen: {frozen}), and frozen layers are left alone by design, so there was nothing to "
                f"recalibrate in epoch {trainer.current_epoch}: skipped, statistics unchanged. It skips "
                "each recalibration while they stay frozen (this warning is shown once per fit) and recalibrates "
                "again as soon as one trains. To have their statistics recalibrated, put those layers in train "
                "mode during training (`layer.train()`, e.g. when you unfreeze them), or remove the callback."
            )
        return RecalibrationReport(
            mode=self.mode, skipped=dict.fromkeys(frozen, "eval mode (frozen)"), world_size=world_size()
        )

    def _agreed_source(
        self,
        trainer: Trainer,
        frozen: bool = False,
        read: Callable[[], tuple[Iterable[Any], int | None]] | None = None,
    ) -> tuple[tuple[Iterable[Any], int | None], bool]:
        """The batches to recalibrate from and how many at most (``read()``; default: those of ``fit``), checked on
        every rank together: an error on one rank is raised on every rank (naming it), and data that is empty on
        every rank is refused (one rank's empty shard is fine).

        ``frozen``: every BatchNorm layer of this rank's model is frozen; the same agreement tells whether they are
        on every rank (returned second: then every rank skips); ranks that disagree are an error on every rank.
        """
        loader: Iterable[Any] = ()
        limit: int | None = None
        error, empty = None, False
        try:
            loader, limit = read() if read is not None else self._fit_source(trainer)
            length = length_or_none(loader)
            if length is None and self.num_samples is None:
                raise ValueError(
                    f"{_OWNER}: the dataloader has no length (it may be infinite) and `num_samples` is "
                    "None; set `num_samples` to bound the recalibration."
                )
            empty = length == 0 or limit == 0
        except Exception as err:
            error = err
        rows = agree_on_failure([int(empty), int(frozen)], error, _OWNER)
        if all(row[0] for row in rows):
            where = " on every rank" if len(rows) > 1 else ""
            raise ValueError(f"{_OWNER}: the dataloader is empty{where}; there is nothing to recalibrate from.")
        frozen_on = [r for r, row in enumerate(rows) if row[1]]
        if frozen_on and len(frozen_on) < len(rows):
            raise ValueError(
                f"{_OWNER}: every BatchNorm layer is frozen (in eval mode during training) on rank(s) {frozen_on} "
                f"of {len(rows)} but not on the others; the ranks' models must have the same modes."
            )
        return (loader, limit), bool(frozen_on)

    def _source(self, trainer: Trainer) -> Iterable[Any]:
        if self.dataloader is None:
            loaders = trainer.train_dataloader
            if loaders is None:
                raise RuntimeError(f"{_OWNER}: the trainer has no train dataloader at this point; pass `dataloader=`.")
            loader: Iterable[Any] = _first_loader(loaders, "train", " Pass `dataloader=`.")
        elif isinstance(self.dataloader, DataLoader):
            loader = self.dataloader
        else:
            loader = self.dataloader()
            if not isinstance(loader, Iterable):
                raise TypeError(
                    f"{_OWNER}: `dataloader()` must return an iterable of batches, got {type(loader).__name__}."
                )
        return without_persistent_workers(loader) if isinstance(loader, DataLoader) else loader

    def _forward_fn(self, pl_module: LightningModule) -> ForwardFn | None:
        if self.forward_fn is not None:
            return self.forward_fn
        step = getattr(pl_module, STEP_METHOD, None)
        if callable(step):
            return lambda module, batch: step(batch)
        return None

    def _apply_train_flags(self, pl_module: nn.Module, flags: dict[str, bool] | None) -> None:
        if flags is None:
            rank_zero_warn(f"{_OWNER}: no training batch seen yet in this run; treating every module as in train mode.")
            pl_module.train()
            return
        for name, module in pl_module.named_modules():
            flag = flags.get(name)
            if flag is not None:
                module.training = flag

    def _log(self, trainer: Trainer, report: RecalibrationReport, prefix: str) -> None:
        mean_shift, var_shift = report.max_shift()
        samples = float(report.num_samples) if report.num_samples is not None else float("nan")
        metrics = {
            f"{prefix}/samples": samples,
            f"{prefix}/mean_shift": mean_shift,
            f"{prefix}/var_shift": var_shift,
        }
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=logging_step(trainer))
        if self.verbose:
            rank_zero_info(
                f"{_OWNER}: {len(report.layers)} layer(s) from {report.num_samples} samples "
                f"({report.num_batches} batches, {report.passes} pass(es)); largest shift: mean "
                f"{mean_shift:.4g}, var {var_shift:.4g}."
            )


def _stage_line(stage: str, report: RecalibrationReport, kept: bool) -> str:
    """The line printed before a test or predict run whose statistics were recalibrated.

    Examples:
        >>> report = RecalibrationReport(mode="train", layers=["bn"], num_samples=64, num_batches=4, data="test data")
        >>> _stage_line("test", report, kept=False)  # doctest: +NORMALIZE_WHITESPACE
        "BNRecalibration: the test runs with BatchNorm statistics from the test data: 1 layer(s) recalibrated from 64
        samples (4 batches). The model's own statistics are put back when the test ends (`keep_stage_statistics=True`
        keeps these)."
    """
    amount = f"{report.num_samples} samples ({report.num_batches} batches)"
    if report.num_samples is None:
        amount = f"{report.num_batches} batches"
    after = f"The model's own statistics are put back when the {stage} ends (`keep_stage_statistics=True` keeps these)."
    if kept:
        after = f"They stay in the model after the {stage} (`keep_stage_statistics=True`)."
    return (
        f"{_OWNER}: the {stage} runs with BatchNorm statistics from the {report.data}: {len(report.layers)} layer(s) "
        f"recalibrated from {amount}. {after}"
    )


__all__ = ["BEFORE_PREDICT", "BEFORE_TEST", "STEP_METHOD", "BNRecalibration", "BeforePredict", "BeforeTest"]
