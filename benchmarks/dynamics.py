"""Overhead of ``WeightDynamicsMonitor``: fit time with the monitor divided by fit time without it, in one process.

``resnet18`` (the default) is a ResNet-18 in torchvision's layout, from `_models.py` (``BasicBlock``, ``[2, 2, 2, 2]``,
64 to 512 channels, 7x7 stem and max pooling, 1000 classes; torchvision's own is used when it imports), fit with
``SGD(lr=0.1, momentum=0.9, weight_decay=1e-4)`` on random ``3 x S x S`` images (``--image-size``, default 64),
``--batch-size`` 32. Its arms, timed interleaved (the order rotates every repeat), summarized by the median:

* ``off``: no monitor;
* ``default``: ``WeightDynamicsMonitor()`` at its default interval, the Trainer's ``log_every_n_steps`` (50);
* ``every 5``: ``WeightDynamicsMonitor(log_every_n_steps=5)``, the interval of the report in issue 24.

Every arm logs the loss with ``self.log`` to a ``CSVLogger``; validation and checkpointing are off, so the only
difference between arms is the monitor. Wall time and process CPU time are recorded (other processes on a shared
machine inflate wall time at random; CPU time counts only this process), and the monitor adds up the time spent in
its hooks in process CPU time, split into the one-off probe (at the first step) and the rest: ``1 + own CPU time /
CPU time of the rest of the fit`` is the least noisy estimate of the ratio. The script prints; it asserts nothing.

``--models digits deep`` runs the small models of ``_overhead.py`` (the packaged digits job, 12 Conv-BN-ReLU
blocks) with that harness instead.

    python benchmarks/dynamics.py                          # resnet18: 3 repeats of 100 steps at 64x64
    python benchmarks/dynamics.py --steps 20 --repeats 3   # the 20-step fit of the report
    python benchmarks/dynamics.py --models digits deep     # the small models, interval 50
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from typing import Any

import _overhead
import torch
import torch.nn.functional as F
from _models import resnet18
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bnsgd._compat import LightningModule, Trainer, loggers
from lightning_bnsgd.callbacks.dynamics_monitor import WeightDynamicsMonitor


class TimedMonitor(WeightDynamicsMonitor):
    """``WeightDynamicsMonitor`` that adds up the wall time (``seconds``) and the process CPU time (``cpu_seconds``)
    of its hooks, and of its one-off probe (``probe_seconds``, ``probe_cpu_seconds``). CPU time counts only this
    process, so other processes on a shared machine barely move it."""

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        super().__init__(log_every_n_steps=log_every_n_steps)
        self.seconds = self.cpu_seconds = self.probe_seconds = self.probe_cpu_seconds = 0.0

    def _timed(self, hook: Any, *args: Any) -> None:
        start, start_cpu = time.perf_counter(), time.process_time()
        hook(*args)
        self.seconds += time.perf_counter() - start
        self.cpu_seconds += time.process_time() - start_cpu

    def on_train_batch_start(self, *args: Any) -> None:
        self._timed(super().on_train_batch_start, *args)

    def on_before_optimizer_step(self, *args: Any) -> None:
        self._timed(super().on_before_optimizer_step, *args)

    def on_train_batch_end(self, *args: Any) -> None:
        self._timed(super().on_train_batch_end, *args)

    def _detect(self, pl_module: Any) -> None:
        start, start_cpu = time.perf_counter(), time.process_time()
        super()._detect(pl_module)
        self.probe_seconds += time.perf_counter() - start
        self.probe_cpu_seconds += time.process_time() - start_cpu


class Classifier(LightningModule):
    """A user's ImageNet module: ``self(x)``, cross-entropy logged with ``self.log``, SGD with weight decay."""

    def __init__(self, net: nn.Module, data: TensorDataset, batch_size: int) -> None:
        super().__init__()
        self.net, self.data, self.batch_size = net, data, batch_size

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)


ARMS = {"off": None, "default": 0, "every 5": 5}


def fit_once(arm: str, args: argparse.Namespace) -> dict[str, float]:
    """Wall time, process CPU time, the monitor's hook time and probe time of one fit of ``args.steps`` steps."""
    torch.manual_seed(0)
    size = args.image_size
    count = args.batch_size * 4
    data = TensorDataset(torch.randn(count, 3, size, size), torch.randint(0, 1000, (count,)))
    model = Classifier(resnet18()[0], data, args.batch_size)
    interval = ARMS[arm]
    monitor = None if interval is None else TimedMonitor(log_every_n_steps=interval or None)
    with tempfile.TemporaryDirectory() as root:
        trainer = Trainer(
            accelerator="auto",
            devices=1,
            max_steps=args.steps,
            log_every_n_steps=50,
            logger=loggers.CSVLogger(root, name="bench"),
            callbacks=[monitor] if monitor else [],
            limit_val_batches=0,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
        )
        start, start_cpu = time.perf_counter(), time.process_time()
        trainer.fit(model)
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    if monitor is None:
        return {"wall": wall, "cpu": cpu, "own": 0.0, "probe": 0.0}
    return {"wall": wall, "cpu": cpu, "own": monitor.cpu_seconds, "probe": monitor.probe_cpu_seconds}


def bench_resnet18(args: argparse.Namespace) -> None:
    """Time the arms interleaved; print medians, ratios to ``off`` and the monitor's own time."""
    print(f"resnet18: {resnet18()[1]}, {args.steps} steps of {args.batch_size} x 3x{args.image_size}x{args.image_size}")
    runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    names = list(ARMS)
    fit_once("default", argparse.Namespace(**{**vars(args), "steps": 2}))  # warm-up: allocator, data loading
    for r in range(args.repeats):
        for arm in names[r % len(names) :] + names[: r % len(names)]:
            runs[arm].append(fit_once(arm, args))
    for label in ("wall", "cpu"):
        off = statistics.median(run[label] for run in runs["off"])
        for arm in names:
            times = [run[label] for run in runs[arm]]
            med = statistics.median(times)
            listed = ", ".join(f"{t:.2f}" for t in times)
            print(f"  {label:>4} {arm:>8}: median {med:8.3f} s  ratio to off {med / off:6.3f}  runs [{listed}]")
    step = statistics.median(run["cpu"] for run in runs["off"]) / args.steps
    print(f"  CPU time of one training step without the monitor: {step * 1e3:.0f} ms")
    for arm in names[1:]:
        own = statistics.median(run["own"] / (run["cpu"] - run["own"]) for run in runs[arm])
        probe = statistics.median(run["probe"] for run in runs[arm])
        rest = statistics.median(run["own"] - run["probe"] for run in runs[arm])
        logged = args.steps // (ARMS[arm] or 50)
        each = rest / max(logged, 1)
        per_step = f", {each * 1e3:.0f} ms per logged step ({logged}: {each / step:.3f} steps)"
        print(
            f"  CPU time inside the monitor, {arm:>8}: ratio {1 + own:6.4f} (1 + own time / rest of the fit); "
            f"probe {probe * 1e3:.0f} ms ({probe / step:.2f} steps){per_step if logged else ''}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18"], choices=["resnet18", *_overhead.MODELS])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help="resnet18: optimizer steps per fit")
    parser.add_argument("--image-size", type=int, default=64, help="resnet18: the side of the random images")
    parser.add_argument("--batch-size", type=int, default=32, help="resnet18: batch size")
    parser.add_argument("--epochs", type=int, default=10, help="digits, deep: epochs per fit")
    parser.add_argument("--log-every", type=int, default=50, help="digits, deep: Trainer log_every_n_steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # Lightning's per-fit notices would bury the results
    for name in ("lightning.pytorch", "pytorch_lightning", "lightning_bnsgd"):
        logging.getLogger(name).setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for name in args.models:
        if name == "resnet18":
            bench_resnet18(args)
        else:
            _overhead.bench(name, _overhead.MODELS[name], TimedMonitor, args.repeats, args.epochs, args.log_every)


if __name__ == "__main__":
    main()
