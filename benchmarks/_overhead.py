"""The harness the monitor overhead benchmarks share (``bn_monitor.py``, ``dynamics.py``).

Each benchmark passes a monitor class whose instances add up the time spent in their own hooks in ``seconds``;
three arms are timed per model, interleaved (the order rotates every repeat) and summarized by the median:
``off`` (no monitor), ``default`` (the monitor at its default interval, the Trainer's ``log_every_n_steps``) and
``every step`` (``log_every_n_steps=1``). Wall time, process CPU time and the monitor's own time are recorded.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_bnsgd import ConvNetClassifier, DigitsDataModule
from lightning_bnsgd._compat import Trainer, loggers

ARMS = ("off", "default", "every step")
MakeMonitor = Callable[..., Any]


def timed_hooks(monitor: type, hooks: tuple[str, ...]) -> type:
    """A subclass of ``monitor`` whose callback ``hooks`` add their wall time to ``self.seconds``."""

    def timed(name: str) -> Callable[..., Any]:
        def hook(self: Any, *args: Any) -> None:
            start = time.perf_counter()
            getattr(super(subclass, self), name)(*args)
            self.seconds += time.perf_counter() - start

        return hook

    def __init__(self: Any, log_every_n_steps: int | None = None) -> None:
        monitor.__init__(self, log_every_n_steps=log_every_n_steps)
        self.seconds = 0.0

    namespace: dict[str, Any] = {name: timed(name) for name in hooks}
    namespace["__init__"] = __init__
    subclass = type(f"Timed{monitor.__name__}", (monitor,), namespace)
    return subclass


def deep_net(depth: int = 12, width: int = 16, num_classes: int = 10) -> nn.Module:
    """``depth`` Conv-BN-ReLU blocks (padding same) on 1x8x8 inputs, then 2x2 pooling and a linear head."""
    layers: list[nn.Module] = []
    prev = 1
    for _ in range(depth):
        layers += [nn.Conv2d(prev, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        prev = width
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(width * 4, num_classes)]
    return nn.Sequential(*layers)


MODELS: dict[str, Callable[[], ConvNetClassifier]] = {
    "digits": lambda: ConvNetClassifier(input_size=8, channels=(32, 64), padding="same"),
    "deep": lambda: ConvNetClassifier(input_size=8, net=deep_net()),
}


def fit_seconds(
    make_model: Callable[[], ConvNetClassifier], make_monitor: MakeMonitor, arm: str, epochs: int, log_every: int
) -> tuple[float, float, float, int]:
    """Wall time, process CPU time, the monitor's own time and the optimizer steps of one ``trainer.fit``."""
    torch.manual_seed(0)
    model = make_model()
    callbacks: list[Any] = []
    if arm == "default":
        callbacks.append(make_monitor())
    elif arm == "every step":
        callbacks.append(make_monitor(log_every_n_steps=1))
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
        trainer.fit(model, DigitsDataModule(batch_size=64))
        wall = time.perf_counter() - start
        own = callbacks[0].seconds if callbacks else 0.0
        return wall, time.process_time() - start_cpu, own, trainer.global_step


def bench(
    name: str, make_model: Callable[[], ConvNetClassifier], make_monitor: MakeMonitor, repeats: int, epochs: int,
    log_every: int,
) -> None:  # fmt: skip
    """Time the three arms on one model and print medians and ratios to ``off``."""
    wall: dict[str, list[float]] = {arm: [] for arm in ARMS}
    cpu: dict[str, list[float]] = {arm: [] for arm in ARMS}
    own: dict[str, list[float]] = {arm: [] for arm in ARMS}
    steps = 0
    fit_seconds(make_model, make_monitor, "default", 1, log_every)  # warm-up: imports, allocator, data loading
    for r in range(repeats):
        for arm in ARMS[r % len(ARMS) :] + ARMS[: r % len(ARMS)]:
            w, c, o, steps = fit_seconds(make_model, make_monitor, arm, epochs, log_every)
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


def main(description: str, make_monitor: MakeMonitor) -> None:
    """The command line both benchmarks share."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 repeats of 3 epochs")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument(
        "--log-every", type=int, default=50, help="Trainer log_every_n_steps = the monitor's default interval"
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)
    epochs = args.epochs or (3 if args.quick else 10)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # Lightning's per-fit notices would bury the results
    for name in ("lightning.pytorch", "pytorch_lightning", "lightning_bnsgd"):
        logging.getLogger(name).setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, epochs per fit {epochs}")
    for name in args.models:
        bench(name, MODELS[name], make_monitor, repeats, epochs, args.log_every)
