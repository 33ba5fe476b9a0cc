"""``export_folded``: fold BatchNorm away and write the model as a ``torch.export`` program (``.pt2``), which loads
with torch alone (``torch.export.load(path).module()``), without this package or the model's own code."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_bnsgd.bn.fold import FoldReport, fold_batchnorm, output_difference


@dataclass(frozen=True)
class ExportResult:
    """What `export_folded` wrote.

    Attributes:
        path: the ``.pt2`` file.
        fold: the `FoldReport` of the BatchNorm folding (every layer kept when ``fold=False``).
        max_abs_diff: the largest output difference between the reloaded program and the unfolded eval model on
            the example inputs.
    """

    path: Path
    fold: FoldReport | None
    max_abs_diff: float


@torch.no_grad()
def export_folded(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    fold: bool = True,
    dynamic_batch: bool = True,
) -> ExportResult:
    """Fold the BatchNorm layers of an eval copy of ``model`` (`fold_batchnorm`), export it with ``torch.export``
    and save it to ``path``; then load the file back and check that it gives the unfolded eval model's outputs.

    ``model`` is not changed. The program takes the same positional inputs as ``model``; with ``dynamic_batch``
    the first dimension of every input tensor is dynamic (any batch size of 2 or more; torch.export specializes
    sizes 0 and 1), else the shapes are those of ``example_inputs``.

    Args:
        model: the trained model (its running statistics are what the folded layers take up).
        example_inputs: one forward's input: a tensor, or a tuple of the forward's positional arguments.
        path: where to write the program (conventionally ``*.pt2``); parent folders are created.
        fold: fold BatchNorm first (``False`` exports the eval model as it is).
        dynamic_batch: make the batch dimension dynamic.

    Returns:
        An `ExportResult`.

    Raises:
        RuntimeError: when the reloaded program's outputs differ from the model's beyond float32 rounding (the
            tolerance of `fold_batchnorm`'s check).

    Examples:
        >>> import tempfile
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     result = export_folded(net, torch.randn(4, 1, 6, 6), f"{tmp}/net.pt2")
        ...     program = torch.export.load(result.path).module()
        ...     program(torch.randn(9, 1, 6, 6)).shape
        torch.Size([9, 3])
        >>> result.fold.folded
        ['1']
    """
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if fold:
        folded, report = fold_batchnorm(model, inputs)
    else:
        folded, report = copy.deepcopy(model).eval(), None
    dynamic: Any = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic = tuple({0: batch} if isinstance(x, Tensor) and x.dim() > 0 else None for x in inputs)
    program = torch.export.export(folded, inputs, dynamic_shapes=dynamic)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, target)
    reloaded = torch.export.load(target).module()
    worst = output_difference(copy.deepcopy(model).eval(), reloaded, [inputs])
    if worst is None:
        raise RuntimeError(
            f"export_folded: the exported program at {target} gives other outputs than the model on the example "
            f"inputs (allowed: {FoldReport().tolerance})."
        )
    return ExportResult(target, report, worst)


__all__ = ["ExportResult", "export_folded"]
