"""What BatchNorm buys: the range of learning rates over which the same CNN trains, with and without BN and warmup.

Question: over a log-spaced grid of peak LRs, which of four configurations (BatchNorm or not x linear warmup or not)
train to a good test accuracy, and how good is the best of each? Ioffe & Szegedy 2015 report that BatchNorm allows
much higher learning rates; Santurkar et al. 2018 attribute this to a smoother loss landscape; Bjorck et al. 2018
("Understanding Batch Normalization") find that BN's benefit comes mostly from the larger LRs it makes usable, which
diverge without it.

Here: ``BNConvNet`` with three blocks (channels 32, 64, 128 on the native 8x8 digits) and ``batch_norm`` True/False,
SGD with Nesterov momentum 0.9, weight decay 5e-4, cosine decay, ``SGDWarmup(lr=...)`` (``lr`` is the peak LR), batch
64, 10 epochs, with a 1-epoch linear warmup from 0.1 x peak or without warmup. A run "converges" when its final test
accuracy is >= 90% and its training loss over the last epoch is finite; a diverged run's loss is recorded as NaN.

Run: ``python examples/experiments/what_bn_buys.py`` (``--smoke`` for a quick check, ``--publish`` to replace the
published results in ``docs/experiments``).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from _common import (
    LossHistory,
    Timer,
    command_line,
    finite_or_nan,
    mean_std,
    new_figure,
    parse_args,
    quiet_lightning,
    quiet_trainer,
    save_figure,
    seed_all,
    write_csv,
    write_summary,
)

from lightning_bnsgd import ConvNetClassifier, DigitsDataModule, SGDWarmup

NAME = "what_bn_buys"
TRAIN_SIZE = 1257  # training images of DigitsDataModule's default split
#: Third-decade grid from 0.003 to 3 (10 ** (k / 3) x 0.003, rounded to two significant digits).
LRS = (0.003, 0.0065, 0.014, 0.03, 0.065, 0.14, 0.3, 0.65, 1.4, 3.0)
SMOKE_LRS = (0.03, 3.0)
CONFIGS = (("BN", True, True), ("BN", True, False), ("no BN", False, True), ("no BN", False, False))
STYLES = {
    ("BN", True): ("tab:blue", "-"),
    ("BN", False): ("tab:blue", "--"),
    ("no BN", True): ("tab:red", "-"),
    ("no BN", False): ("tab:red", "--"),
}
CONVERGED_ACC = 0.90


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lrs", type=float, nargs="+", default=list(LRS), help="peak LRs (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default: %(default)s)")
    parser.add_argument(
        "--channels", type=int, nargs="+", default=[32, 64, 128], help="channels per block (default: %(default)s)"
    )
    parser.add_argument("--warmup-epochs", type=float, default=1.0, help="warmup length (default: %(default)s)")


def converged(row: dict[str, Any]) -> bool:
    """Final test accuracy >= 90% and a finite training loss over the last epoch."""
    return row["test_acc"] >= CONVERGED_ACC and not math.isnan(row["final_train_loss"])


def run_one(norm: str, warmup: bool, lr: float, seed: int, args: argparse.Namespace, epochs: int) -> dict[str, Any]:
    """Train one configuration at one peak LR with one model seed (data split and order fixed); return its row."""
    optimizer = SGDWarmup(lr=lr, warmup_epochs=args.warmup_epochs if warmup else 0, warmup="linear", decay="cosine")
    seed_all(seed)
    data = DigitsDataModule(batch_size=args.batch_size)
    model = ConvNetClassifier(
        input_size=8, padding="same", channels=args.channels, batch_norm=norm == "BN", optimizer=optimizer
    )
    history = LossHistory()
    trainer = quiet_trainer(epochs, [history], limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(model, data)
    test = trainer.test(model, data, verbose=False)[0]
    seconds = time.perf_counter() - start
    per_epoch = math.ceil(TRAIN_SIZE / args.batch_size)
    last = history.train_loss[-per_epoch:]
    final_loss = finite_or_nan(sum(last) / len(last))
    row = {
        "norm": norm,
        "warmup": "1 epoch linear" if warmup and args.warmup_epochs else "none",
        "peak_lr": lr,
        "seed": seed,
        "epochs": epochs,
        "batch_size": args.batch_size,
        "test_acc": round(float(test["test/acc"]), 6),
        "test_loss": finite_or_nan(float(test["test/loss"])),
        "final_train_loss": final_loss,
        "seconds": round(seconds, 2),
    }
    row["converged"] = int(converged(row))
    return row


def lr_range(rows: list[dict[str, Any]], lrs: list[float]) -> str:
    """The LRs at which every seed converged, as ``lo-hi`` (or the list when they are not contiguous)."""
    good = [lr for lr in lrs if all(r["converged"] for r in rows if r["peak_lr"] == lr)]
    if not good:
        return "none"
    if len(good) == 1:
        return f"{good[0]:g} only (1 of {len(lrs)} grid LRs)"
    contiguous = lrs.index(good[-1]) - lrs.index(good[0]) + 1 == len(good)
    if contiguous:
        return f"{good[0]:g} - {good[-1]:g} ({len(good)} of {len(lrs)} grid LRs)"
    return ", ".join(f"{lr:g}" for lr in good) + f" ({len(good)} of {len(lrs)} grid LRs, not contiguous)"


def range_table(rows: list[dict[str, Any]], lrs: list[float]) -> str:
    """Per configuration: converging LR range, converged runs, and the best mean test accuracy (at which LR)."""
    lines = [
        "| norm | warmup | LRs where all seeds converge | converged runs | best test acc (%) | at peak LR |",
        "|---|---|---|---|---|---|",
    ]
    for norm, _, warmup in CONFIGS:
        label = "1 epoch linear" if warmup else "none"
        mine = [r for r in rows if r["norm"] == norm and r["warmup"] == label]
        if not mine:
            continue
        best_lr, best = None, (-1.0, 0.0)
        for lr in lrs:
            mean, std = mean_std([100 * r["test_acc"] for r in mine if r["peak_lr"] == lr])
            if not math.isnan(mean) and mean > best[0]:
                best_lr, best = lr, (mean, std)
        done = sum(r["converged"] for r in mine)
        lines.append(
            f"| {norm} | {label} | {lr_range(mine, lrs)} | {done} / {len(mine)} | "
            f"{best[0]:.2f} ± {best[1]:.2f} | {best_lr:g} |"
        )
    return "\n".join(lines) + "\n"


def grid_table(rows: list[dict[str, Any]], lrs: list[float]) -> str:
    """Test accuracy (%, mean ± std over seeds) and converged seeds per peak LR (rows) and configuration (columns)."""
    configs = [(n, "1 epoch linear" if w else "none") for n, _, w in CONFIGS]
    configs = [c for c in configs if any((r["norm"], r["warmup"]) == c for r in rows)]
    header = ["peak LR", *(f"{n}, {'warmup' if w != 'none' else 'no warmup'}" for n, w in configs)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for lr in lrs:
        cells = [f"{lr:g}"]
        for norm, warmup in configs:
            mine = [r for r in rows if (r["norm"], r["warmup"], r["peak_lr"]) == (norm, warmup, lr)]
            mean, std = mean_std([100 * r["test_acc"] for r in mine])
            nan = sum(math.isnan(r["final_train_loss"]) for r in mine)
            note = f", {nan} NaN" if nan else ""
            cells.append(f"{mean:.2f} ± {std:.2f} ({sum(r['converged'] for r in mine)}/{len(mine)}{note})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], lrs: list[float], path: Path) -> None:
    """Left: test accuracy vs peak LR (mean ± std band, seeds as dots). Right: final training loss (x: diverged)."""
    fig, axes = new_figure(ncols=2, width=5.6, height=4.0)
    ax_acc, ax_loss = axes[0]
    finite_losses = [r["final_train_loss"] for r in rows if not math.isnan(r["final_train_loss"])]
    top = max(finite_losses, default=1.0) * 30
    for norm, _, warmup in CONFIGS:
        label_w = "1 epoch linear" if warmup else "none"
        mine = [r for r in rows if r["norm"] == norm and r["warmup"] == label_w]
        if not mine:
            continue
        color, style = STYLES[(norm, warmup)]
        label = f"{norm}, {'warmup' if warmup else 'no warmup'}"
        stats = [mean_std([100 * r["test_acc"] for r in mine if r["peak_lr"] == lr]) for lr in lrs]
        means = [m for m, _ in stats]
        ax_acc.plot(lrs, means, color=color, ls=style, marker="o", ms=3, label=label)
        ax_acc.fill_between(lrs, [m - s for m, s in stats], [m + s for m, s in stats], color=color, alpha=0.12)
        jitter = 1.04 if warmup else 0.96
        ax_acc.scatter(
            [r["peak_lr"] * jitter for r in mine], [100 * r["test_acc"] for r in mine], color=color, s=6, alpha=0.5
        )
        medians = []
        for lr in lrs:
            losses = sorted(r["final_train_loss"] for r in mine if r["peak_lr"] == lr)
            finite = [v for v in losses if not math.isnan(v)]
            medians.append(finite[len(finite) // 2] if len(finite) * 2 > len(losses) else float("nan"))
        ax_loss.plot(lrs, medians, color=color, ls=style, marker="o", ms=3, label=label)
        nan_lrs = [r["peak_lr"] * jitter for r in mine if math.isnan(r["final_train_loss"])]
        ax_loss.scatter(nan_lrs, [top] * len(nan_lrs), color=color, marker="x", s=25)
    ax_acc.axhline(100 * CONVERGED_ACC, color="grey", lw=0.8, ls=":")
    ax_acc.set(xscale="log", xlabel="peak learning rate", ylabel="test accuracy (%)", ylim=(0, 101))
    ax_acc.set_title("Test accuracy (mean ± std, dots: seeds)")
    ax_acc.legend(loc="lower left", fontsize=8)
    ax_loss.set(xscale="log", yscale="log", xlabel="peak learning rate", ylabel="final training loss")
    ax_loss.set_title("Training loss, last epoch (median; x: NaN)")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    """Run the grid (configurations x LRs x seeds); write the CSV, the summary tables and the figure."""
    args = parse_args(__doc__, epochs=10, extra=_extra, argv=argv)
    quiet_lightning()
    lrs = sorted(SMOKE_LRS if args.smoke else args.lrs)
    epochs = 1 if args.smoke else args.epochs
    rows: list[dict[str, Any]] = []
    with Timer(NAME):
        for seed in args.seeds:
            for norm, _, warmup in CONFIGS:
                for lr in lrs:
                    row = run_one(norm, warmup, lr, seed, args, epochs)
                    rows.append(row)
                    print(
                        f"seed {seed} {norm:>5} warmup={row['warmup']:<14} lr {lr:<6g}: test acc "
                        f"{100 * row['test_acc']:.2f}% loss {row['final_train_loss']:.3g} ({row['seconds']:.1f} s)",
                        flush=True,
                    )
        rows.sort(key=lambda r: (r["norm"] != "BN", r["warmup"] == "none", r["peak_lr"], r["seed"]))
        write_csv(rows, args.out_dir / f"{NAME}.csv")
        table = (
            range_table(rows, lrs)
            + "\nTest accuracy (%, mean ± std over seeds) and converged seeds per peak LR:\n\n"
            + grid_table(rows, lrs)
        )
        write_summary(table, args.out_dir / f"{NAME}_summary.md", command_line())
        plot(rows, lrs, args.out_dir / f"{NAME}.png")
    print(table)


if __name__ == "__main__":
    main()
