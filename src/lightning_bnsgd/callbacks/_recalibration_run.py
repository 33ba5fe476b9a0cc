"""One recalibration as ``BNRecalibration`` runs it: modes, batches, errors named for the callback, the log line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_bnsgd._compat import LightningModule, Trainer, logging_step
from lightning_bnsgd.bn._modes import preserved_modes
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
)
from lightning_bnsgd.callbacks._batches import TransferredBatches, loader_generators, preserved_rng, transfer_batch
from lightning_bnsgd.callbacks._own_forwards import own_forwards
from lightning_bnsgd.callbacks._recalibration_sources import OWNER, Source, agreed_source

#: The method a LightningModule may define to run one recalibration forward: ``bn_recalibration_step(batch)``.
STEP_METHOD = "bn_recalibration_step"
_NO_SIZE_HINT = "Set `num_samples=None` to use every batch, or give batches that hold such a tensor."

#: Saved running statistics: each layer with copies of its buffers.
Saved = list[tuple[nn.Module, dict[str, Tensor]]]


class Settings(Protocol):
    """What a recalibration reads of its callback's arguments."""

    num_samples: int | None
    forward_fn: ForwardFn | None
    mode: Mode
    dropout: DropoutMode
    nonfinite: NonFinite


def uncountable(num_samples: int | None, batch_type: str | None) -> TypeError:
    """The error for batches a sample budget cannot count (no tensor with the batch size as leading dimension)."""
    got = f"a batch of type {batch_type}" if batch_type is not None else "a batch"
    return TypeError(
        f"{OWNER}: `num_samples={num_samples}` needs batches with a tensor whose leading dimension is the batch "
        f"size, but {got} has none. {_NO_SIZE_HINT}"
    )


def renamed(err: Exception, num_samples: int | None) -> Exception:
    """``err`` with its message naming the class the user wrote (and its arguments) instead of the function it calls.

    ``err`` itself when there is nothing to rename. Notes (the rank that raised it) are kept.
    """
    notes = getattr(err, "__notes__", None)
    if isinstance(notes, list):  # e.g. the rank that raised it, noted by recalibrate_bn
        notes[:] = [
            f"{OWNER}: {n[len('recalibrate_bn: ') :]}" if n.startswith("recalibrate_bn: ") else n for n in notes
        ]
    if isinstance(err, UncountableBatches):
        new: Exception = uncountable(num_samples, err.batch_type)
    else:
        message = str(err).replace(UncountableBatches.HINT, _NO_SIZE_HINT)
        for prefix in ("recalibrate_bn: ", "recalibrate_bn "):
            if message.startswith(prefix):
                message = f"{OWNER}{': ' if prefix.endswith(': ') else ' '}{message[len(prefix) :]}"
                break
        if message == str(err):
            return err
        try:
            new = type(err)(message)
        except Exception:  # an exception class whose constructor takes other arguments
            return err
    for note in getattr(err, "__notes__", []):
        new.add_note(note)
    return new


def weights_version(module: nn.Module) -> tuple[int, ...]:
    """A fingerprint that changes whenever a parameter is modified in place (optimizer steps, weight averaging)."""
    return tuple(p._version for p in module.parameters())


def train_mode_flags(module: nn.Module) -> dict[str, bool]:
    """Each submodule's ``training`` flag after ``module.train()`` (a user's override of ``train()`` included).

    Every module's own flag is put back: these are the modes a training step would run in, read outside ``fit``.

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).eval()
        >>> train_mode_flags(net), net.training
        ({'': True, '0': True, '1': True}, False)
    """
    with preserved_modes(module):
        module.train()
        return {name: m.training for name, m in module.named_modules()}


def saved_statistics(module: nn.Module) -> dict[str, tuple[nn.Module, dict[str, Tensor]]]:
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


def put_back(saved: Saved) -> None:
    """Copy the saved buffers back into the layers' own (current) buffers, in place, on their current devices.

    Examples:
        >>> bn = nn.BatchNorm1d(2)
        >>> saved = list(saved_statistics(nn.Sequential(bn)).values())
        >>> bn.running_mean += 3.0
        >>> put_back(saved)
        >>> bn.running_mean.tolist()
        [0.0, 0.0]
    """
    with torch.no_grad():
        for layer, buffers in saved:
            for key, value in buffers.items():
                getattr(layer, key).copy_(value)


def forward_of(forward_fn: ForwardFn | None, pl_module: nn.Module) -> ForwardFn | None:
    """``forward_fn``, else the module's ``bn_recalibration_step``, else ``None`` (the default forward)."""
    if forward_fn is not None:
        return forward_fn
    step = getattr(pl_module, STEP_METHOD, None)
    if callable(step):
        return lambda module, batch: step(batch)
    return None


def _apply_train_flags(pl_module: nn.Module, flags: dict[str, bool] | None) -> None:
    if flags is None:
        rank_zero_warn(f"{OWNER}: no training batch seen yet in this run; treating every module as in train mode.")
        pl_module.train()
        return
    for name, module in pl_module.named_modules():
        flag = flags.get(name)
        if flag is not None:
            module.training = flag


def run_recalibration(
    trainer: Trainer,
    pl_module: LightningModule,
    settings: Settings,
    flags: dict[str, bool] | None,
    read: Callable[[], Source],
    data: str,
) -> tuple[RecalibrationReport, list[str]]:
    """One recalibration of ``pl_module`` (on every process) with the modules in the training modes ``flags``.

    The batches are those ``read()`` gives (and how many of them at most); every module's mode is put back.
    Returns the report (its ``data`` set to ``data``) and an empty list, or, when every BatchNorm layer is frozen
    on every process, an empty report and their names: then nothing changed.
    """
    try:
        with preserved_modes(pl_module):
            _apply_train_flags(pl_module, flags)
            frozen = all_frozen(pl_module)
            (loader, limit), skip = agreed_source(read, settings.num_samples, frozen=bool(frozen))
            if skip:
                return RecalibrationReport(mode=settings.mode, data=data), frozen
            batches = TransferredBatches(loader, lambda batch: transfer_batch(batch, trainer, pl_module), limit)
            with preserved_rng(loader_generators(loader)), trainer.precision_plugin.forward_context(), own_forwards():
                report = recalibrate_bn(
                    pl_module,
                    batches,
                    num_samples=settings.num_samples,
                    forward_fn=forward_of(settings.forward_fn, pl_module),
                    mode=settings.mode,
                    dropout=settings.dropout,
                    nonfinite=settings.nonfinite,
                )
    except Exception as err:
        new = renamed(err, settings.num_samples)
        if new is err:
            raise
        raise new from err
    report.data = data
    return report, []


def log_report(trainer: Trainer, report: RecalibrationReport, prefix: str, verbose: bool) -> None:
    """Log the report's sample count and largest shifts to every logger (rank zero), and print them if ``verbose``."""
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
    if verbose:
        rank_zero_info(
            f"{OWNER}: {len(report.layers)} layer(s) from {report.num_samples} samples "
            f"({report.num_batches} batches, {report.passes} pass(es)); largest shift: mean "
            f"{mean_shift:.4g}, var {var_shift:.4g}."
        )


def stage_line(stage: str, report: RecalibrationReport, kept: bool) -> str:
    """The line printed before a test or predict run whose statistics were recalibrated.

    Examples:
        >>> report = RecalibrationReport(mode="train", layers=["bn"], num_samples=64, num_batches=4, data="test data")
        >>> stage_line("test", report, kept=False)  # doctest: +NORMALIZE_WHITESPACE
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
        f"{OWNER}: the {stage} runs with BatchNorm statistics from the {report.data}: {len(report.layers)} layer(s) "
        f"recalibrated from {amount}. {after}"
    )
