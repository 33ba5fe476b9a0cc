"""Plot per-step learning rates of ``SGDWarmup`` / ``WarmupLR`` to PNG files.

Two uses:

* ``python examples/plot_lr_schedule.py --shapes-dir docs/img`` draws every warmup shape and every decay shape
  (``lr_warmup_shapes.png``, ``lr_decay_shapes.png``);
* ``python examples/plot_lr_schedule.py --config my.yaml --out lr.png [--trainer.max_epochs 15 ...]``
  draws the LR of every param group at every optimizer step of a ``lightning-bnsgd fit`` config. The LR is
  read from the real ``WarmupLR`` that ``configure_optimizers`` builds for that config's Trainer, data and
  model (so epochs, devices, gradient accumulation and the LR scaling rule are all accounted for); no
  training step runs. Extra arguments are passed to the ``lightning-bnsgd`` CLI as overrides.

Needs matplotlib (``pip install lightning-bnsgd[plots]``).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from lightning_bnsgd._compat import Callback
from lightning_bnsgd.cli import cli_main
from lightning_bnsgd.optim.schedule import DECAY_SHAPES, WARMUP_SHAPES, WarmupLR

STEPS, WARMUP = 100, 20


def schedule_curve(steps: int = STEPS, **kwargs: Any) -> list[float]:
    """The LR (base LR 1.0) of each step ``0 .. steps + 9`` of a ``WarmupLR`` with ``total_steps=steps``."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = WarmupLR(optimizer, total_steps=steps, **kwargs)
    return [scheduler.factor(t) for t in range(steps + 10)]


def plot_shapes(out_dir: Path) -> list[Path]:
    """Draw the warmup shapes and the decay shapes; return the two PNG paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for shape in WARMUP_SHAPES:
        curve = schedule_curve(warmup_steps=WARMUP, warmup=shape, decay="constant", warmup_start_factor=0.1)
        ax.plot(curve[: 2 * WARMUP], label=f'warmup="{shape}"', marker=".", markersize=3)
    ax.plot(schedule_curve(warmup_steps=0, decay="constant")[: 2 * WARMUP], label="warmup_steps=0", ls=":")
    ax.axvline(WARMUP, color="grey", lw=0.8, ls="--")
    ax.set(
        xlabel="optimizer step",
        ylabel="LR / base LR",
        title=f"Warmup shapes (warmup_steps={WARMUP}, warmup_start_factor=0.1)",
    )
    ax.legend()
    warm_path = out_dir / "lr_warmup_shapes.png"
    fig.tight_layout()
    fig.savefig(warm_path, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for shape in DECAY_SHAPES:
        curve = schedule_curve(
            warmup_steps=WARMUP,
            decay=shape,
            min_lr=0.05,
            power=2.0,
            gamma=0.5,
            step_size=20.0 if shape == "step" else 15.0,
            milestones=[50, 75],
        )
        ax.plot(curve, label=f'decay="{shape}"')
    ax.axvline(STEPS, color="grey", lw=0.8, ls="--")
    ax.set(
        xlabel="optimizer step",
        ylabel="LR / base LR",
        title=f"Decay shapes (linear warmup {WARMUP} steps, total_steps={STEPS}, min_lr=0.05, gamma=0.5)",
    )
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    decay_path = out_dir / "lr_decay_shapes.png"
    fig.tight_layout()
    fig.savefig(decay_path, dpi=110)
    plt.close(fig)
    return [warm_path, decay_path]


class _Captured(Exception):
    """Raised at fit start once the scheduler is known, so that no training step runs."""


class _CaptureSchedule(Callback):
    def __init__(self) -> None:
        self.curves: dict[str, list[float]] = {}
        self.steps_per_epoch: int | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        config = trainer.lr_scheduler_configs[0]
        scheduler = config.scheduler
        name = config.name or "lr"
        for i, (group, base) in enumerate(zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True)):
            label = f"{name}/{group.get('name', f'pg{i + 1}')}"
            self.curves[label] = [float(base) * scheduler.factor(t) for t in range(scheduler.total_steps)]
        raise _Captured


def config_curves(cli_args: Sequence[str]) -> dict[str, list[float]]:
    """Per-step LR of each param group for a ``lightning-bnsgd fit`` configuration (no training step runs)."""
    capture = _CaptureSchedule()
    with tempfile.TemporaryDirectory() as tmp:
        cli = cli_main(
            [*cli_args, "--trainer.logger", "false", "--trainer.default_root_dir", tmp],
            run=False,
        )
        cli.trainer.callbacks.append(capture)
        with contextlib.suppress(_Captured):
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if not capture.curves:
        raise RuntimeError("The configuration did not build a learning-rate scheduler.")
    return capture.curves


def plot_config(cli_args: Sequence[str], out: Path, title: str) -> dict[str, list[float]]:
    """Draw the per-step LR of a configuration to ``out``; return the curves."""
    curves = config_curves(cli_args)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for (label, lrs), style in zip(curves.items(), itertools.cycle(["-", "--", ":", "-."]), strict=False):
        ax.plot(lrs, label=label, lw=1.5, ls=style)
    ax.set(xlabel="optimizer step", ylabel="learning rate", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return curves


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes-dir", type=Path, help="draw all warmup and decay shapes into this folder")
    parser.add_argument("--config", type=Path, help="a lightning-bnsgd fit YAML config to draw")
    parser.add_argument("--out", type=Path, default=Path("lr_schedule.png"), help="PNG for --config")
    parser.add_argument("--title", default="Per-step learning rate", help="title of the --config plot")
    args, overrides = parser.parse_known_args(argv)
    if args.shapes_dir is None and args.config is None and not overrides:
        parser.error("give --shapes-dir, --config, or CLI arguments describing a run")
    if args.shapes_dir is not None:
        for path in plot_shapes(args.shapes_dir):
            print(f"wrote {path}")
    if args.config is not None or overrides:
        cli_args = (["--config", str(args.config)] if args.config is not None else []) + overrides
        curves = plot_config(cli_args, args.out, args.title)
        first = next(iter(curves.values()))
        marks = sorted({0, 1, len(first) // 2, len(first) - 1})
        print(f"wrote {args.out}: {len(first)} steps; " + ", ".join(f"step {t}: {first[t]:.6g}" for t in marks))


if __name__ == "__main__":
    main()
