"""What ``BNRecalibration`` checks before it acts: its arguments, its checkpoint state, the Trainer, the batches."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args

from lightning_utilities.core.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader

from lightning_bnsgd._compat import Callback, LightningModule, Trainer, namespace_of, skipping_backward
from lightning_bnsgd._validation import check_bool, check_choice, check_int
from lightning_bnsgd.bn.batches import batch_size_of, default_forward, default_forward_problem
from lightning_bnsgd.callbacks._batches import (
    first_batch,
    loader_generators,
    preserved_rng,
    transfer_batch,
    trial_forward,
)
from lightning_bnsgd.callbacks._recalibration_run import STEP_METHOD, Settings, forward_of, uncountable
from lightning_bnsgd.callbacks._recalibration_sources import OWNER, UserLoader, loader_of

#: Where ``before_test`` takes its batches from: nowhere (``"off"``), the training data, or the test data.
BeforeTest = Literal["off", "train_data", "test_data"]
#: Where ``before_predict`` takes its batches from: nowhere (``"off"``), the training data, or the predict data.
BeforePredict = Literal["off", "train_data", "predict_data"]
BEFORE_TEST: tuple[str, ...] = get_args(BeforeTest)
BEFORE_PREDICT: tuple[str, ...] = get_args(BeforePredict)


def check_callback_args(
    every_n_epochs: object,
    before_validation: object,
    at_train_end: object,
    dataloader: object,
    before_test: object = "off",
    before_predict: object = "off",
) -> None:
    """The arguments only the callback has (`validate_recalibration_args` checks ``recalibrate_bn``'s own).

    Examples:
        >>> check_callback_args(1, False, False, None, before_test="test_data")  # acts only before test
        >>> check_callback_args(1, True, True, None, before_test="test")
        Traceback (most recent call last):
        ...
        ValueError: BNRecalibration: `before_test` must be one of ('off', 'train_data', 'test_data'), got 'test'.
    """
    check_int("every_n_epochs", every_n_epochs, minimum=1, owner=OWNER)
    check_bool("before_validation", before_validation, owner=OWNER)
    check_bool("at_train_end", at_train_end, owner=OWNER)
    check_choice("before_test", before_test, BEFORE_TEST, owner=OWNER)
    check_choice("before_predict", before_predict, BEFORE_PREDICT, owner=OWNER)
    if not before_validation and not at_train_end and before_test == "off" and before_predict == "off":
        raise ValueError(
            f"{OWNER}: `before_validation=False` and `at_train_end=False`, with `before_test='off'` and "
            "`before_predict='off'`, leave it no moment to recalibrate: it would never act. Set one of them (e.g. "
            "`before_validation=True`, or `before_test='train_data'` for a callback meant only for testing), or "
            "remove the callback."
        )
    if dataloader is not None and not isinstance(dataloader, DataLoader) and not callable(dataloader):
        raise TypeError(
            f"{OWNER}: `dataloader` must be None, a DataLoader or a callable returning batches, got {dataloader!r}."
        )


_STATE_OWNER = f"{OWNER} checkpoint state"
_STATE_KEYS = ("recalibrations", "last_run")


def checked_state(state: object) -> tuple[int, tuple[int, int] | None]:
    """``(recalibrations, last_run)`` from a checkpoint's callback state, checked.

    A wrong type or value (a corrupted or foreign state) is an error naming the key; a missing key falls back to a
    fresh run's value with a warning.

    Examples:
        >>> checked_state({"recalibrations": 2, "last_run": [1, 8]})
        (2, (1, 8))
        >>> checked_state({"recalibrations": -7, "last_run": None})
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


def idle_message(stage: str) -> str:
    """The one warning of a callback that does nothing in ``Trainer.<stage>`` (outside ``fit``)."""
    if stage not in ("test", "predict"):
        return (
            f"{OWNER} recalibrates only during `fit`: in `Trainer.{stage}` it does nothing, and the model's "
            "BatchNorm statistics are used as they are (to recalibrate a loaded model, call "
            "`lightning_bnsgd.recalibrate_bn` before it; before test and predict, see `before_test` and "
            "`before_predict`)."
        )
    return (
        f"{OWNER} does nothing in `Trainer.{stage}` with `before_{stage}='off'` (the default): the model's BatchNorm "
        f"statistics are used as they are. Set `before_{stage}='train_data'` to recalibrate them from the training "
        f"data first (precise BN, for a model trained without it), or `before_{stage}='{stage}_data'` to adapt them "
        f"to the {stage} data (labels unused)."
    )


def frozen_in_fit_message(frozen: list[str], epoch: int) -> str:
    """The once-per-fit warning of a recalibration skipped because every BatchNorm layer is frozen."""
    return (
        f"{OWNER}: every BatchNorm layer that tracks running statistics was in eval mode during training "
        f"(frozen: {frozen}), and frozen layers are left alone by design, so there was nothing to "
        f"recalibrate in epoch {epoch}: skipped, statistics unchanged. It skips "
        "each recalibration while they stay frozen (this warning is shown once per fit) and recalibrates "
        "again as soon as one trains. To have their statistics recalibrated, put those layers in train "
        "mode during training (`layer.train()`, e.g. when you unfreeze them), or remove the callback."
    )


def frozen_in_stage_message(stage: str, module_name: str, frozen: list[str]) -> str:
    """The warning of a recalibration before test or predict skipped because every BatchNorm layer is frozen."""
    return (
        f"{OWNER}: before {stage}, every BatchNorm layer that tracks running statistics is in eval mode after "
        f"`{module_name}.train()` (frozen: {frozen}), and frozen layers are left alone by "
        f"design: nothing was recalibrated, the {stage} uses the model's own statistics. To recalibrate them, "
        "leave those layers in train mode in `train()`."
    )


def check_it_can_act(trainer: Trainer, every_n_epochs: int, before_validation: bool, at_train_end: bool) -> None:
    """Refuse a fit in which it would never recalibrate (only before validation, and no validation comes).

    A callback asked to act only before test or predict does nothing in fit, by its configuration.
    """
    if at_train_end or not before_validation:
        return
    max_epochs = trainer.max_epochs
    if isinstance(max_epochs, int) and 0 <= max_epochs < every_n_epochs:
        raise ValueError(
            f"{OWNER}: `every_n_epochs={every_n_epochs}` is larger than the Trainer's "
            f"`max_epochs={max_epochs}` and `at_train_end=False`: it would never recalibrate in this fit. Lower "
            "`every_n_epochs`, or set `at_train_end=True`."
        )
    if trainer.limit_val_batches == 0:
        raise ValueError(
            f"{OWNER}: the Trainer runs no validation (`limit_val_batches=0`) and `at_train_end=False`: it "
            "would never recalibrate in this fit. Set `at_train_end=True`."
        )


def _averaging_callbacks(trainer: Trainer) -> tuple[type, ...]:
    """Lightning's weight-averaging callback classes, from the Trainer's own namespace."""
    callbacks = namespace_of(trainer).callbacks
    names = ("StochasticWeightAveraging", "WeightAveraging")
    return tuple(cls for cls in (getattr(callbacks, n, None) for n in names) if isinstance(cls, type))


def check_callback_order(trainer: Trainer, callback: Callback) -> None:
    """Lightning's weight-averaging callbacks must come before ``callback``, so it recalibrates averaged weights."""
    averaging = _averaging_callbacks(trainer)
    callbacks = list(trainer.callbacks)
    mine = next((i for i, cb in enumerate(callbacks) if cb is callback), len(callbacks))
    late = [type(cb).__name__ for cb in callbacks[mine + 1 :] if isinstance(cb, averaging)]
    if late:
        raise ValueError(
            f"{OWNER} must come after {', '.join(late)} in `callbacks=[...]` so that it "
            "recalibrates the averaged weights (hooks run in list order); move it after them."
        )


def in_swa_bn_update_epoch(trainer: Trainer) -> bool:
    """True in the extra BatchNorm-update epoch of Lightning's ``StochasticWeightAveraging`` (backward skipped)."""
    swa = getattr(namespace_of(trainer).callbacks, "StochasticWeightAveraging", None)
    if swa is None or not any(isinstance(cb, swa) for cb in trainer.callbacks):
        return False
    return skipping_backward(trainer)


def check_first_batch(
    trainer: Trainer, pl_module: LightningModule, batch: Any, settings: Settings, dataloader: UserLoader
) -> None:
    """Fail at the first training batch, not after an epoch, when recalibration could not run its batches.

    That is: the default forward cannot take them, a sample budget cannot count them, or (for batches from
    ``dataloader``, which training has not fed to the model) a trial forward of the first one fails.
    """
    forward_fn = forward_of(settings.forward_fn, pl_module)
    origin = "a training batch"
    if dataloader is not None:
        loader = loader_of(trainer, dataloader)
        batch = first_batch(loader)
        if batch is None:
            return  # nothing on this rank: the others' batches are used (all empty is refused at setup)
        with preserved_rng(loader_generators(loader)):
            batch = transfer_batch(batch, trainer, pl_module)
        origin = "the first batch of `dataloader`"
    problem = default_forward_problem(batch) if forward_fn is None else None
    if problem is not None:
        raise TypeError(
            f"{OWNER} cannot feed {origin} (of type {type(batch).__name__}: {problem}) to the model: its default "
            "forward runs `module(batch)` for a tensor and `module(batch[0])` for a tuple or list. Pass "
            "`BNRecalibration(forward_fn=lambda module, batch: module(batch['x']))` (with your batch's key), or "
            f"define `{STEP_METHOD}(self, batch)` on your LightningModule."
        )
    if settings.num_samples is not None and batch_size_of(batch) is None:
        raise uncountable(settings.num_samples, type(batch).__name__)
    if dataloader is None:
        return  # the training step feeds these batches to the model itself
    forward = forward_fn if forward_fn is not None else default_forward
    try:
        trial_forward(pl_module, batch, forward, settings.dropout, trainer.precision_plugin.forward_context)
    except Exception as err:
        kind = next((k for k in (TypeError, ValueError) if isinstance(err, k)), RuntimeError)
        raise kind(
            f"{OWNER}: a trial forward of {origin} (of type {type(batch).__name__}) failed at the first "
            f"training batch, so every recalibration would fail: {type(err).__name__}: {err}"
        ) from err
