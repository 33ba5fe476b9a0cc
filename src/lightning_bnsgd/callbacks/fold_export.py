"""``BNFoldExport``: at the end of ``fit``, fold BatchNorm away and write the model as a ``torch.export`` program.

The program of the trained model loads with torch alone, and is checked in a fresh process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_bnsgd._compat import Callback, LightningModule, Trainer, namespace_of
from lightning_bnsgd._validation import check_bool, check_str
from lightning_bnsgd.bn.batches import takes_two_positional
from lightning_bnsgd.bn.distributed import agree_on_failure
from lightning_bnsgd.callbacks._batches import first_batch, transfer_batch
from lightning_bnsgd.callbacks._export_parts import (
    FoldExportResult,
    ForwardFn,
    example_inputs,
    export_and_check,
    target_module,
    unfeedable,
)

_OWNER = "BNFoldExport"
_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")


def _check_example_input(value: object) -> None:
    ok = isinstance(value, Tensor) or (isinstance(value, tuple) and value and any(isinstance(v, Tensor) for v in value))
    if value is not None and not ok:
        raise TypeError(
            f"{_OWNER}: `example_input` must be None, a tensor or a tuple of the exported module's positional "
            f"inputs (with at least one tensor), got {type(value).__name__}."
        )


def _check_args(
    dirpath: object, filename: object, module_name: object, example_input: object, forward_fn: object
) -> None:
    if dirpath is not None and not isinstance(dirpath, (str, os.PathLike)):
        raise TypeError(f"{_OWNER}: `dirpath` must be None or a path, got {dirpath!r}.")
    check_str("filename", filename, owner=_OWNER)
    assert isinstance(filename, str)
    if "/" in filename or os.sep in filename:
        raise ValueError(f"{_OWNER}: `filename` is a file name without folders (use `dirpath`), got {filename!r}.")
    if module_name is not None:
        check_str("module_name", module_name, owner=_OWNER)
    _check_example_input(example_input)
    if forward_fn is not None and (not callable(forward_fn) or not takes_two_positional(forward_fn)):
        raise TypeError(
            f"{_OWNER}: `forward_fn` is called as `forward_fn(module, batch)` (two positional arguments), got "
            f"{forward_fn!r}."
        )


class BNFoldExport(Callback):
    """At the end of ``fit``, fold BatchNorm away, export the model with ``torch.export``, check it in a fresh process.

    The trained model's BatchNorm layers are folded away (`fold_batchnorm`), the model is written as a ``torch.export``
    program (``<dirpath>/<filename>.pt2``, `export_folded`), and a fresh Python process that imports torch alone checks
    that the program gives the trained model's eval outputs.

    It acts in ``on_fit_end``, which Lightning runs after every callback's ``on_train_end``: `BNRecalibration`'s
    final recalibration is in the exported model wherever the two stand in ``callbacks=[...]``. By then Lightning
    has moved the model to the CPU (and unwrapped DDP, reverted SyncBatchNorm); the program is exported from a CPU
    copy in the model's dtype, so it holds CPU tensors and runs on the CPU, whatever device trained. The trained
    model is not changed. A ``fit`` that stops on an error or an interrupt exports nothing.

    The exported module is the LightningModule's forward (``module_name=None``) or the submodule named by
    ``module_name`` (e.g. ``"net"``). Its example inputs, which fix the program's input shapes (the batch dimension
    stays dynamic with ``dynamic_batch``) and are the inputs of both checks, are, in this order: ``example_input``
    (the exported module's own input); the LightningModule's ``example_input_array`` (its forward's input); the
    first batch of the train dataloader, moved with the batch-transfer hooks and run through ``forward_fn(module,
    batch)``, else ``module(batch[0])`` (``module(batch)`` for a tensor). For a submodule, the inputs are the ones
    the forward passes to it. Both checks use `fold_batchnorm`'s tolerance (float32 rounding); a mismatch is an
    error.

    Only rank zero exports; every rank waits for it and raises if it failed (no rank hangs), and every rank gets
    the result in ``last_export`` (with ``ddp_spawn``, in the spawned processes: the launching process's callback
    object is not updated, the file is there). It has no state to restore: a resumed ``fit`` exports again at its end.

    Args:
        dirpath: folder of the file (created); ``None``: the Trainer's ``log_dir`` (the logger's version folder,
            e.g. ``runs/digits/version_0``; ``default_root_dir`` without a logger).
        filename: file name; ``.pt2`` is appended unless it ends with it.
        module_name: qualified name of the submodule to export (``None``: the whole LightningModule).
        example_input: the exported module's example input: a tensor, or a tuple of its positional inputs.
        forward_fn: ``forward_fn(module, batch)`` runs the LightningModule on a training batch (for batches the
            default forward cannot feed, e.g. dicts); only used when there is neither ``example_input`` nor an
            ``example_input_array``.
        fold: fold BatchNorm (``False``: export the eval model as it is).
        dynamic_batch: make the batch dimension of the program's inputs dynamic (any batch size of 2 or more).
        check_in_fresh_process: run the fresh-process check (the reload check in this process always runs).
        verbose: print a one-line summary from rank zero.

    Examples:
        >>> from pytorch_lightning import Trainer  # or: from lightning.pytorch import Trainer
        >>> from lightning_bnsgd import BNRecalibration
        >>> callback = BNFoldExport(module_name="net", filename="digits")
        >>> callback.state_key
        "BNFoldExport{'filename': 'digits', 'module_name': 'net'}"
        >>> trainer = Trainer(callbacks=[BNRecalibration(), callback], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str] | None = None,
        filename: str = "folded",
        module_name: str | None = None,
        example_input: Any = None,
        forward_fn: ForwardFn | None = None,
        fold: bool = True,
        dynamic_batch: bool = True,
        check_in_fresh_process: bool = True,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        _check_args(dirpath, filename, module_name, example_input, forward_fn)
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.filename = filename
        self.module_name = module_name
        self.example_input = example_input
        self.forward_fn = forward_fn
        self.fold = check_bool("fold", fold, owner=_OWNER)
        self.dynamic_batch = check_bool("dynamic_batch", dynamic_batch, owner=_OWNER)
        self.check_in_fresh_process = check_bool("check_in_fresh_process", check_in_fresh_process, owner=_OWNER)
        self.verbose = check_bool("verbose", verbose, owner=_OWNER)
        #: What the last export wrote and how it was checked (on every rank), ``None`` before the first.
        self.last_export: FoldExportResult | None = None
        self._batch_checked = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(filename=self.filename, module_name=self.module_name)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._batch_checked = False
        target_module(pl_module, self.module_name, _OWNER)
        strategies = namespace_of(trainer).strategies
        sharded = tuple(cls for cls in (getattr(strategies, n, None) for n in _SHARDED) if isinstance(cls, type))
        if sharded and isinstance(trainer.strategy, sharded):
            raise ValueError(
                f"{_OWNER} exports a model whose weights each process holds whole (single device, DDP); "
                f"{type(trainer.strategy).__name__} shards them. Export from a checkpoint instead "
                "(`lightning-bnsgd export --ckpt_path ...`)."
            )
        if self.dirpath is not None and self.dirpath.exists() and not self.dirpath.is_dir():
            raise ValueError(f"{_OWNER}: `dirpath={str(self.dirpath)!r}` is a file, not a folder.")

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # Fail at the first training batch, not after training, when the export could not take its example input
        # from a batch; every rank raises together (the check is a collective under DDP).
        if self._batch_checked:
            return
        self._batch_checked = True
        needs_batch = self.example_input is None and getattr(pl_module, "example_input_array", None) is None
        error = unfeedable(batch, _OWNER) if needs_batch and self.forward_fn is None else None
        agree_on_failure([], error, _OWNER)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        path = self.path(trainer)  # on every rank: the Trainer's log_dir is a collective
        result: FoldExportResult | None = None
        error: Exception | None = None
        if trainer.is_global_zero:
            try:
                result = self.export(trainer, pl_module, path)
            except Exception as err:
                error = err
        agree_on_failure([], error, _OWNER)  # every rank raises if rank zero failed; a barrier otherwise
        self.last_export = trainer.strategy.broadcast(result, src=0)
        if trainer.is_global_zero and self.verbose and result is not None:
            print(result.summary(_OWNER), flush=True)

    def path(self, trainer: Trainer) -> Path:
        """Where the program goes: ``<dirpath>/<filename>.pt2``.

        Call it on every rank: it reads the Trainer's ``log_dir``, which is broadcast from rank zero.
        """
        folder = self.dirpath if self.dirpath is not None else Path(trainer.log_dir or trainer.default_root_dir)
        name = self.filename if self.filename.endswith(".pt2") else f"{self.filename}.pt2"
        return folder / name

    def export(self, trainer: Trainer, pl_module: LightningModule, path: Path) -> FoldExportResult:
        """Export ``pl_module`` (or its ``module_name`` submodule) to ``path`` now and check it (this process only)."""
        target = target_module(pl_module, self.module_name, _OWNER)
        inputs, origin = example_inputs(
            pl_module,
            target,
            example_input=self.example_input,
            batch=lambda: self._first_batch(trainer, pl_module),
            forward_fn=self.forward_fn,
            owner=_OWNER,
        )
        return export_and_check(
            target,
            inputs,
            origin,
            path,
            fold=self.fold,
            dynamic_batch=self.dynamic_batch,
            fresh_process=self.check_in_fresh_process,
        )

    @staticmethod
    def _first_batch(trainer: Trainer, pl_module: LightningModule) -> Any:
        """The first batch of a fresh iterator over the train dataloader (the first one of several), transferred."""
        loaders = trainer.train_dataloader
        if isinstance(loaders, Mapping):
            loaders = next(iter(loaders.values()), None)
        elif isinstance(loaders, (list, tuple)) and loaders and all(isinstance(x, DataLoader) for x in loaders):
            loaders = loaders[0]
        if loaders is None:
            return None
        batch = first_batch(loaders)
        return None if batch is None else transfer_batch(batch, trainer, pl_module)


__all__ = ["BNFoldExport", "FoldExportResult"]
