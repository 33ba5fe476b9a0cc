"""Overhead of ``WeightDynamicsMonitor``: fit time with the monitor divided by fit time without it.

Three arms are timed on each model, interleaved (the order rotates every repeat) and summarized by the median:

* ``off``: no monitor;
* ``default``: ``WeightDynamicsMonitor()`` at its default interval, the Trainer's ``log_every_n_steps``
  (``--log-every``, default 50 as in Lightning);
* ``every step``: ``WeightDynamicsMonitor(log_every_n_steps=1)``, the worst case.

Every arm logs to a ``CSVLogger``; validation and checkpointing are off, so the only difference between arms is
the monitor. The monitor's one-off cost (probing scale invariance at the first step) is included. Models:

* ``digits``: the packaged digits job (``ConvNetClassifier`` with ``channels=[32, 64]``, ``padding="same"``,
  ``DigitsDataModule(batch_size=64)``: 20 steps per epoch);
* ``deep``: 12 Conv-BN-ReLU blocks of 16 channels on the same 8x8 digits (12 scale-invariant convolutions),
  the same Trainer settings.

Wall time and process CPU time are both recorded (other processes on a shared machine inflate wall time at
random; CPU time counts only this process). The monitor also adds up the time spent in its own hooks
(``TimedMonitor``), a far less noisy estimate of the ratio: ``1 + time in the monitor / time outside it``.
The script prints the ratios; it asserts nothing.

    python benchmarks/dynamics.py                  # 5 repeats of 10 epochs (200 steps), interval 50
    python benchmarks/dynamics.py --quick          # 3 repeats of 3 epochs
    python benchmarks/dynamics.py --log-every 10   # the Trainer interval of configs/digits.yaml
"""

from __future__ import annotations

from _overhead import main, timed_hooks

from lightning_bnsgd.callbacks.dynamics_monitor import WeightDynamicsMonitor

#: ``WeightDynamicsMonitor`` that also adds up the wall time spent in its own hooks.
TimedMonitor = timed_hooks(
    WeightDynamicsMonitor, ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end")
)


if __name__ == "__main__":
    main(__doc__, TimedMonitor)
