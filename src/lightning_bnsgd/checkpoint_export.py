"""Export an existing checkpoint as a ``torch.export`` program, checked in a fresh process with torch alone.

Load the LightningModule's weights, optionally recalibrate BatchNorm on the training data, fold, write a
``torch.export`` program and check it in a fresh process with torch alone.

`export_checkpoint` does it in Python; `BNSGDTrainer.export` is the ``lightning-bnsgd export`` subcommand.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from lightning_bnsgd._compat import LightningDataModule, LightningModule, Trainer
from lightning_bnsgd._validation import check_bool, check_int
from lightning_bnsgd.bn.recalibrate import RecalibrationReport, recalibrate_bn
from lightning_bnsgd.callbacks._batches import TransferredBatches, first_batch, transfer_batch
from lightning_bnsgd.callbacks._export_parts import (
    FoldExportResult,
    ForwardFn,
    example_inputs,
    export_and_check,
    target_module,
)
from lightning_bnsgd.callbacks._recalibration_run import forward_of

_OWNER = "export_checkpoint"


def load_weights(
    model: LightningModule, ckpt_path: str | os.PathLike[str], weights_only: bool | None = None
) -> dict[str, Any]:
    """Load a Lightning checkpoint's weights into ``model`` on the CPU, as ``Trainer.fit(ckpt_path=...)`` restores them.

    It runs the module's ``on_load_checkpoint`` hook, then loads its ``state_dict`` (``strict_loading``). Returns the
    checkpoint.

    ``weights_only`` is passed to ``torch.load``, as Lightning does (``None``: torch's default, ``True`` since torch
    2.6; ``False`` unpickles any object: trusted files only).
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"{_OWNER}: `ckpt_path={str(ckpt_path)!r}` is not a file.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{_OWNER}: {str(path)!r} is not a Lightning checkpoint (it has no 'state_dict').")
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"], strict=bool(getattr(model, "strict_loading", True)))
    model.cpu()
    return checkpoint


def _train_batches(datamodule: LightningDataModule, model: LightningModule) -> TransferredBatches:
    """The data module's train loader, each batch moved with the batch-transfer hooks, as in training.

    The hooks are the data module's where it overrides them, else the model's.
    """
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    holder = SimpleNamespace(datamodule=datamodule)
    return TransferredBatches(loader, lambda batch: transfer_batch(batch, holder, model))


def export_checkpoint(
    model: LightningModule,
    ckpt_path: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    datamodule: LightningDataModule | None = None,
    module_name: str | None = None,
    example_input: Any = None,
    forward_fn: ForwardFn | None = None,
    recalibrate: bool = False,
    num_samples: int | None = 4096,
    fold: bool = True,
    dynamic_batch: bool = True,
    check_in_fresh_process: bool = True,
    weights_only: bool | None = None,
) -> tuple[FoldExportResult, RecalibrationReport | None]:
    """Load ``ckpt_path``'s weights into ``model``, optionally recalibrate BatchNorm, then fold, export and check it.

    The recalibration recomputes its BatchNorm statistics on ``datamodule``'s training data; the fold, export and check
    are those `BNFoldExport` does at the end of fit.

    ``model`` is changed only by loading the weights and, with ``recalibrate``, by the new statistics; the exported
    copy is folded. The example inputs are ``example_input``, else ``model.example_input_array``, else the first
    batch of ``datamodule``'s train loader (``forward_fn(module, batch)`` or ``module(batch[0])``).

    Args:
        model: the LightningModule the checkpoint was written from (built with the run's arguments).
        ckpt_path: the Lightning checkpoint.
        output: the ``.pt2`` file; ``None``: next to the checkpoint, with its name (``epoch=2-step=60.pt2``).
        datamodule: the run's data module: its train loader gives the recalibration batches and, without another
            example input, the example batch.
        module_name: the submodule to export (``None``: the whole LightningModule).
        example_input: the exported module's example input (a tensor or a tuple of positional inputs).
        forward_fn: ``forward_fn(module, batch)`` runs the LightningModule on a training batch (dict batches); the
            recalibration forward too (else the module's ``bn_recalibration_step`` if it has one).
        recalibrate: recompute the BatchNorm statistics exactly with `recalibrate_bn` before folding (a checkpoint
            written mid-epoch, or without `BNRecalibration`).
        num_samples: samples of that recalibration (``None``: the whole train loader).
        fold: fold BatchNorm (``False``: export the eval model as it is).
        dynamic_batch: make the batch dimension of the program's inputs dynamic.
        check_in_fresh_process: load the program in a fresh process with torch alone and compare.
        weights_only: passed to ``torch.load`` (`load_weights`).

    Returns:
        ``(result, recalibration_report)`` (the report is ``None`` without ``recalibrate``).
    """
    for name, value in (
        ("recalibrate", recalibrate),
        ("fold", fold),
        ("dynamic_batch", dynamic_batch),
        ("check_in_fresh_process", check_in_fresh_process),
    ):
        check_bool(name, value, owner=_OWNER)
    check_int("num_samples", num_samples, minimum=1, allow_none=True, owner=_OWNER)
    if recalibrate and datamodule is None:
        raise ValueError(f"{_OWNER}: `recalibrate=True` needs a `datamodule` whose train loader to recalibrate on.")
    target = target_module(model, module_name, _OWNER)  # before the checkpoint is read: a wrong name fails fast
    load_weights(model, ckpt_path, weights_only)
    loaded: list[TransferredBatches] = []

    def batches() -> TransferredBatches:  # the data module is set up only when its batches are needed
        assert datamodule is not None
        if not loaded:
            loaded.append(_train_batches(datamodule, model))
        return loaded[0]

    report = None
    if recalibrate:
        model.train()
        report = recalibrate_bn(model, batches(), num_samples=num_samples, forward_fn=forward_of(forward_fn, model))
    path = Path(output) if output is not None else Path(ckpt_path).with_suffix(".pt2")
    inputs, origin = example_inputs(
        model,
        target,
        example_input=example_input,
        batch=lambda: first_batch(batches()) if datamodule is not None else None,
        forward_fn=forward_fn,
        owner=_OWNER,
    )
    result = export_and_check(
        target, inputs, origin, path, fold=fold, dynamic_batch=dynamic_batch, fresh_process=check_in_fresh_process
    )
    return result, report


class BNSGDTrainer(Trainer):
    """Lightning's ``Trainer`` with one more method, `export`: the ``lightning-bnsgd export`` subcommand."""

    def export(
        self,
        model: LightningModule,
        datamodule: LightningDataModule | None = None,
        *,
        ckpt_path: str,
        output: str | None = None,
        module_name: str | None = None,
        recalibrate: bool = False,
        num_samples: int | None = 4096,
        forward_fn: ForwardFn | None = None,
        fold: bool = True,
        dynamic_batch: bool = True,
        check_in_fresh_process: bool = True,
        weights_only: bool | None = None,
    ) -> FoldExportResult:
        """Fold and export a checkpoint's model as a torch.export program (.pt2) that loads with torch alone.

        The model and data module come from the config, the weights from ``ckpt_path``; see `export_checkpoint`
        for every argument. Prints what it did.

        Args:
            model: the config's LightningModule.
            datamodule: the config's data module.
            ckpt_path: the Lightning checkpoint to export.
            output: the .pt2 file (null: next to the checkpoint, with its name).
            module_name: the submodule to export (null: the whole LightningModule).
            recalibrate: recompute the BatchNorm statistics on the training data first.
            num_samples: samples of that recalibration (null: the whole train loader).
            forward_fn: import path of a function forward_fn(module, batch) (for batches module(batch[0]) cannot
                feed).
            fold: fold BatchNorm (false: export the eval model as it is).
            dynamic_batch: make the batch dimension of the program's inputs dynamic.
            check_in_fresh_process: load the program in a fresh process with torch alone and compare.
            weights_only: passed to torch.load (null: torch's default; false loads any pickled object: trusted
                checkpoints only).
        """
        result, report = export_checkpoint(
            model,
            ckpt_path,
            output,
            datamodule=datamodule,
            module_name=module_name,
            forward_fn=forward_fn,
            recalibrate=recalibrate,
            num_samples=num_samples,
            fold=fold,
            dynamic_batch=dynamic_batch,
            check_in_fresh_process=check_in_fresh_process,
            weights_only=weights_only,
        )
        if self.is_global_zero:
            print(f"lightning-bnsgd export: loaded {ckpt_path}", flush=True)
            if report is not None:
                mean_shift, var_shift = report.max_shift()
                print(
                    f"lightning-bnsgd export: recalibrated {len(report.layers)} BatchNorm layer(s) on "
                    f"{report.num_samples} training samples (largest shift: mean {mean_shift:.3g}, var "
                    f"{var_shift:.3g})",
                    flush=True,
                )
            print(result.summary("lightning-bnsgd export"), flush=True)
            if result.export.fold is not None:
                print(result.export.fold, flush=True)
        return result


__all__ = ["BNSGDTrainer", "export_checkpoint", "load_weights"]
