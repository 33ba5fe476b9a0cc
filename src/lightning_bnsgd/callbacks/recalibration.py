"""``BNRecalibration``: exact BatchNorm statistics at the right moments of fit, test and predict.

It recalibrates before every validation, at the end of training, and (when asked) before ``Trainer.test`` and
``Trainer.predict``.

The callback holds the moments; which batches it reads is in `_recalibration_sources`, one recalibration in
`_recalibration_run`, the checks in `_recalibration_checks`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_bnsgd._compat import Callback, LightningModule, Trainer
from lightning_bnsgd._validation import check_bool, check_str
from lightning_bnsgd.bn.distributed import agree_on_failure, world_size
from lightning_bnsgd.bn.recalibrate import (
    DropoutMode,
    ForwardFn,
    Mode,
    NonFinite,
    RecalibrationReport,
    validate_recalibration_args,
)
from lightning_bnsgd.callbacks._batches import preserved_rng
from lightning_bnsgd.callbacks._recalibration_checks import (
    BEFORE_PREDICT,
    BEFORE_TEST,
    BeforePredict,
    BeforeTest,
    check_callback_args,
    check_callback_order,
    check_first_batch,
    check_it_can_act,
    checked_state,
    frozen_in_fit_message,
    frozen_in_stage_message,
    idle_message,
    in_swa_bn_update_epoch,
)
from lightning_bnsgd.callbacks._recalibration_run import (
    STEP_METHOD,
    Saved,
    log_report,
    put_back,
    run_recalibration,
    saved_statistics,
    stage_line,
    train_mode_flags,
    weights_version,
)
from lightning_bnsgd.callbacks._recalibration_sources import (
    OWNER,
    Source,
    agreed_source,
    fit_source,
    stage_own_source,
    stage_train_source,
)

#: How ``forward_fn`` of the wrong arity is told to use the LightningModule's own step instead.
_FORWARD_HINT = (
    f" For a forward of the batch alone, define `{STEP_METHOD}(self, batch)` on your LightningModule instead."
)
#: `RecalibrationReport.data` of each source.
_TRAIN_LOADER = "train data (the train dataloader)"
_OWN_LOADER = "the callback's `dataloader`"
_STAGE_TRAIN_OWN = "train data (the callback's `dataloader`)"
_STAGE_DATA = {
    "test": "test data (the test dataloader, labels unused)",
    "predict": "predict data (the predict dataloader)",
}


class BNRecalibration(Callback):
    """Recompute BatchNorm population statistics exactly (``recalibrate_bn``) during ``fit``, test and predict.

    It recalibrates at the right moments of ``fit``, and before ``test`` and ``predict`` when asked.

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
            OWNER,
            num_samples=num_samples,
            mode=mode,
            dropout=dropout,
            nonfinite=nonfinite,
            forward_fn=forward_fn,
            called_as="forward_fn(module, batch)",
            hint=_FORWARD_HINT,
        )
        check_callback_args(every_n_epochs, before_validation, at_train_end, dataloader, before_test, before_predict)
        self.verbose = check_bool("verbose", verbose, owner=OWNER)
        self.keep_stage_statistics = check_bool("keep_stage_statistics", keep_stage_statistics, owner=OWNER)
        self.log_prefix = check_str("log_prefix", log_prefix, owner=OWNER)
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.before_validation = before_validation
        self.at_train_end = at_train_end
        self.dataloader = dataloader
        self.forward_fn = forward_fn
        self.mode: Mode = mode
        self.dropout: DropoutMode = dropout
        self.nonfinite: NonFinite = nonfinite
        self.before_test: BeforeTest = before_test
        self.before_predict: BeforePredict = before_predict
        #: How many recalibrations ran in ``fit`` (restored on resume; those before test and predict not counted).
        self.recalibrations = 0
        #: ``(epoch, global_step)`` of the last recalibration (restored on resume).
        self.last_run: tuple[int, int] | None = None
        #: The report of the last recalibration in this process (``fit``, test or predict; see its ``data``).
        self.last_report: RecalibrationReport | None = None
        self._stage_saved: Saved | None = None
        self._train_flags: dict[str, bool] | None = None
        self._batch_checked = False
        self._calibrated_version: tuple[int, ...] | None = None
        self._quiet_outside_fit = False
        self._warned_frozen = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(num_samples=self.num_samples, mode=self.mode, log_prefix=self.log_prefix)

    # ------------------------------------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            name = str(getattr(stage, "value", stage))
            acts = {"test": self.before_test, "predict": self.before_predict}.get(name, "off") != "off"
            if not acts and not self._quiet_outside_fit:
                self._quiet_outside_fit = True
                rank_zero_warn(idle_message(name))
            return
        self._quiet_outside_fit = True  # after a fit, its model carries the statistics this callback computed
        self._batch_checked = False
        self._calibrated_version = None
        self._warned_frozen = False
        check_it_can_act(trainer, self.every_n_epochs, self.before_validation, self.at_train_end)
        if self.dataloader is not None:
            agreed_source(lambda: fit_source(trainer, self.dataloader), self.num_samples)  # known on every rank now
        check_callback_order(trainer, self)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning's StochasticWeightAveraging runs one extra epoch to refresh BatchNorm: it copies the averaged
        # weights into the model and skips backward and zero_grad, but the optimizer still steps once at the end of
        # that epoch, with the gradients left over from the last real step (plus momentum and weight decay), which
        # moves the weights off the average. Dropping the gradients makes that step a no-op (optimizers skip
        # parameters whose .grad is None), so the final model is the average we then recalibrate.
        if in_swa_bn_update_epoch(trainer):
            pl_module.zero_grad(set_to_none=True)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # The validation loop puts the model in eval mode before our hook runs: remember the training modes
        # (which BatchNorm layers are trained, which are frozen) once per epoch.
        if batch_idx == 0 or self._train_flags is None:
            self._train_flags = {name: module.training for name, module in pl_module.named_modules()}
        if not self._batch_checked and (self.before_validation or self.at_train_end):
            self._batch_checked = True
            error = None
            try:
                check_first_batch(trainer, pl_module, batch, self, self.dataloader)
            except Exception as err:
                error = err
            agree_on_failure([], error, OWNER)  # every rank raises if one did

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
        if self._calibrated_version is not None and self._calibrated_version == weights_version(pl_module):
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
        self.recalibrations, self.last_run = checked_state(state_dict)

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
        report, frozen = run_recalibration(
            trainer, pl_module, self, self._train_flags, lambda: fit_source(trainer, self.dataloader), data
        )
        if frozen:
            if not self._warned_frozen:
                self._warned_frozen = True
                rank_zero_warn(frozen_in_fit_message(frozen, trainer.current_epoch))
            return RecalibrationReport(
                mode=self.mode, skipped=dict.fromkeys(frozen, "eval mode (frozen)"), world_size=world_size()
            )
        self.recalibrations += 1
        self.last_run = (trainer.current_epoch, trainer.global_step)
        self.last_report = report
        self._calibrated_version = weights_version(pl_module)
        log_report(trainer, report, self.log_prefix, self.verbose)
        return report

    def _before_stage(
        self, trainer: Trainer, pl_module: LightningModule, stage: str, source: str
    ) -> RecalibrationReport:
        """Recalibrate before the test or predict run ``stage`` from ``source`` (``"train_data"`` or its own data).

        The modes are the training modes ``pl_module.train()`` sets; it remembers what to put back when the stage
        ends.
        """
        self._restore_stage_statistics()  # a previous stage's, had its end hook been skipped
        if source == "train_data":
            data = _STAGE_TRAIN_OWN if self.dataloader is not None else _TRAIN_LOADER

            def read() -> Source:
                return stage_train_source(trainer, stage, self.dataloader)

        else:
            data = _STAGE_DATA[stage]

            def read() -> Source:
                return stage_own_source(trainer, stage)

        with preserved_rng():  # the dataloader hooks and `train()` may draw too: a later fit must not see it
            flags = train_mode_flags(pl_module)
            saved = saved_statistics(pl_module)
            report, frozen = run_recalibration(trainer, pl_module, self, flags, read, data)
        if frozen:
            rank_zero_warn(frozen_in_stage_message(stage, type(pl_module).__name__, frozen))
            return report
        if not self.keep_stage_statistics:
            self._stage_saved = [saved[name] for name in report.layers if name in saved]
        self.last_report = report
        log_report(trainer, report, f"{self.log_prefix}/{stage}", self.verbose)
        if report.layers:  # else recalibrate_bn warned that the model has no BatchNorm layer to recalibrate
            rank_zero_info(stage_line(stage, report, self.keep_stage_statistics))
        return report

    def _restore_stage_statistics(self) -> None:
        """Put back the statistics a recalibration before test or predict replaced (once; no-op when none)."""
        saved, self._stage_saved = self._stage_saved, None
        if saved:
            put_back(saved)


__all__ = ["BEFORE_PREDICT", "BEFORE_TEST", "STEP_METHOD", "BNRecalibration", "BeforePredict", "BeforeTest"]
