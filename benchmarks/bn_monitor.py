"""Overhead of ``BNStatsMonitor``: fit time with the monitor divided by fit time without it.

Three arms are timed on each model, interleaved (the order rotates every repeat) and summarized by the median:

* ``off``: no monitor;
* ``default``: ``BNStatsMonitor()`` at its default interval, the Trainer's ``log_every_n_steps``
  (``--log-every``, default 50 as in Lightning);
* ``every step``: ``BNStatsMonitor(logging_interval=1)``, the worst case.

Every arm logs to a ``CSVLogger`` (the monitor needs a logger to log anything; the model's own metrics go
there too), validation and checkpointing are off, so the only difference between arms is the monitor. Models:

* ``digits``: the packaged digits job (``ConvNetClassifier`` with ``channels=[32, 64]``, ``padding="same"``,
  ``DigitsDataModule(batch_size=64)``: 20 steps per epoch);
* ``deep``: 12 Conv-BN-ReLU blocks of 16 channels on the same 8x8 digits (12 BatchNorm layers), the same
  Trainer settings.

Both wall time and process CPU time are recorded: on a shared machine other processes inflate wall time
at random, while CPU time counts only this process's work. Torch runs on ``--threads`` threads (default 1) for
the same reason. The monitor also times its own hooks (``TimedMonitor``), which
gives a second, far less noisy estimate of the ratio: ``1 + time in the monitor / time outside it``. The script prints
the ratios and the monitor's cost per monitored step; it asserts nothing.

    python benchmarks/bn_monitor.py                  # 5 repeats of 10 epochs (200 steps), interval 50
    python benchmarks/bn_monitor.py --quick          # 3 repeats of 3 epochs (under a minute on 2 CPU cores)
    python benchmarks/bn_monitor.py --log-every 10   # the interval of configs/digits.yaml
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_bnsgd._compat import Trainer, loggers
from lightning_bnsgd.callbacks.bn_monitor import BNStatsMonitor
from lightning_bnsgd.data.digits import DigitsDataModule
from lightning_bnsgd.models.classifier import ConvNetClassifier

ARMS = ("off", "default", "every step")


class TimedMonitor(BNStatsMonitor):
    """``BNStatsMonitor`` that also adds up the wall time spent in its own hooks (callback and forward hooks)."""

    def __init__(self, logging_interval: int | None = None) -> None:
        super().__init__(logging_interval=logging_interval)
        self.seconds = 0.0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        start = time.perf_counter()
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.seconds += time.perf_counter() - start

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        start = time.perf_counter()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.seconds += time.perf_counter() - start

    def _make_hook(self, layer: Any, keep_running: bool) -> Any:
        hook = super()._make_hook(layer, keep_running)

        def timed(module: nn.Module, args: tuple[Any, ...]) -> None:
            start = time.perf_counter()
            hook(module, args)
            self.seconds += time.perf_counter() - start

        return timed


def deep_net(depth: int = 12, width: int = 16, num_classes: int = 10) -> nn.Module:
    """``depth`` Conv-BN-ReLU blocks (padding same) on 1x8x8 inputs, then 2x2 pooling and a linear head."""
    layers: list[nn.Module] = []
    prev = 1
    for _ in range(depth):
        layers += [
            nn.Conv2d(prev, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        prev = width
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(width * 4, num_classes)]
    return nn.Sequential(*layers)


def make_digits_model() -> ConvNetClassifier:
    return ConvNetClassifier(input_size=8, channels=(32, 64), padding="same")


def make_deep_model() -> ConvNetClassifier:
    return ConvNetClassifier(input_size=8, net=deep_net())


def fit_seconds(
    make_model: Callable[[], ConvNetClassifier], arm: str, epochs: int, log_every: int
) -> tuple[float, float, float, int]:
    """Wall time, process CPU time, the monitor's own time and the optimizer steps of one ``trainer.fit``."""
    torch.manual_seed(0)
    model = make_model()
    data = DigitsDataModule(batch_size=64)
    callbacks: list[TimedMonitor] = []
    if arm == "default":
        callbacks.append(TimedMonitor())
    elif arm == "every step":
        callbacks.append(TimedMonitor(logging_interval=1))
    with tempfile.TemporaryDirectory() as root:
        trainer = Trainer(
            accelerator="auto",
            devices=1,
            max_epochs=epochs,
            log_every_n_steps=log_every,
            logger=loggers.CSVLogger(root, name="bench"),
            callbacks=callbacks,
            limit_val_batches=0,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
        )
        start, start_cpu = time.perf_counter(), time.process_time()
        trainer.fit(model, data)
        wall = time.perf_counter() - start
        own = callbacks[0].seconds if callbacks else 0.0
        return wall, time.process_time() - start_cpu, own, trainer.global_step


def bench(name: str, make_model: Callable[[], ConvNetClassifier], repeats: int, epochs: int, log_every: int) -> None:
    wall: dict[str, list[float]] = {arm: [] for arm in ARMS}
    cpu: dict[str, list[float]] = {arm: [] for arm in ARMS}
    own: dict[str, list[float]] = {arm: [] for arm in ARMS}
    steps = 0
    fit_seconds(make_model, "off", 1, log_every)  # warm-up: imports, allocator, data loading
    for r in range(repeats):
        order = ARMS[r % len(ARMS) :] + ARMS[: r % len(ARMS)]
        for arm in order:
            w, c, o, steps = fit_seconds(make_model, arm, epochs, log_every)
            wall[arm].append(w)
            cpu[arm].append(c)
            own[arm].append(o / (w - o))
    print(f"\n{name}: {steps} optimizer steps per fit, log_every_n_steps={log_every}, {repeats} repeats")
    for label, times in (("wall", wall), ("cpu", cpu)):
        off = statistics.median(times["off"])
        for arm in ARMS:
            med = statistics.median(times[arm])
            runs = ", ".join(f"{t:.2f}" for t in times[arm])
            print(f"  {label:>4} {arm:>10}: median {med:7.3f} s  ratio to off {med / off:6.3f}  runs [{runs}]")
        extra_ms = (statistics.median(times["every step"]) - off) / max(steps, 1) * 1e3
        print(f"  {label:>4} monitor cost per monitored step (every-step arm): {extra_ms:.2f} ms")
    for arm in ARMS[1:]:
        share = statistics.median(own[arm])
        print(f"  time inside the monitor's hooks, {arm:>10}: ratio {1 + share:6.4f} (1 + own time / rest of fit)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 repeats of 3 epochs")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument(
        "--log-every", type=int, default=50, help="Trainer log_every_n_steps = the default interval (digits config: 10)"
    )
    parser.add_argument("--models", nargs="+", default=["digits", "deep"], choices=["digits", "deep"])
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)
    epochs = args.epochs or (3 if args.quick else 10)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, epochs per fit {epochs}")
    makers = {"digits": make_digits_model, "deep": make_deep_model}
    for name in args.models:
        bench(name, makers[name], repeats, epochs, args.log_every)


if __name__ == "__main__":
    main()
