"""Gradient flow with and without BatchNorm: the gradient norm of every layer, by depth, at init and after 1 epoch.

Question: "does BatchNorm fix vanishing or exploding gradients?" Ioffe & Szegedy 2015 motivate BN partly by
keeping activations (and so gradients) in a healthy range through depth. Yang et al. 2019 ("A Mean Field Theory of
Batch Normalization", arXiv 1902.08129) prove the opposite at initialization for deep plain (non-residual) BN
networks: gradients *explode* toward the input, by a factor per layer that depends on the width and nonlinearity
(about 1.2 for ReLU at large width in their analysis). Without BN, PyTorch's default initialization
(``kaiming_uniform_(a=sqrt(5))``, which shrinks the signal by about 1/sqrt(3) per ReLU layer) makes gradients
vanish toward the input instead.

Here: plain CNNs of ``depth`` Conv(3x3, 16 channels)-BN-ReLU blocks (no pooling, no shortcut) on the 8x8 digits,
then average pooling and a linear head; the same network without BN (the convolutions keep their bias). Constant
LR 0.05, momentum 0.9, weight decay 5e-4 on conv/linear weights, batch 64, 1 epoch (20 steps). The gradient norm of
every weight is read by ``WeightDynamicsMonitor(log_every_n_steps=1)`` at the first step (init) and averaged over
the last 5 steps of the epoch ("after 1 epoch"). Depths 8 and 16.

Run: ``python examples/experiments/gradient_flow.py`` (``--smoke`` for a quick check).
"""

from __future__ import annotations

import argparse
import math
import statistics
from typing import Any

from _common import (
    LossHistory,
    Timer,
    command_line,
    mean_std,
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
from _dynamics import DynamicsRecorder, SGDClassifier
from torch import nn

from lightning_bnsgd import DigitsDataModule
from lightning_bnsgd.callbacks.dynamics_monitor import WeightDynamicsMonitor

NAME = "gradient_flow"
DEPTHS = (8, 16)
WIDTH = 16
LAST_STEPS = 5


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS), help="blocks (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=0.05, help="constant LR (default: %(default)s)")


def plain_cnn(depth: int, batch_norm: bool, width: int = WIDTH) -> nn.Sequential:
    """``depth`` Conv-BN-ReLU blocks (Conv-ReLU without BN), average pooling to 2x2, a linear head for 10 classes."""
    layers: list[nn.Module] = []
    prev = 1
    for _ in range(depth):
        layers.append(nn.Conv2d(prev, width, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU())
        prev = width
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(width * 4, 10)]
    return nn.Sequential(*layers)


def run_one(norm: str, depth: int, seed: int, args: argparse.Namespace, epochs: int) -> list[dict[str, Any]]:
    """One network, one seed: one row per layer and moment (init / after the epoch)."""
    seed_all(seed)
    model = SGDClassifier(args.lr, 5e-4, 0.9, input_size=8, net=plain_cnn(depth, norm == "BN"))
    recorder, history = DynamicsRecorder(), LossHistory()
    monitor = WeightDynamicsMonitor(log_every_n_steps=1, warn_off_equilibrium=False)
    trainer = quiet_trainer(epochs, [monitor, history], logger=recorder, limit_val_batches=0)
    trainer.fit(model, DigitsDataModule(batch_size=64))
    loss_end = statistics.fmean(history.train_loss[-LAST_STEPS:])
    rows = []
    for depth_index, layer in enumerate(monitor.layer_names, start=1):
        _, grads = recorder.series(f"dynamics/{layer}/grad_norm")
        for when, value in (("init", grads[0]), ("after 1 epoch", statistics.fmean(grads[-LAST_STEPS:]))):
            rows.append(
                {
                    "norm": norm,
                    "depth": depth,
                    "seed": seed,
                    "when": when,
                    "layer_index": depth_index,
                    "layer": layer,
                    "is_head": int(depth_index == len(monitor.layer_names)),
                    "grad_norm": value,
                    "train_loss_first": history.train_loss[0],
                    "train_loss_end": loss_end,
                }
            )
    return rows


def slope_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per run and moment: the gradient-norm factor per layer from conv 2 to the last conv (conv 1 has a single
    input channel, so its gradient is not comparable), as log10 of conv 2's norm over the last conv's and per layer.
    Below 1 per layer: gradients shrink toward the input (vanishing); above 1: they grow (exploding)."""
    out = []
    keys = list(dict.fromkeys((r["norm"], r["depth"], r["seed"], r["when"]) for r in rows))
    for norm, depth, seed, when in keys:
        run = [r for r in rows if (r["norm"], r["depth"], r["seed"], r["when"]) == (norm, depth, seed, when)]
        convs = [r for r in run if not r["is_head"]][1:]
        log_ratio = math.log10(convs[0]["grad_norm"] / convs[-1]["grad_norm"])
        out.append(
            {
                "norm": norm,
                "depth": depth,
                "when": when,
                "seed": seed,
                "log10_conv2_over_last": log_ratio,
                "factor_per_layer": 10 ** (log_ratio / (len(convs) - 1)),
                "train_loss_first": convs[0]["train_loss_first"],
                "train_loss_end": convs[0]["train_loss_end"],
            }
        )
    return out


def per_layer_table(rows: list[dict[str, Any]]) -> str:
    """Gradient norm per conv layer (rows) for each network and moment (columns), mean ± std in 3 significant digits."""
    columns = list(dict.fromkeys((r["norm"], r["depth"], r["when"]) for r in rows))
    layers = sorted({r["layer_index"] for r in rows if not r["is_head"]})
    header = ["conv layer", *[f"{n}, {d} blocks, {w}" for n, d, w in columns]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index in layers:
        cells = [str(index)]
        for key in columns:
            values = [
                r["grad_norm"]
                for r in rows
                if (r["norm"], r["depth"], r["when"]) == key and r["layer_index"] == index and not r["is_head"]
            ]
            mean, std = mean_std(values) if values else (math.nan, math.nan)
            cells.append("" if math.isnan(mean) else f"{mean:.3g} ± {std:.2g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], depths: list[int], path: Any) -> None:
    fig, axes = new_figure(ncols=2, width=5.2)
    styles = {"BN": "tab:blue", "no BN": "tab:red"}
    for ax, when in zip(axes[0], ("init", "after 1 epoch"), strict=True):
        for norm, color in styles.items():
            for depth, ls, marker in zip(depths, ("-", "--", ":"), ("o", "s", "^"), strict=False):
                mine = [r for r in rows if r["norm"] == norm and r["depth"] == depth and r["when"] == when]
                if not mine:
                    continue
                idx = sorted({r["layer_index"] for r in mine if not r["is_head"]})
                stats = [mean_std([r["grad_norm"] for r in mine if r["layer_index"] == i]) for i in idx]
                ax.errorbar(
                    idx,
                    [m for m, _ in stats],
                    yerr=[s for _, s in stats],
                    color=color,
                    ls=ls,
                    marker=marker,
                    ms=3,
                    capsize=2,
                    label=f"{norm}, {depth} blocks",
                )
        ax.set(yscale="log", xlabel="conv layer (1 = next to the input)", ylabel="gradient norm of the weight")
        ax.set_title(f"{when} (mean ± std over seeds)", fontsize=9)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    """Run both networks at every depth and seed; write the CSV, the summary tables and the figure."""
    args = parse_args(__doc__, epochs=1, extra=_extra, argv=argv)
    quiet_lightning()
    depths = args.depths[:1] if args.smoke else args.depths
    rows: list[dict[str, Any]] = []
    with Timer(NAME):
        for depth in depths:
            for norm in ("BN", "no BN"):
                for seed in args.seeds:
                    new = run_one(norm, depth, seed, args, args.epochs)
                    rows += new
                    first = [r["grad_norm"] for r in new if r["when"] == "init"]
                    print(
                        f"{norm:>5} depth {depth} seed {seed}: init grad norm first conv {first[0]:.3g}, last conv "
                        f"{first[-2]:.3g}, head {first[-1]:.3g}",
                        flush=True,
                    )
        write_csv(rows, args.out_dir / f"{NAME}.csv")
        slopes = slope_rows(rows)
        table = summarize(slopes, ["norm", "depth", "when"], ["log10_conv2_over_last", "factor_per_layer"], digits=3)
        table += "\nGradient norm per conv layer (mean ± std over seeds; layer 1 is next to the input):\n\n"
        table += per_layer_table(rows)
        first = [r for r in slopes if r["when"] == "init"]
        losses = summarize(first, ["norm", "depth"], ["train_loss_first", "train_loss_end"], digits=3)
        table += f"\nTraining loss at the first step and over the last {LAST_STEPS} steps of the epoch:\n\n{losses}"
        write_summary(table, args.out_dir / f"{NAME}_summary.md", command_line())
        plot(rows, depths, args.out_dir / f"{NAME}.png")
    print(table)
    if any(math.isnan(r["grad_norm"]) for r in rows):
        print("warning: some gradient norms are NaN")


if __name__ == "__main__":
    main()
