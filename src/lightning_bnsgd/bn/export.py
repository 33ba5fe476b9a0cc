"""``export_folded``: fold BatchNorm away and write the model as a ``torch.export`` program (``.pt2``).

The program loads with torch alone (``torch.export.load(path).module()``), without this package or the model's own code.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_bnsgd.bn.fold import ATOL, RTOL, FoldReport, fold_batchnorm, output_difference


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
    """Fold the BatchNorm layers of an eval copy of ``model``, export it with ``torch.export`` and save it to ``path``.

    The fold is `fold_batchnorm`'s. Then the file is loaded back and checked to give the unfolded eval model's outputs.

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


#: The script `check_in_fresh_process` runs: torch alone loads the program, runs the inputs and compares the outputs.
FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    path, data, rtol, atol = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    program = torch.export.load(path).module()
    inputs, expected = torch.load(data, weights_only=True)
    def flat(value):
        if isinstance(value, dict):
            return [t for v in value.values() for t in flat(v)]
        if isinstance(value, (tuple, list)):
            return [t for v in value for t in flat(v)]
        return [value] if isinstance(value, torch.Tensor) else []
    with torch.no_grad():
        outs = flat(program(*inputs))
    assert len(outs) == len(expected), f"{len(outs)} output tensor(s), expected {len(expected)}"
    worst = 0.0
    for a, e in zip(outs, expected):
        assert a.shape == e.shape, f"output shape {tuple(a.shape)}, expected {tuple(e.shape)}"
        a, e = a.double(), e.double()
        diff = (a - e).abs()
        if diff.numel():
            bound = rtol * e.abs() + atol * float(e.abs().max().clamp(min=1.0))
            assert bool((diff <= bound).all()), f"largest difference {float(diff.max()):.3e} is outside the tolerance"
            worst = max(worst, float(diff.max()))
    imported = sorted(m for m in sys.modules if m.split(".")[0] == "lightning_bnsgd")
    assert not imported, f"loading the program imported {imported}"
    print(worst)
    """
)


def _as_outputs(value: Any) -> list[Tensor]:
    """The tensors of a model's output, depth-first through dicts (in key order), tuples and lists."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _as_outputs(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _as_outputs(v)]
    return []


def check_in_fresh_process(
    path: str | os.PathLike[str], example_inputs: Any, expected: Any, *, timeout: float = 300.0
) -> float:
    """Load the program at ``path`` in a new Python process that imports torch alone, and check its outputs.

    The process (``sys.executable``) runs the program on ``example_inputs`` and checks its outputs against ``expected``
    within `fold_batchnorm`'s tolerance.

    The process fails the check if it imports ``lightning_bnsgd`` (the program must not need this package).

    Args:
        path: a program written by `export_folded` (or ``torch.export.save``).
        example_inputs: a tensor, or a tuple of the program's positional input tensors.
        expected: the outputs the program must give (a tensor, or tensors in tuples, lists, dicts), e.g. the
            trained eval model's outputs on ``example_inputs``.
        timeout: seconds the process may take.

    Returns:
        The largest absolute output difference.

    Raises:
        RuntimeError: when the process fails (the file does not load, an output differs beyond the tolerance, or
            it imported this package), with the process's error output.

    Examples:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> x = torch.randn(6, 3)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     result = export_folded(net, x, f"{tmp}/net.pt2")
        ...     worst = check_in_fresh_process(result.path, x, net.eval()(x))
        >>> worst < 1e-4
        True
    """
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    outputs = [t.detach().cpu() for t in _as_outputs(expected)]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "io.pt"
        torch.save(([x.detach().cpu() if isinstance(x, Tensor) else x for x in inputs], outputs), data)
        command = [sys.executable, "-c", FRESH_PROCESS_SCRIPT, str(Path(path).resolve()), str(data), repr(RTOL)]
        command.append(repr(ATOL))
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=tmp)
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"check_in_fresh_process: loading {path} took more than {timeout} s.") from err
    if done.returncode != 0:
        raise RuntimeError(
            f"check_in_fresh_process: a fresh Python process with torch alone could not reproduce the outputs of "
            f"{path} (allowed: {FoldReport().tolerance}):\n{done.stderr.strip()[-3000:]}"
        )
    return float(done.stdout.strip().splitlines()[-1])


__all__ = ["FRESH_PROCESS_SCRIPT", "ExportResult", "check_in_fresh_process", "export_folded"]
