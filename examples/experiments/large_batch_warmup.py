"""Large-batch SGD with the linear scaling rule: no warmup vs constant warmup vs gradual warmup.

Question: when the batch grows k-fold and the LR grows k-fold with it (the linear scaling rule), does the large
batch reach the small-batch accuracy, and which warmup does it need? Goyal et al. 2017 ("Accurate, Large Minibatch
SGD: Training ImageNet in 1 Hour", Table 1 / Fig. 2) report ResNet-50 top-1 error 23.60% at batch 256 and, at batch
8k with the LR scaled linearly, 24.84% with no warmup, 25.88% with constant warmup (5 epochs at LR/k, then a jump to
the peak) and 23.74% with gradual warmup (a linear ramp from LR/k to the peak over 5 epochs), whose training curve
matches the small-batch one after a few epochs.

Here: the digits (1,257 training images), a small-batch baseline (batch 16, no warmup) and a k = 16 times larger
batch (256) with ``SGDWarmup(lr_base=...)`` (linear scaling) and the same LR per 256 samples (the packaged 0.4), in
the three warmup variants, all for the same number of epochs with Goyal's step decay (LR / 10 at 1/3, 2/3 and 8/9
of the run).

Run: ``python examples/experiments/large_batch_warmup.py`` (``--smoke`` for a quick check, ``--publish`` to replace the
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

from lightning_bnsgd import ConvNetClassifier, DigitsDataModule, SGDWarmup

NAME = "large_batch_warmup"
TRAIN_SIZE = 1257  # training images of DigitsDataModule's default split
VARIANTS = ("baseline", "no warmup", "constant warmup", "gradual warmup")
COLORS = {"baseline": "black", "no warmup": "tab:red", "constant warmup": "tab:orange", "gradual warmup": "tab:blue"}


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-batch", type=int, default=16, help="small (baseline) batch (default: %(default)s)")
    parser.add_argument("--k", type=int, default=16, help="large batch = k x base batch (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=0.4, help="peak LR per 256 samples (default: %(default)s)")
    parser.add_argument("--warmup-epochs", type=float, default=5.0, help="warmup length (default: %(default)s)")
    parser.add_argument("--label-noise", type=float, default=0.0, help="share of noisy train labels (default: 0)")


def milestones(epochs: int, warmup_epochs: float) -> list[int]:
    """Goyal et al.'s step decay (30/60/80 of 90 epochs) scaled to ``epochs``; only epochs after the warmup."""
    points = sorted({round(epochs * f) for f in (1 / 3, 2 / 3, 8 / 9)})
    return [m for m in points if warmup_epochs < m < epochs]


def recipe(variant: str, args: argparse.Namespace, epochs: int, warmup_epochs: float) -> tuple[int, SGDWarmup]:
    """Batch size and optimizer of one variant: the same ``lr`` per 256 samples, scaled linearly with the batch."""
    steps = milestones(epochs, warmup_epochs)
    decay: dict[str, Any] = {"decay": "multistep", "milestones": steps} if steps else {"decay": "constant"}
    common = {"lr_base": args.lr, "lr_base_scale": "linear", **decay}
    if variant == "baseline":
        return args.base_batch, SGDWarmup(warmup_epochs=0, **common)
    batch = args.base_batch * args.k
    if variant == "no warmup":
        return batch, SGDWarmup(warmup_epochs=0, **common)
    shape = "constant" if variant == "constant warmup" else "linear"
    return batch, SGDWarmup(warmup_epochs=warmup_epochs, warmup=shape, warmup_start_factor=1 / args.k, **common)


def samples_seen(steps: int, batch: int, train_size: int = TRAIN_SIZE) -> list[float]:
    """Epochs (samples seen / train size) after each of ``steps`` optimizer steps; the last batch of an epoch is
    smaller (the loader keeps it)."""
    per_epoch = math.ceil(train_size / batch)
    return [(i // per_epoch) + min((i % per_epoch + 1) * batch, train_size) / train_size for i in range(steps)]


def grouped(values: list[float], xs: list[float], group: int) -> tuple[list[float], list[float]]:
    """Means of ``values`` over ``group`` consecutive steps, within each epoch (x: the end of each group)."""
    out_x: list[float] = []
    out_y: list[float] = []
    start = 0
    while start < len(values):
        epoch = math.floor(xs[start] - 1e-9)
        stop = start
        while stop < len(values) and stop - start < group and math.floor(xs[stop] - 1e-9) == epoch:
            stop += 1
        chunk = values[start:stop]
        out_x.append(xs[stop - 1])
        out_y.append(sum(chunk) / len(chunk))
        start = stop
    return out_x, out_y


def run_one(variant: str, seed: int, args: argparse.Namespace, epochs: int, warmup_epochs: float) -> dict[str, Any]:
    """Train one variant with one model seed (the data split and order stay fixed); return its row and curves."""
    batch, optimizer = recipe(variant, args, epochs, warmup_epochs)
    seed_all(seed)
    data = DigitsDataModule(batch_size=batch, label_noise=args.label_noise)
    model = ConvNetClassifier(input_size=8, padding="same", optimizer=optimizer)
    history = LossHistory()
    trainer = quiet_trainer(epochs, [history])
    start = time.perf_counter()
    trainer.fit(model, data)
    test = trainer.test(model, data, verbose=False)[0]
    seconds = time.perf_counter() - start
    per_epoch = math.ceil(TRAIN_SIZE / batch)
    losses = [finite_or_nan(v) for v in history.train_loss]
    last_epoch = losses[-per_epoch:]
    final_loss = finite_or_nan(sum(last_epoch) / len(last_epoch))
    peak_lr = optimizer.peak_lr(batch)
    row = {
        "variant": variant,
        "batch_size": batch,
        "k": 1 if variant == "baseline" else args.k,
        "lr_per_256": args.lr,
        "peak_lr": round(peak_lr, 6),
        "warmup": "none" if not optimizer.warmup_epochs else optimizer.warmup,
        "warmup_epochs": optimizer.warmup_epochs or 0,
        "epochs": epochs,
        "label_noise": args.label_noise,
        "seed": seed,
        "test_acc": round(float(test["test/acc"]), 6),
        "test_loss": finite_or_nan(float(test["test/loss"])),
        "final_train_loss": final_loss,
        "log10_final_train_loss": math.log10(final_loss) if final_loss > 0 else float("nan"),
        "max_train_loss": max((v for v in losses if not math.isnan(v)), default=float("nan")),
        "final_val_acc": history.val[-1].get("val/acc", float("nan")) if history.val else float("nan"),
        "seconds": round(seconds, 2),
    }
    curves = {
        "loss": losses,
        "val_acc": [v.get("val/acc", float("nan")) for v in history.val],
        "lr": optimizer.lr_curve(len(losses), steps_per_epoch=per_epoch, batch_size=batch),
    }
    return {"row": row, "curves": curves}


def _mean_band(series: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    """Per-position mean, min and max over seeds, ignoring NaN (NaN where every seed is NaN)."""
    means, lows, highs = [], [], []
    for values in zip(*series, strict=True):
        finite = [v for v in values if not math.isnan(v)]
        means.append(sum(finite) / len(finite) if finite else float("nan"))
        lows.append(min(finite) if finite else float("nan"))
        highs.append(max(finite) if finite else float("nan"))
    return means, lows, highs


def plot(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace, path: Path) -> None:
    """Three panels: LR schedule, training loss (mean over seeds, min-max band) and validation accuracy."""
    fig, axes = new_figure(ncols=3, width=4.8, height=3.8)
    ax_lr, ax_loss, ax_acc = axes[0]
    for variant, runs in results.items():
        batch = runs[0]["row"]["batch_size"]
        color = COLORS[variant]
        label = f"{variant} (batch {batch})"
        xs = samples_seen(len(runs[0]["curves"]["loss"]), batch)
        starts = [0.0, *xs[:-1]]  # step i runs at lr[i] over the samples between starts[i] and xs[i]
        ax_lr.plot(starts, runs[0]["curves"]["lr"], color=color, label=label, lw=1.5, drawstyle="steps-post")
        # Each point averages the same number of samples: k baseline steps = one large-batch step.
        group = args.k if variant == "baseline" else 1
        per_seed = [grouped(run["curves"]["loss"], xs, group) for run in runs]
        gx = per_seed[0][0]
        mean, low, high = _mean_band([ys for _, ys in per_seed])
        ax_loss.plot(gx, mean, color=color, label=label, lw=1.3)
        ax_loss.fill_between(gx, low, high, color=color, alpha=0.15, lw=0)
        epochs = list(range(1, len(runs[0]["curves"]["val_acc"]) + 1))
        mean, low, high = _mean_band([[100 * v for v in run["curves"]["val_acc"]] for run in runs])
        ax_acc.plot(epochs, mean, color=color, label=label, lw=1.3, marker="o", ms=2)
        ax_acc.fill_between(epochs, low, high, color=color, alpha=0.15, lw=0)
    ax_lr.set(xlabel="epoch (samples seen / 1,257)", ylabel="learning rate", title="LR schedule (linear scaling)")
    ax_lr.set_yscale("log")
    ax_loss.set(
        xlabel="epoch (samples seen / 1,257)", ylabel="training loss", title="Training loss (mean, min-max band)"
    )
    ax_loss.set_yscale("log")
    ax_acc.set(
        xlabel="epoch",
        ylabel="validation accuracy (%)",
        title="Validation accuracy (mean, min-max band)",
        ylim=(0, 101),
    )
    n = len(next(iter(results.values())))
    ax_loss.text(0.98, 0.98, f"mean of {n} seeds, band: min-max", transform=ax_loss.transAxes, ha="right", va="top")
    ax_acc.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    """Run the four variants for every seed; write the CSV, the summary table and the figure."""
    args = parse_args(__doc__, epochs=30, seeds=(0, 1, 2, 3, 4), extra=_extra, argv=argv)
    quiet_lightning()
    epochs = 1 if args.smoke else args.epochs
    warmup_epochs = min(args.warmup_epochs, 0.5) if args.smoke else args.warmup_epochs
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    with Timer(NAME):
        for seed in args.seeds:
            for variant in VARIANTS:
                result = run_one(variant, seed, args, epochs, warmup_epochs)
                results[variant].append(result)
                row = result["row"]
                print(
                    f"seed {seed} {variant:>15} batch {row['batch_size']:>4}: test acc {100 * row['test_acc']:.2f}% "
                    f"final train loss {row['final_train_loss']:.3g} ({row['seconds']:.1f} s)",
                    flush=True,
                )
        rows = [r["row"] for v in VARIANTS for r in results[v]]
        write_csv(rows, args.out_dir / f"{NAME}.csv")
        table = summarize(
            rows,
            by=["variant", "batch_size", "peak_lr", "warmup"],
            values=["test_acc", "final_val_acc", "log10_final_train_loss"],
            percent=["test_acc", "final_val_acc"],
        )
        write_summary(table, args.out_dir / f"{NAME}_summary.md", command_line())
        plot(results, args, args.out_dir / f"{NAME}.png")
    print(table)


if __name__ == "__main__":
    main()
