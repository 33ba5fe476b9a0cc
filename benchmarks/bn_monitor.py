"""Overhead of ``BNStatsMonitor``: fit time with the monitor divided by fit time without it.

Three arms are timed on each model, interleaved (the order rotates every repeat) and summarized by the median:

* ``off``: no monitor;
* ``default``: ``BNStatsMonitor()`` at its default interval, the Trainer's ``log_every_n_steps``
  (``--log-every``, default 50 as in Lightning);
* ``every step``: ``BNStatsMonitor(log_every_n_steps=1)``, the worst case.

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
    python benchmarks/bn_monitor.py --log-every 25   # the monitor's interval in configs/digits.yaml
"""

from __future__ import annotations

import time
from typing import Any

from _overhead import main, timed_hooks
from torch import nn

from lightning_bnsgd.callbacks.bn_monitor import BNStatsMonitor


class TimedMonitor(timed_hooks(BNStatsMonitor, ("on_train_batch_start", "on_train_batch_end"))):  # type: ignore[misc]
    """``BNStatsMonitor`` that also adds up the wall time spent in its own hooks (callback and forward hooks)."""

    def _make_hook(self, layer: Any, keep_running: bool) -> Any:
        hook = super()._make_hook(layer, keep_running)

        def timed(module: nn.Module, args: tuple[Any, ...]) -> None:
            start = time.perf_counter()
            hook(module, args)
            self.seconds += time.perf_counter() - start

        return timed


if __name__ == "__main__":
    main(__doc__, TimedMonitor)
