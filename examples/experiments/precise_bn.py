"""Precise BatchNorm: do the EMA running statistics lag behind a fast-changing model, and how many samples fix it?

Wu & Johnson (2021), "Rethinking 'Batch' in BatchNorm", Sec. 3: the exponential moving average (EMA) that
BatchNorm keeps of its batch statistics mixes statistics of many past models; when the weights change fast
(large learning rate, large batch, so few steps per epoch, early training) the average lags behind the
current model and inference accuracy suffers. Recomputing the population statistics on the fixed model
("precise BN", here ``recalibrate_bn``) with about 10^3 to 10^4 samples removes the problem.

(a) After every epoch, the same weights are evaluated twice: with the model's own EMA statistics (a deep copy,
untouched) and with precise statistics (another deep copy, recalibrated on the whole training set). Training
never sees the recalibrated copy. Main setting: batch 512 (3 steps per epoch), peak LR 0.2, 1 epoch of warmup,
cosine decay, 20 epochs, BatchNorm momentum 0.1 (torch default); contrast: batch 64 at the same peak LR.
(b) For the batch-512 models after epoch ``--snapshot-epoch`` and after the last epoch, test accuracy after
recalibrating from ``num_samples`` random training samples (4 ... 1,257 = the whole training set, several
random subsets each).
(c) ``--debiased-ema`` (an ablation, written as ``precise_bn_debiased.*``): at the first batch size only, a third
set of statistics per epoch, the EMA with its start-up bias removed. BatchNorm's EMA starts from mean 0 and
variance 1, which still weigh ``(1 - momentum) ** num_batches_tracked`` in it; dividing that part out (as Adam
does for its moments) leaves an average of the batch statistics alone, so what remains of the EMA-vs-precise gap
is the lag.

    python examples/experiments/precise_bn.py   # results in a scratch folder; --publish: in docs/experiments
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from _common import (
    Callback,
    Timer,
    Trainer,
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
from _common import (
    accuracy as eval_accuracy,
)
from torch import nn
from torch.utils.data import DataLoader, Subset

from lightning_bnsgd import ConvNetClassifier, DigitsDataModule, SGDWarmup
from lightning_bnsgd.bn import batchnorm_layers, statistics_shift

NAME = "precise_bn"
PEAK_LR = 0.2
SUBSET_SIZES = (4, 8, 16, 32, 64, 128, 256, 512, 1024)
TABLE_EPOCHS = (1, 2, 3, 5, 8, 12, 20)
SWEEP_ONLY = ("test_acc_minus_full", "val_acc_minus_full", "mean_err_vs_full", "var_err_vs_full")


def accuracy(net: nn.Module, loader: DataLoader) -> float:
    """Accuracy of ``net`` in eval mode; ``net`` itself is untouched (a deep copy is evaluated)."""
    return eval_accuracy(copy.deepcopy(net), loader)


class EmaVersusPrecise(Callback):
    """After every training epoch: accuracy with the EMA statistics and with precise statistics (on copies)."""

    def __init__(self, data: DigitsDataModule, snapshot_epochs: set[int], debiased: bool = False) -> None:
        self.data = data
        self.snapshot_epochs = snapshot_epochs
        self.debiased = debiased
        self.rows: list[dict[str, Any]] = []
        self.snapshots: dict[int, nn.Module] = {}

    def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
        epoch = trainer.current_epoch + 1
        net = pl_module.net
        val, test = self.data.val_dataloader(), self.data.test_dataloader()
        row = {"epoch": epoch, "val_acc_ema": accuracy(net, val), "test_acc_ema": accuracy(net, test)}
        if self.debiased:
            unbiased = debiased_ema(net)
            row.update(val_acc_ema_debiased=accuracy(unbiased, val), test_acc_ema_debiased=accuracy(unbiased, test))
        precise, report = recalibrated_copy(net, self.recalibration_loader())
        mean_shift, var_shift = report.max_shift()
        row.update(
            val_acc_precise=accuracy(precise, val),
            test_acc_precise=accuracy(precise, test),
            mean_shift=mean_shift,
            var_shift=var_shift,
        )
        self.rows.append(row)
        if epoch in self.snapshot_epochs:
            self.snapshots[epoch] = copy.deepcopy(net)

    def recalibration_loader(self, indices: torch.Tensor | None = None) -> DataLoader:
        """The training set (or the ``indices`` of it) in batches of 256; no shuffling, no shared sampler."""
        dataset = self.data.train_dataloader().dataset
        if indices is not None:
            dataset = Subset(dataset, indices.tolist())
        return DataLoader(dataset, batch_size=256)


def debiased_ema(net: nn.Module) -> nn.Module:
    """A copy of ``net`` whose BatchNorm running statistics have the weight of their start values divided out."""
    copied = copy.deepcopy(net)
    for _, layer in batchnorm_layers(copied):
        start = (1.0 - float(layer.momentum)) ** int(layer.num_batches_tracked)
        if start < 1.0:
            layer.running_mean.copy_(layer.running_mean / (1.0 - start))  # started at 0
            layer.running_var.copy_((layer.running_var - start) / (1.0 - start))  # started at 1
    return copied


def train(
    seed: int, batch_size: int, epochs: int, snapshot_epochs: set[int], debiased: bool = False
) -> EmaVersusPrecise:
    """One training run; returns the callback holding the per-epoch numbers and the weight snapshots."""
    seed_all(seed)
    data = DigitsDataModule(batch_size=batch_size)
    data.setup("fit")
    optimizer = SGDWarmup(lr=PEAK_LR, warmup_epochs=1.0, decay="cosine")
    model = ConvNetClassifier(input_size=data.input_size, padding="same", optimizer=optimizer)
    monitor = EmaVersusPrecise(data, snapshot_epochs, debiased)
    quiet_trainer(epochs, [monitor], limit_val_batches=0).fit(model, datamodule=data)
    return monitor


def stat_error(net: nn.Module, reference: nn.Module) -> tuple[float, float]:
    """``statistics_shift`` of ``net``'s BatchNorm statistics from ``reference``'s, averaged over the layers."""
    shifts = [
        statistics_shift(layer.running_mean, layer.running_var, ref.running_mean, ref.running_var)
        for (_, layer), (_, ref) in zip(batchnorm_layers(net), batchnorm_layers(reference), strict=True)
    ]
    mean, var = torch.stack(shifts).mean(0).tolist()
    return mean, var


def sample_sweep(monitor: EmaVersusPrecise, seed: int, sizes: list[int], subsets: int) -> list[dict[str, Any]]:
    """Accuracy of each snapshot recalibrated from random training subsets of each size (and the whole set)."""
    rows = []
    train_size = len(monitor.recalibration_loader().dataset)
    val, test = monitor.data.val_dataloader(), monitor.data.test_dataloader()
    for epoch, net in sorted(monitor.snapshots.items()):
        ema_val, ema_test = accuracy(net, val), accuracy(net, test)
        full, _ = recalibrated_copy(net, monitor.recalibration_loader())
        full_val, full_test = accuracy(full, val), accuracy(full, test)
        for size in [*sizes, train_size]:
            for subset in range(subsets if size < train_size else 1):
                generator = torch.Generator().manual_seed(seed * 100_003 + size * 101 + subset)
                indices = torch.randperm(train_size, generator=generator)[:size]
                precise, _ = recalibrated_copy(net, monitor.recalibration_loader(indices))
                mean_error, var_error = stat_error(precise, full)
                val_acc, test_acc = accuracy(precise, val), accuracy(precise, test)
                rows.append(
                    {
                        "epoch": epoch,
                        "num_samples": size,
                        "subset": subset,
                        "val_acc_ema": ema_val,
                        "test_acc_ema": ema_test,
                        "val_acc_precise": val_acc,
                        "test_acc_precise": test_acc,
                        "test_acc_minus_full": test_acc - full_test,
                        "val_acc_minus_full": val_acc - full_val,
                        "mean_err_vs_full": mean_error,
                        "var_err_vs_full": var_error,
                    }
                )
    return rows


def plot(rows: list[dict[str, Any]], batch_sizes: list[int], sweep_batch: int, path: Any) -> None:
    """Left: val accuracy per epoch, EMA vs precise. Right: test accuracy vs recalibration samples."""
    fig, axes = new_figure(ncols=2, width=5.4, height=3.8)
    from matplotlib.ticker import MaxNLocator, ScalarFormatter  # after new_figure has set the Agg backend

    left, right = axes[0]
    colors = {"ema": "tab:red", "precise": "tab:blue"}
    for b, batch in enumerate(batch_sizes):
        epoch_rows = [r for r in rows if r["part"] == "epochs" and r["batch_size"] == batch]
        epochs = sorted({r["epoch"] for r in epoch_rows})
        for stats in ("ema", "precise"):
            stat = [mean_std([100 * r[f"val_acc_{stats}"] for r in epoch_rows if r["epoch"] == e]) for e in epochs]
            mean = [m for m, _ in stat]
            std = [s for _, s in stat]
            style = "-" if b == 0 else ":"
            label = f"batch {batch}, {'EMA running stats' if stats == 'ema' else 'precise BN'}"
            left.plot(epochs, mean, style, color=colors[stats], marker="o", ms=3, label=label, alpha=1.0 - 0.4 * b)
            left.fill_between(
                epochs,
                [m - s for m, s in zip(mean, std, strict=True)],
                [m + s for m, s in zip(mean, std, strict=True)],
                color=colors[stats],
                alpha=0.15 if b == 0 else 0.07,
            )
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_xlabel("epoch")
    left.set_ylabel("validation accuracy (%)")
    left.set_title("(a) same weights, EMA vs precise statistics\n(mean ± std over seeds)")
    left.legend(fontsize=7, loc="lower right")
    left.grid(alpha=0.3)

    sweep = [r for r in rows if r["part"] == "samples"]
    markers = ["o", "s", "^", "D"]
    for i, epoch in enumerate(sorted({r["epoch"] for r in sweep})):
        these = [r for r in sweep if r["epoch"] == epoch]
        sizes = sorted({r["num_samples"] for r in these})
        stat = [mean_std([100 * r["test_acc_precise"] for r in these if r["num_samples"] == n]) for n in sizes]
        color = f"C{i}"
        right.errorbar(
            sizes,
            [m for m, _ in stat],
            yerr=[s for _, s in stat],
            marker=markers[i % len(markers)],
            color=color,
            capsize=3,
            label=f"after epoch {epoch}: precise BN",
        )
        ema, ema_std = mean_std([100 * r["test_acc_ema"] for r in these if r["num_samples"] == sizes[-1]])
        right.axhline(ema, color=color, ls="--", lw=1, label=f"after epoch {epoch}: EMA ({ema:.1f} ± {ema_std:.1f})")
    right.set_xscale("log", base=2)
    right.xaxis.set_major_formatter(ScalarFormatter())
    right.set_xlabel("recalibration samples (log scale; 1,257 = whole training set)")
    right.set_ylabel("test accuracy (%)")
    right.set_title(f"(b) batch {sweep_batch}: samples needed\n(mean ± std over seeds x subsets)")
    right.legend(fontsize=7, loc="lower right")
    right.grid(alpha=0.3)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    def extra(parser: Any) -> None:
        parser.add_argument(
            "--batch-sizes", type=int, nargs="+", default=[512, 64], help="first: main setting (default: %(default)s)"
        )
        parser.add_argument("--snapshot-epoch", type=int, default=5, help="mid-training model for (b) (default: 5)")
        parser.add_argument("--subsets", type=int, default=5, help="random subsets per size in (b) (default: 5)")
        parser.add_argument("--debiased-ema", action="store_true", help="run the ablation (c) instead of (a) and (b)")

    args = parse_args(__doc__, epochs=20, seeds=(0, 1, 2, 3, 4), extra=extra, argv=argv)
    if args.debiased_ema:
        return debiased_ablation(args)
    sizes = list(SUBSET_SIZES)
    if args.smoke:
        args.epochs, args.batch_sizes, args.subsets, sizes = 2, args.batch_sizes[:1], 1, [16]
        args.snapshot_epoch = 1
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
    sweep_batch = args.batch_sizes[0]
    snapshot_epochs = {min(args.snapshot_epoch, args.epochs), args.epochs}
    rows: list[dict[str, Any]] = []
    with Timer(NAME):
        for batch in args.batch_sizes:
            for seed in args.seeds:
                monitor = train(seed, batch, args.epochs, snapshot_epochs if batch == sweep_batch else set())
                common = {"batch_size": batch, "seed": seed}
                for row in monitor.rows:
                    extra_keys = dict.fromkeys(SWEEP_ONLY, "")
                    rows.append({"part": "epochs", **common, "num_samples": "all", "subset": "", **row, **extra_keys})
                if batch == sweep_batch:
                    for row in sample_sweep(monitor, seed, sizes, args.subsets):
                        rows.append({"part": "samples", **common, "mean_shift": "", "var_shift": "", **row})
                last = monitor.rows[-1]
                print(
                    f"batch {batch} seed {seed}: final val acc EMA {last['val_acc_ema']:.4f} "
                    f"precise {last['val_acc_precise']:.4f}"
                )
        args.out_dir.mkdir(parents=True, exist_ok=True)
        write_csv(rows, args.out_dir / f"{NAME}.csv")
        acc_columns = ["val_acc_ema", "val_acc_precise", "test_acc_ema", "test_acc_precise"]
        epochs_table = [
            r for r in rows if r["part"] == "epochs" and (r["epoch"] in TABLE_EPOCHS or r["epoch"] == args.epochs)
        ]
        table = (
            "**(a) Accuracy (%) of the same weights with EMA vs precise statistics, per epoch. `var_shift`: largest "
            "over layers of the mean over channels of |log(EMA var / precise var)|**\n\n"
        )
        table += summarize(epochs_table, ["batch_size", "epoch"], [*acc_columns, "var_shift"], percent=acc_columns)
        table += (
            f"\n**(b) Batch {sweep_batch}: accuracy (%) after recalibrating from `num_samples` random training "
            f"samples ({args.subsets} subsets per size x seeds; the whole set once per seed). `test_acc_minus_full`: "
            "minus the accuracy of the same model recalibrated on the whole set; `*_err_vs_full`: distance of the "
            "statistics from the whole-set ones (mean over layers and channels of |mean difference| / std and "
            "|log variance ratio|)**\n\n"
        )
        table += summarize(
            [r for r in rows if r["part"] == "samples"],
            ["epoch", "num_samples"],
            ["test_acc_precise", "test_acc_minus_full", "val_acc_precise", "mean_err_vs_full", "var_err_vs_full"],
            percent=["test_acc_precise", "test_acc_minus_full", "val_acc_precise"],
            digits=3,
        )
        write_summary(table, args.out_dir / f"{NAME}_summary.md", command_line())
        plot(rows, args.batch_sizes, sweep_batch, args.out_dir / f"{NAME}.png")


def debiased_ablation(args: Any) -> None:
    """(c): per epoch, the same weights with the EMA, the start-bias-corrected EMA and precise statistics."""
    name, batch = f"{NAME}_debiased", args.batch_sizes[0]
    if args.smoke:
        args.epochs = 2
    rows: list[dict[str, Any]] = []
    with Timer(name):
        for seed in args.seeds:
            monitor = train(seed, batch, args.epochs, set(), debiased=True)
            rows += [{"batch_size": batch, "seed": seed, **row} for row in monitor.rows]
        write_csv(rows, args.out_dir / f"{name}.csv")
        columns = ["val_acc_ema", "val_acc_ema_debiased", "val_acc_precise", "test_acc_ema", "test_acc_ema_debiased"]
        columns.append("test_acc_precise")
        table = (
            "**(c) Accuracy (%) of the same weights with the EMA, the EMA without its start-up bias "
            "(`*_ema_debiased`) and precise statistics, per epoch**\n\n"
        )
        table += summarize(
            [r for r in rows if r["epoch"] in TABLE_EPOCHS or r["epoch"] == args.epochs],
            ["batch_size", "epoch"],
            columns,
            percent=columns,
        )
        write_summary(table, args.out_dir / f"{name}_summary.md", command_line())


if __name__ == "__main__":
    main()
