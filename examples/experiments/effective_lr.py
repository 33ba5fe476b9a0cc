"""The effective LR of a scale-invariant layer under the packaged schedule, with and without weight decay on it.

Question: for a weight whose output BatchNorm normalizes, what SGD really controls is the effective LR
``lr / ||w||^2`` (van Laarhoven 2017, arXiv 1706.05350; Hoffer et al. 2018, arXiv 1803.01814). Without weight
decay, ``||w||`` only grows (each step adds a component orthogonal to ``w``), so the effective LR decays on its own,
on top of the schedule; weight decay holds the norm back (Zhang et al. 2019, "Three Mechanisms of Weight Decay
Regularization", arXiv 1810.12281, find that this effective-LR effect is how weight decay helps BN networks).
How large is that on the packaged digits job?

Here: the packaged ``configs/digits.yaml`` model and optimizer (``BNConvNet`` with two Conv-ReLU-BN blocks,
``SGDWarmup``: peak LR 0.1 at batch 64, 1-epoch linear warmup, cosine decay, Nesterov momentum 0.9, weight decay
5e-4 on conv/linear weights), trained for the packaged 15 epochs and 4x longer (60 epochs, the same schedule
stretched), with the packaged weight decay and with ``weight_decay=0``. ``WeightDynamicsMonitor(log_every_n_steps=1)``
logs the LR, the norm and the effective LR of both conv layers every step (each conv's weight and bias are
invariant together, as the conv's bias comes before ReLU and BN).

Run: ``python examples/experiments/effective_lr.py`` (``--smoke`` for a quick check).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import yaml
from _common import (
    Timer,
    command_line,
    new_figure,
    parse_args,
    quiet_lightning,
    quiet_trainer,
    save_figure,
    seed_all,
    summarize,
    write_csv,
    write_summary,
)
from _dynamics import DynamicsRecorder

from lightning_bnsgd import ConvNetClassifier, DigitsDataModule, SGDWarmup
from lightning_bnsgd.callbacks.dynamics_monitor import WeightDynamicsMonitor
from lightning_bnsgd.cli import packaged_config

NAME = "effective_lr"
LAYERS = ("net.features.0.conv", "net.features.1.conv")
EPOCHS = (15, 60)


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=list(EPOCHS), help="epochs (default: %(default)s)")


def packaged() -> tuple[dict[str, Any], dict[str, Any]]:
    """The model arguments (without the optimizer) and the ``SGDWarmup`` arguments of ``configs/digits.yaml``."""
    config = yaml.safe_load(packaged_config().read_text())
    model = dict(config["model"]["init_args"])
    optimizer = dict(model.pop("optimizer"))
    return model, optimizer


def run_one(weight_decay: float, epochs: int, seed: int) -> tuple[list[dict[str, Any]], dict[str, list[float]]]:
    """Train the packaged job with this weight decay and length; per-layer rows and per-step series."""
    model_args, optimizer_args = packaged()
    packaged_wd = optimizer_args["weight_decay"]
    optimizer = SGDWarmup(**{**optimizer_args, "weight_decay": weight_decay})
    seed_all(seed)
    model = ConvNetClassifier(**model_args, input_size=8, optimizer=optimizer)
    recorder = DynamicsRecorder()
    monitor = WeightDynamicsMonitor(log_every_n_steps=1, warn_off_equilibrium=False, log_grad_flow=False)
    trainer = quiet_trainer(epochs, [monitor], logger=recorder, limit_val_batches=0)
    data = DigitsDataModule(batch_size=64)
    trainer.fit(model, data)
    test_acc = float(trainer.test(model, data, verbose=False)[0]["test/acc"])
    series: dict[str, list[float]] = {}
    rows = []
    for layer in LAYERS:
        steps, eff = recorder.series(f"dynamics/{layer}/effective_lr")
        _, norm = recorder.series(f"dynamics/{layer}/weight_norm")
        series[f"{layer}/effective_lr"], series[f"{layer}/weight_norm"] = eff, norm
        series["step"] = [float(s) for s in steps]
        peak = max(range(len(eff)), key=lambda i: eff[i] * norm[i] ** 2)  # the step of the peak LR
        rows.append(
            {
                "weight_decay": "packaged" if weight_decay == packaged_wd else f"{weight_decay:g}",
                "epochs": epochs,
                "layer": layer,
                "seed": seed,
                "norm_start": norm[0],
                "norm_end": norm[-1],
                "norm_growth": norm[-1] / norm[0],
                "eff_lr_peak_x1e3": 1e3 * eff[peak],
                "eff_lr_mid_x1e3": 1e3 * eff[len(eff) // 2],
                "eff_lr_mean_x1e3": 1e3 * statistics.fmean(eff),
                "test_acc": test_acc,
            }
        )
    return rows, series


def plot(curves: list[tuple[str, int, dict[str, list[float]]]], path: Any) -> None:
    """Effective LR and weight norm of the second conv over training, one line per (weight decay, length)."""
    fig, axes = new_figure(ncols=2, width=5.4)
    ax_eff, ax_norm = axes[0]
    layer = LAYERS[1]
    colors = {"packaged": "tab:blue", "0": "tab:red"}
    styles = {EPOCHS[0]: "-", EPOCHS[1]: "--"}
    seen: set[tuple[str, int]] = set()
    for wd, epochs, series in curves:
        steps = series["step"]
        frac = [s / steps[-1] for s in steps]
        first = (wd, epochs) not in seen
        seen.add((wd, epochs))
        kw = {"color": colors.get(wd, "grey"), "ls": styles.get(epochs, ":"), "lw": 0.9}
        name = f"wd {'5e-4' if wd == 'packaged' else wd}, {epochs} epochs" if first else None
        ax_eff.plot(frac, series[f"{layer}/effective_lr"], label=name, **kw)
        ax_norm.plot(frac, series[f"{layer}/weight_norm"], label=name, **kw)
    ax_eff.set(yscale="log", xlabel="fraction of training", ylabel="effective LR  lr / ||w||^2", ylim=(1e-5, 4e-3))
    ax_eff.set_title(f"{layer}: effective LR (every seed)", fontsize=9)
    ax_norm.set(xlabel="fraction of training", ylabel="||w|| (weight and bias)")
    ax_norm.set_title(f"{layer}: norm", fontsize=9)
    ax_eff.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    """Run both weight decays at every length and seed; write the CSV, the summary table and the figure."""
    args = parse_args(__doc__, epochs=15, extra=_extra, argv=argv)
    quiet_lightning()
    lengths = [1] if args.smoke else args.lengths
    packaged_wd = packaged()[1]["weight_decay"]
    rows: list[dict[str, Any]] = []
    curves: list[tuple[str, int, dict[str, list[float]]]] = []
    with Timer(NAME):
        for epochs in lengths:
            for wd in (packaged_wd, 0.0):
                for seed in args.seeds:
                    new, series = run_one(wd, epochs, seed)
                    rows += new
                    curves.append((new[0]["weight_decay"], epochs, series))
                    print(
                        f"wd {wd:g} {epochs} epochs seed {seed}: norm growth "
                        + ", ".join(f"{r['norm_growth']:.2f}" for r in new)
                        + f", test acc {100 * new[0]['test_acc']:.2f}%",
                        flush=True,
                    )
        write_csv(rows, args.out_dir / f"{NAME}.csv")
        table = summarize(
            rows,
            ["epochs", "weight_decay", "layer"],
            [
                "norm_start",
                "norm_end",
                "norm_growth",
                "eff_lr_peak_x1e3",
                "eff_lr_mid_x1e3",
                "eff_lr_mean_x1e3",
                "test_acc",
            ],
            percent=["test_acc"],
            digits=2,
        )
        write_summary(table, args.out_dir / f"{NAME}_summary.md", command_line())
        plot(curves, args.out_dir / f"{NAME}.png")
    print(table)


if __name__ == "__main__":
    main()
