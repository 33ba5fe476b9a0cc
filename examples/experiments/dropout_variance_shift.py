"""Dropout before BatchNorm: the variance shift, and recalibrating with dropout off.

Question: when dropout sits right before a BatchNorm layer, the variance BatchNorm sees in training (dropout on,
inputs rescaled by 1/(1-p)) is larger than the one it sees at inference (dropout off), so the running variance
learned in training is wrong at test time. Li et al. 2019 ("Understanding the Disharmony between Dropout and Batch
Normalization by Variance Shift", CVPR) call this the variance shift and show that recomputing the BatchNorm
statistics with dropout off removes it. How large is the shift here, and how much test accuracy does it cost?

Setup: ``BNConvNet`` on the 8x8 digits with three blocks (32, 64, 128 channels), ``block_dropout=p`` (Dropout right
before each block's BatchNorm), the packaged recipe (batch 64, peak LR 0.1, 1 epoch linear warmup, cosine decay,
15 epochs), no recalibration during training. Each trained model is tested three ways, all on the same weights:
(a) the EMA running statistics as trained, (b) ``recalibrate_bn(dropout="train")`` on the whole training split
(dropout on while estimating: the statistics training sees) and (c) ``recalibrate_bn(dropout="eval")`` (dropout
off: the statistics inference sees). The measured variance shift of each BatchNorm layer is the median over channels
of the ratio ``(running_var + eps)`` from (b) over ``(running_var + eps)`` from (c) (> 1: training normalizes by a
larger variance than inference needs).

Command::

    python examples/experiments/dropout_variance_shift.py   # into a scratch folder; --publish: docs/experiments
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch
from _common import (
    Timer,
    accuracy,
    command_line,
    mean_std,
    new_figure,
    parse_args,
    quiet_trainer,
    recalibrated_copy,
    save_figure,
    seed_all,
    summarize,
    write_csv,
    write_summary,
)
from torch import nn

from lightning_bnsgd import ConvNetClassifier, DigitsDataModule, SGDWarmup
from lightning_bnsgd.bn import batchnorm_layers

NAME = "dropout_variance_shift"
BN_EPS = 1e-5  # BatchNorm2d's default eps
VARIANTS = ("ema", "recal_dropout_on", "recal_dropout_off")
LABELS = {
    "ema": "(a) EMA stats as trained",
    "recal_dropout_on": '(b) recalibrated, dropout on ("train")',
    "recal_dropout_off": '(c) recalibrated, dropout off ("eval")',
}


def _extra(parser: argparse.ArgumentParser) -> None:
    probs = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    parser.add_argument("--probs", type=float, nargs="+", default=probs, help="block_dropout p (default: %(default)s)")
    parser.add_argument(
        "--channels", type=int, nargs="+", default=[32, 64, 128], help="channels per block (default: %(default)s)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size (default: %(default)s)")


def recalibrated(net: nn.Module, loader: Any, dropout: str, seed: int) -> nn.Module:
    """A copy of ``net`` recalibrated on the whole ``loader``; ``seed`` fixes the dropout masks drawn meanwhile."""
    seed_all(seed)
    return recalibrated_copy(net, loader, dropout=dropout)[0]


def running_vars(net: nn.Module) -> list[torch.Tensor]:
    """The ``running_var`` of every BatchNorm layer, in registration order."""
    return [layer.running_var.detach().clone() for _, layer in batchnorm_layers(net)]


def run(seed: int, p: float, args: argparse.Namespace) -> dict[str, Any]:
    """Train one model, test it with the three kinds of statistics, measure the variance shift."""
    seed_all(seed)
    data = DigitsDataModule(batch_size=args.batch_size, seed=0)
    model = ConvNetClassifier(
        input_size=8,
        padding="same",
        channels=args.channels,
        block_dropout=p,
        optimizer=SGDWarmup(lr_base=0.4, warmup_epochs=1),
    )
    quiet_trainer(args.epochs).fit(model, datamodule=data)
    net = model.net
    train_loader, test_loader = data.train_dataloader(), data.test_dataloader()
    nets = {
        "ema": copy.deepcopy(net),
        "recal_dropout_on": recalibrated(net, train_loader, "train", seed),
        "recal_dropout_off": recalibrated(net, train_loader, "eval", seed),
    }
    row: dict[str, Any] = {"p": p, "seed": seed}
    for variant, copy_ in nets.items():
        row[f"acc_{variant}"] = accuracy(copy_, test_loader)
    row["off_minus_ema"] = row["acc_recal_dropout_off"] - row["acc_ema"]  # paired: same weights
    on, off, ema = (running_vars(nets[v]) for v in ("recal_dropout_on", "recal_dropout_off", "ema"))
    for i, (v_on, v_off, v_ema) in enumerate(zip(on, off, ema, strict=True), start=1):
        # (var + eps) is what BatchNorm divides by; the median over channels is not swayed by the few nearly
        # silent channels whose variance ratio is far off
        row[f"var_ratio_bn{i}"] = float(((v_on + BN_EPS) / (v_off + BN_EPS)).median())
        row[f"ema_ratio_bn{i}"] = float(((v_ema + BN_EPS) / (v_off + BN_EPS)).median())
    return row


def plot(rows: list[dict[str, Any]], probs: list[float], layers: int, path: Any) -> None:
    """Accuracy per p for the three variants (left) and the variance ratio per layer (right)."""
    fig, axes = new_figure(ncols=2, width=5.2)
    ax = axes[0][0]
    offsets = {"ema": -0.008, "recal_dropout_on": 0.0, "recal_dropout_off": 0.008}
    for variant in VARIANTS:
        stats = [mean_std([100 * r[f"acc_{variant}"] for r in rows if r["p"] == p]) for p in probs]
        ax.errorbar(
            [p + offsets[variant] for p in probs],
            [s[0] for s in stats],
            yerr=[s[1] for s in stats],
            marker="o",
            capsize=3,
            label=LABELS[variant],
        )
    ax.set_xlabel("block_dropout p (Dropout right before each BatchNorm)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy, same weights (mean ± std)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[0][1]
    for i in range(1, layers + 1):
        stats = [mean_std([r[f"var_ratio_bn{i}"] for r in rows if r["p"] == p]) for p in probs]
        ax.errorbar(probs, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3, label=f"BN {i}")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("block_dropout p")
    ax.set_ylabel("running_var ratio, dropout on / off")
    ax.set_title("Variance shift per BatchNorm layer\n(median over channels, mean ± std over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    """Run the grid and write the CSV, the summary table and the figure."""
    args = parse_args(__doc__, epochs=15, extra=_extra, argv=argv)
    if args.smoke:
        args.epochs = 1
        args.probs = [max(args.probs)]
    with Timer(NAME):
        rows = [run(seed, p, args) for p in args.probs for seed in args.seeds]
        layers = len(args.channels)
        write_csv(rows, args.out_dir / f"{NAME}.csv")
        accs = [*(f"acc_{v}" for v in VARIANTS), "off_minus_ema"]
        ratios = [f"var_ratio_bn{i}" for i in range(1, layers + 1)]
        table = summarize(rows, ["p"], accs, percent=accs) + "\n" + summarize(rows, ["p"], ratios, digits=3)
        write_summary(table, args.out_dir / f"{NAME}_summary.md", command_line())
        plot(rows, args.probs, layers, args.out_dir / f"{NAME}.png")
    for p in args.probs:
        cells = [f"{v}={mean_std([100 * r[f'acc_{v}'] for r in rows if r['p'] == p])[0]:.2f}%" for v in VARIANTS]
        shift = [mean_std([r[c] for r in rows if r["p"] == p])[0] for c in ratios]
        print(f"p={p}: " + " ".join(cells) + " var ratio " + " ".join(f"{s:.3f}" for s in shift))


if __name__ == "__main__":
    main()
