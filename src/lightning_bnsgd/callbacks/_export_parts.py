"""What ``BNFoldExport`` and the ``export`` subcommand share.

The module to export, its example inputs (captured where the LightningModule's forward calls it), the trained model's
outputs, and the export with both checks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_bnsgd.bn.batches import default_forward, default_forward_problem
from lightning_bnsgd.bn.export import ExportResult, check_in_fresh_process, export_folded
from lightning_bnsgd.callbacks._batches import trial_forward
from lightning_bnsgd.callbacks._own_forwards import own_forwards

ForwardFn = Callable[[nn.Module, Any], Any]


class _Captured(Exception):
    """Raised by the capturing pre-hook to stop the forward once the target's inputs are known."""


def target_module(pl_module: nn.Module, module_name: str | None, owner: str) -> nn.Module:
    """``pl_module`` itself (``module_name=None``) or its submodule of that qualified name, with a clear error.

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> target_module(net, "0", "BNFoldExport")
        Linear(in_features=2, out_features=2, bias=True)
        >>> target_module(net, "head", "BNFoldExport")
        Traceback (most recent call last):
        ...
        ValueError: BNFoldExport: `module_name='head'` is not a submodule of the Sequential; its submodules: ['0'].
    """
    if module_name is None:
        return pl_module
    try:
        return pl_module.get_submodule(module_name)
    except AttributeError:
        names = [name for name, _ in pl_module.named_children()]
        raise ValueError(
            f"{owner}: `module_name={module_name!r}` is not a submodule of the {type(pl_module).__name__}; its "
            f"submodules: {names}."
        ) from None


def batch_forward(forward_fn: ForwardFn | None) -> ForwardFn:
    """How a batch runs through the LightningModule.

    ``forward_fn(module, batch)``, else ``module(batch)`` for a tensor and ``module(batch[0])`` for a tuple/list
    (`default_forward`).
    """
    return forward_fn if forward_fn is not None else default_forward


def unfeedable(batch: Any, owner: str) -> TypeError | None:
    """The error for a batch the default forward cannot feed (``None`` when it can).

    Examples:
        >>> error = unfeedable({"image": torch.zeros(2)}, "BNFoldExport")
        >>> str(error)[:96]
        'BNFoldExport: without `example_input` or an `example_input_array`, the example input is taken fr'
        >>> "(it is a dict;" in str(error) and "Pass `forward_fn=" in str(error)
        True
        >>> unfeedable((torch.zeros(2), 1), "BNFoldExport") is None
        True
    """
    problem = default_forward_problem(batch)
    if problem is None:
        return None
    return TypeError(
        f"{owner}: without `example_input` or an `example_input_array`, the example input is taken from the first "
        f"training batch, but the default forward cannot feed it (it is {problem}; it runs `module(batch)` for a "
        "tensor, `module(batch[0])` for a tuple or list). Pass `forward_fn=lambda module, batch: "
        "module(batch['x'])` (with your batch's key), `example_input=`, or set `example_input_array` on the "
        "LightningModule."
    )


def _detached(value: Any) -> Any:
    return apply_to_collection(value, Tensor, lambda t: t.detach().clone().cpu())


def capture_inputs(pl_module: nn.Module, target: nn.Module, run: ForwardFn, source: Any, owner: str) -> tuple[Any, ...]:
    """The positional inputs ``target`` receives the first time ``run(pl_module, source)`` calls it, as CPU copies.

    The forward runs as a trial (`trial_forward`: no gradient, every module in eval mode, random states put back,
    nothing changed) and stops as soon as ``target`` is called.

    Raises:
        ValueError: when ``target`` is never called, or is called with keyword arguments.

    Examples:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> inputs = capture_inputs(net, net[2], lambda m, b: m(b), torch.ones(5, 3), "BNFoldExport")
        >>> len(inputs), inputs[0].shape
        (1, torch.Size([5, 4]))
    """
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append((_detached(args), dict(kwargs)))
        raise _Captured

    handle = target.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        trial_forward(pl_module, source, run, "eval")
    except _Captured:
        pass
    finally:
        handle.remove()
    if not seen:
        what = "the LightningModule" if target is pl_module else f"the submodule {type(target).__name__}"
        raise ValueError(
            f"{owner}: the example forward never called {what}, so its inputs are unknown. Pass `example_input=` "
            "(the exported module's input), `forward_fn=` (a forward that calls it), or name the submodule the "
            "forward calls with `module_name=`."
        )
    args, kwargs = seen[0]
    if kwargs:
        raise ValueError(
            f"{owner}: the exported module is called with keyword arguments {sorted(kwargs)}; the exported program "
            "takes positional inputs only. Pass `example_input=` (a tuple of its positional inputs)."
        )
    return args


def example_inputs(
    pl_module: nn.Module,
    target: nn.Module,
    *,
    example_input: Any,
    batch: Callable[[], Any],
    forward_fn: ForwardFn | None,
    owner: str,
) -> tuple[tuple[Any, ...], str]:
    """The export's example inputs and where they come from.

    ``example_input`` (the exported module's own input), else the LightningModule's ``example_input_array`` (its
    forward's input), else ``batch()`` (the first training batch) run through `batch_forward`. Inputs for a submodule
    are captured where the forward calls it.
    """
    if example_input is not None:
        inputs = example_input if isinstance(example_input, tuple) else (example_input,)
        return _detached(inputs), "example_input"
    array = getattr(pl_module, "example_input_array", None)
    if array is not None:
        if target is pl_module and not isinstance(array, dict):
            return _detached(array if isinstance(array, tuple) else (array,)), "example_input_array"

        def run(module: nn.Module, value: Any) -> Any:
            if isinstance(value, dict):
                return module(**value)
            return module(*value) if isinstance(value, tuple) else module(value)

        return capture_inputs(pl_module, target, run, array, owner), "example_input_array"
    first = batch()
    if first is None:
        raise ValueError(
            f"{owner}: no example input: `example_input` is None, the LightningModule has no "
            "`example_input_array` and there is no training batch to take one from. Pass `example_input=`."
        )
    error = unfeedable(first, owner) if forward_fn is None else None
    if error is not None:
        raise error
    return capture_inputs(pl_module, target, batch_forward(forward_fn), first, owner), "the first batch"


@torch.no_grad()
def eval_outputs(model: nn.Module, inputs: tuple[Any, ...]) -> Any:
    """``model``'s eval-mode outputs on ``inputs``, with every module's mode put back afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with own_forwards():
            return _detached(model(*inputs))
    finally:
        for m, flag in flags:
            m.training = flag


def on_cpu(model: nn.Module) -> nn.Module:
    """``model`` itself when every parameter and buffer is on the CPU, else a CPU copy (``model`` stays put)."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device.type == "cpu" for t in tensors):
        return model
    return copy.deepcopy(model).cpu()


@dataclass(frozen=True)
class FoldExportResult:
    """What one export wrote and how it was checked.

    Attributes:
        export: `export_folded`'s result (the path, the fold report, the in-process check's difference).
        inputs_from: where the example inputs came from (``"example_input"``, ``"example_input_array"`` or
            ``"the first batch"``).
        fresh_process_diff: the largest output difference of the program loaded in a fresh process with torch
            alone, against the trained model (``None`` when that check was off).
    """

    export: ExportResult
    inputs_from: str
    fresh_process_diff: float | None

    @property
    def path(self) -> Path:
        """The ``.pt2`` file."""
        return self.export.path

    def summary(self, owner: str) -> str:
        """One line: what was written, what was folded, and the checks' differences."""
        report = self.export.fold
        if report is None:
            folded = "BatchNorm not folded (fold=False)"
        else:
            kept = f"; kept: {', '.join(report.kept)}" if report.kept else ""
            folded = f"{len(report.folded)} of {len(report.decisions)} BatchNorm layer(s) folded{kept}"
        fresh = (
            f", {self.fresh_process_diff:.1e} in a fresh process with torch alone"
            if self.fresh_process_diff is not None
            else ""
        )
        return (
            f"{owner}: wrote {self.path} ({folded}; example inputs from {self.inputs_from}; largest output "
            f"difference to the trained model {self.export.max_abs_diff:.1e} reloaded here{fresh})."
        )


def export_and_check(
    target: nn.Module,
    inputs: tuple[Any, ...],
    inputs_from: str,
    path: Path,
    *,
    fold: bool,
    dynamic_batch: bool,
    fresh_process: bool,
) -> FoldExportResult:
    """Export a CPU copy of ``target`` (folded) to ``path`` and check the program against ``target``'s eval outputs.

    The check runs on ``inputs``: reloaded in this process (`export_folded`) and, with ``fresh_process``, in a new
    process with torch alone (`check_in_fresh_process`). ``target`` is not changed. With ``dynamic_batch``, inputs with
    a batch of one are traced as a batch of two (the sample twice): torch.export cannot make a size-1 dimension dynamic.
    """
    model = on_cpu(target)
    if dynamic_batch:  # torch.export specializes a batch of one: trace with two (the same sample twice)
        inputs = tuple(
            torch.cat([x, x]) if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == 1 else x for x in inputs
        )
    result = export_folded(model, inputs, path, fold=fold, dynamic_batch=dynamic_batch)
    fresh = check_in_fresh_process(result.path, inputs, eval_outputs(model, inputs)) if fresh_process else None
    return FoldExportResult(result, inputs_from, fresh)
