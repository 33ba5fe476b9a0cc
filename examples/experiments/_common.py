"""What every experiment script shares: command line, quiet Trainer, loss history, CSV, summary table, figure.

Each experiment is one script, ``examples/experiments/<name>.py``, run as ``python examples/experiments/<name>.py``.
It writes ``<name>.csv`` (one row per run), ``<name>_summary.md`` (mean +- std over seeds, included verbatim by the
docs page) and ``<name>.png`` into a scratch folder (``<tmp>/lightning-bnsgd-experiments``), into ``--out-dir``, or,
with ``--publish``, into ``docs/experiments`` (the published results). ``--smoke`` runs a tiny setting (CI runs every
script that way, into a temporary folder) so none of the scripts rots; it cannot be combined with ``--publish``.

The scripts use only public APIs: ``lightning_bnsgd``'s exports and Lightning's own namespace, taken from the class
our ``ConvNetClassifier`` subclasses (``pytorch_lightning`` or ``lightning.pytorch``), so that the Trainer, the
callbacks and the model always come from the same Lightning.
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from lightning_bnsgd import ConvNetClassifier, RecalibrationReport, recalibrate_bn

DOCS_EXPERIMENTS = Path(__file__).resolve().parents[2] / "docs" / "experiments"
SCRATCH = Path(tempfile.gettempdir()) / "lightning-bnsgd-experiments"


def lightning_namespace() -> ModuleType:
    """The Lightning namespace (``pytorch_lightning`` or ``lightning.pytorch``) of ``lightning_bnsgd``'s modules.

    A Trainer rejects a LightningModule of the other namespace, so the scripts take the Trainer and the callback
    base classes from the namespace ``ConvNetClassifier`` was built on.
    """
    for base in ConvNetClassifier.__mro__:
        top = base.__module__.partition(".")[0]
        if top == "pytorch_lightning":
            return importlib.import_module("pytorch_lightning")
        if top == "lightning":
            return importlib.import_module("lightning.pytorch")
    raise ImportError("ConvNetClassifier subclasses no Lightning LightningModule")


pl = lightning_namespace()
Callback = pl.Callback
Trainer = pl.Trainer


def parse_args(
    description: str | None,
    epochs: int,
    seeds: Sequence[int] = (0, 1, 2),
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: Sequence[str] | None = None,
) -> argparse.Namespace:
    """The shared command line: ``--seeds``, ``--epochs``, ``--smoke``, ``--out-dir`` or ``--publish``, ``--threads``.

    ``extra`` adds the script's own options. ``--smoke`` only sets ``args.smoke``; each script shrinks its own
    grid with it (one seed, one or two epochs).
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(seeds), help="seeds (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=epochs, help="training epochs (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true", help="tiny setting: checks that the script runs (CI)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out-dir", type=Path, default=None, help=f"where the CSV/summary/PNG go (default: {SCRATCH})")
    where.add_argument(
        "--publish", action="store_true", help=f"write the results into {DOCS_EXPERIMENTS} (the docs' copy)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    if args.smoke and args.publish:
        parser.error("--smoke results must not replace the published ones: drop --publish (or --smoke)")
    if args.smoke:
        args.seeds = args.seeds[:1]
    args.out_dir = DOCS_EXPERIMENTS if args.publish else (args.out_dir or SCRATCH)
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    print(f"results go to {args.out_dir}")
    return args


def quiet_trainer(max_epochs: int, callbacks: Iterable[Callback] = (), **kwargs: Any) -> Trainer:
    """A silent single-CPU Trainer: no logger, no checkpoints, no progress bar, no model summary."""
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "deterministic": True,
    }
    return Trainer(max_epochs=max_epochs, callbacks=list(callbacks), **{**defaults, **kwargs})


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch without Lightning's log line."""
    pl.seed_everything(seed, verbose=False)


class LossHistory(Callback):
    """Records the training loss of every optimizer step and the validation metrics of every epoch."""

    def __init__(self) -> None:
        self.train_loss: list[float] = []
        self.val: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.train_loss.append(float(loss))

    def on_validation_end(self, trainer: Trainer, pl_module: Any) -> None:
        # Not on_validation_epoch_end: callbacks run that hook before the module's, which logs val/acc.
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        self.val.append({k: float(v) for k, v in metrics.items() if k.startswith("val/")})


def quiet_lightning() -> None:
    """Silence Lightning's info lines and its warnings about dataloader workers (the data is in memory)."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning_utilities.core.rank_zero"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def accuracy(net: torch.nn.Module, loader: Iterable[Any]) -> float:
    """Top-1 accuracy of ``net`` over ``(images, labels)`` batches; puts ``net`` in eval mode."""
    net.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((net(x).argmax(dim=1) == y).sum())
            total += len(y)
    return correct / total


def recalibrated_copy(
    net: torch.nn.Module, batches: Iterable[Any], **kwargs: Any
) -> tuple[torch.nn.Module, RecalibrationReport]:
    """A deep copy of ``net`` with BatchNorm statistics recomputed by ``recalibrate_bn(copy, batches, **kwargs)``.

    The copy is put in train mode first (``recalibrate_bn`` leaves BatchNorm layers in eval mode alone); ``net``
    itself is untouched.
    """
    copied = copy.deepcopy(net).train()
    return copied, recalibrate_bn(copied, batches, **kwargs)


def finite_or_nan(value: float) -> float:
    """``value`` if finite, else NaN (a diverged run's loss is reported as NaN, not inf)."""
    return value if math.isfinite(value) else float("nan")


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Write ``rows`` (dicts with the same keys) as a CSV file."""
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value), ignoring NaN; (NaN, NaN) if all are NaN."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return float("nan"), float("nan")
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def summarize(
    rows: Sequence[dict[str, Any]],
    by: Sequence[str],
    values: Sequence[str],
    percent: Sequence[str] = (),
    digits: int = 2,
) -> str:
    """A markdown table: one line per distinct ``by`` tuple (in first-seen order), ``mean +- std (n)`` per value.

    Columns named in ``percent`` are shown x100 (accuracies as %). The run count ``n`` counts runs with a finite
    value, so diverged runs show as a lower ``n``.
    """
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in by), []).append(row)
    header = [*by, *values, "runs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, group in groups.items():
        cells = [str(k) for k in key]
        for name in values:
            scale = 100.0 if name in percent else 1.0
            mean, std = mean_std([float(r[name]) * scale for r in group])
            cells.append("diverged" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}")
        cells.append(str(len(group)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(table: str, path: Path, command: str) -> None:
    """Write the summary table followed by the command that produced it."""
    path.write_text(f"{table}\nProduced by `{command}`.\n")


def command_line() -> str:
    """The command that ran this script, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    root = Path(__file__).resolve().parents[2]
    if script.is_relative_to(root):
        script = script.relative_to(root)
    return " ".join(["python", str(script), *sys.argv[1:]])


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.6) -> tuple[Any, Any]:
    """A matplotlib figure (non-interactive Agg backend) with ``nrows x ncols`` axes."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)


def save_figure(fig: Any, path: Path) -> None:
    """Save ``fig`` as a PNG (tight layout, 120 dpi) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class Timer:
    """Wall time of the whole script, printed at the end: ``with Timer("name"): ...``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        print(f"{self.name}: {time.perf_counter() - self.start:.1f} s")
