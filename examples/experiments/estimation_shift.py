"""Estimation shift: train-mode versus sequential BatchNorm statistics at small batch sizes.

Question: precise-BN style recalibration in train mode estimates every layer's population statistics while all
layers normalize with the statistics of the current batch. At inference the earlier layers use population
statistics instead, so a layer's input distribution there differs from the one its statistics were estimated on,
and the difference adds up with depth and grows as batches get small (Huang et al. 2022, "Delving into the
Estimation Shift of Batch Normalization in a Network", CVPR; Wu & Johnson 2021, "Rethinking 'Batch' in
BatchNorm", on the train/test inconsistency of small batches). Estimating the layers one after another, each with
the earlier layers already in inference mode (``recalibrate_bn(mode="sequential")``), removes this by
construction. How much test accuracy does that buy at batch sizes 2, 4 and 8?

Setup: two networks on the 8x8 digits, each trained at batch size B in (2, 4, 8) for 5 epochs (peak LR 0.4 x B / 256
by linear scaling, 1 epoch linear warmup, cosine decay; the last, one-image batch of each epoch is dropped):
``BNConvNet`` with three blocks (32, 64, 128 channels; its BatchNorm layers see B x 64, B x 16 and B x 4 values per
channel in a batch) and, as the harder case, a BatchNorm MLP (6 x Linear(128)-BatchNorm1d-ReLU, through
``ConvNetClassifier(net=...)``; B values per feature). Each trained model is tested three ways on the same weights:
the EMA running statistics as trained, ``recalibrate_bn(mode="train")`` and ``recalibrate_bn(mode="sequential")``,
both over the training split in batches of B (one fixed shuffled order). ``BNStatsMonitor`` logs the gap between
the training batch's statistics and the running ones (``bn/summary/gap_mean_max``, ``bn/summary/gap_var_max`` and
per layer ``bn/<layer>/gap_var_mean``) to an in-memory logger, ten times per epoch; the CSV keeps their mean over
the last epoch. The estimation shift of each layer is measured directly as the median over channels of
``|log((var_train + eps) / (var_sequential + eps))|``.

Command::

    python examples/experiments/estimation_shift.py   # results in a scratch folder; --publish: in docs/experiments
"""

from __future__ import annotations

import argparse
import copy
import math
from typing import Any

import torch
from _common import (
    Timer,
    accuracy,
    command_line,
    mean_std,
    new_figure,
    parse_args,
    pl,
    quiet_trainer,
    recalibrated_copy,
    save_figure,
    seed_all,
    summarize,
    write_csv,
    write_summary,
)
from torch import nn
from torch.utils.data import DataLoader, Subset

from lightning_bnsgd import (
    BNStatsMonitor,
    ConvNetClassifier,
    DigitsDataModule,
    SGDWarmup,
)
from lightning_bnsgd.bn import batchnorm_layers

NAME = "estimation_shift"
BN_EPS = 1e-5  # BatchNorm2d's default eps
VARIANTS = ("ema", "train", "sequential")
ARCHS = ("cnn", "mlp")
ARCH_TITLES = {"cnn": "BNConvNet, 3 blocks", "mlp": "BatchNorm MLP"}
LABELS = {
    "ema": "EMA stats as trained",
    "train": 'recalibrated, mode="train"',
    "sequential": 'recalibrated, mode="sequential"',
}


class MemoryLogger(pl.loggers.Logger):
    """A Lightning logger that keeps every logged metric in memory: ``history[key] = [(step, value), ...]``."""

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[str, list[tuple[int, float]]] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.history.setdefault(key, []).append((int(step or 0), float(value)))

    def mean_since(self, key: str, first_step: int) -> float:
        """Mean of ``key`` over the values logged at ``first_step`` or later (NaN if none)."""
        values = [v for s, v in self.history.get(key, []) if s >= first_step]
        return sum(values) / len(values) if values else math.nan


def bn_mlp(depth: int, width: int, in_features: int = 64, num_classes: int = 10) -> nn.Module:
    """``depth`` x (Linear -> BatchNorm1d -> ReLU), then a linear head: one value per feature and sample."""
    layers: list[nn.Module] = [nn.Flatten()]
    for _ in range(depth):
        layers += [nn.Linear(in_features, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        in_features = width
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--archs", nargs="+", choices=ARCHS, default=list(ARCHS), help="networks to run (default: %(default)s)"
    )
    parser.add_argument("--mlp-depth", type=int, default=6, help="BatchNorm layers of the MLP (default: %(default)s)")
    parser.add_argument("--mlp-width", type=int, default=128, help="width of the MLP (default: %(default)s)")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[2, 4, 8], help="training batch sizes (default: %(default)s)"
    )
    parser.add_argument(
        "--channels", type=int, nargs="+", default=[32, 64, 128], help="channels per block (default: %(default)s)"
    )
    parser.add_argument("--lr", type=float, default=0.4, help="peak LR per 256 samples (default: %(default)s)")
    parser.add_argument(
        "--monitor-every", type=int, default=10, help="BNStatsMonitor logs per epoch (default: %(default)s)"
    )


def build_model(arch: str, args: argparse.Namespace) -> ConvNetClassifier:
    """The classifier for ``arch``: the 3-block ``BNConvNet`` or the BatchNorm MLP (through ``net=``)."""
    optimizer = SGDWarmup(lr_base=args.lr, warmup_epochs=1)
    if arch == "cnn":
        return ConvNetClassifier(input_size=8, padding="same", channels=args.channels, optimizer=optimizer)
    return ConvNetClassifier(net=bn_mlp(args.mlp_depth, args.mlp_width), optimizer=optimizer)


def run(seed: int, arch: str, batch_size: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train at ``batch_size``, test with the three kinds of statistics, collect the gaps and the shift."""
    seed_all(seed)
    train_set = DigitsDataModule(seed=0).train_dataloader().dataset
    # drop_last: 1,257 training images would leave a last batch of one image, which BatchNorm1d cannot normalize
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True)
    model = build_model(arch, args)
    logger = MemoryLogger()
    steps_per_epoch = len(train_loader)
    monitor = BNStatsMonitor(log_every_n_steps=max(steps_per_epoch // args.monitor_every, 1), on_anomaly="ignore")
    trainer = quiet_trainer(args.epochs, callbacks=[monitor], logger=logger, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=train_loader)
    net = model.net
    test_loader = DigitsDataModule(batch_size=256, seed=0).test_dataloader()
    # one fixed shuffled order, so that every pass of both modes sees the same batches
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed)).tolist()
    recal_loader = DataLoader(Subset(train_set, order), batch_size=batch_size, drop_last=True)
    nets = {
        "ema": copy.deepcopy(net),
        "train": recalibrated_copy(net, recal_loader, mode="train")[0],
        "sequential": recalibrated_copy(net, recal_loader, mode="sequential")[0],
    }
    row: dict[str, Any] = {"arch": arch, "batch_size": batch_size, "seed": seed}
    for variant, copy_ in nets.items():
        row[f"acc_{variant}"] = accuracy(copy_, test_loader)
    row["seq_minus_train"] = row["acc_sequential"] - row["acc_train"]  # paired: same weights
    last_epoch = (args.epochs - 1) * steps_per_epoch
    row["gap_mean_max"] = logger.mean_since("bn/summary/gap_mean_max", last_epoch)
    row["gap_var_max"] = logger.mean_since("bn/summary/gap_var_max", last_epoch)
    for i, (name, _) in enumerate(batchnorm_layers(model), start=1):
        row[f"gap_var_bn{i}"] = logger.mean_since(f"bn/{name}/gap_var_mean", last_epoch)
    layers = {v: [layer for _, layer in batchnorm_layers(nets[v])] for v in VARIANTS}
    for i, (trained, seq) in enumerate(zip(layers["train"], layers["sequential"], strict=True), start=1):
        # median over channels: a few nearly silent channels (variance ~ eps) would dominate a mean of log ratios
        shift = ((trained.running_var + BN_EPS) / (seq.running_var + BN_EPS)).log().abs().median()
        row[f"est_shift_var_bn{i}"] = float(shift)
    return row


def _errorbar(
    ax: Any, rows: list[dict[str, Any]], xs: list[int], key: str, scale: float, shift: float = 1.0, **kwargs: Any
) -> None:
    stats = [mean_std([scale * float(r[key]) for r in rows if r["batch_size"] == x]) for x in xs]
    xs_shifted = [x * shift for x in xs]  # a small offset on the log axis keeps error bars apart
    ax.errorbar(xs_shifted, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3, **kwargs)


def _layer_count(rows: list[dict[str, Any]], prefix: str) -> int:
    return sum(1 for key in rows[0] if key.startswith(prefix) and not math.isnan(float(rows[0][key])))


def plot(rows: list[dict[str, Any]], archs: list[str], batch_sizes: list[int], path: Any) -> None:
    """Per network: accuracy vs batch size, BNStatsMonitor's gap per layer, the estimation shift per layer."""
    fig, axes = new_figure(ncols=3, nrows=len(archs), width=4.6, height=3.8)
    for row_axes, arch in zip(axes, archs, strict=True):
        group = [r for r in rows if r["arch"] == arch]
        layers = _layer_count(group, "est_shift_var_bn")
        ax = row_axes[0]
        for variant, shift in zip(VARIANTS, (0.96, 1.0, 1.04), strict=True):
            _errorbar(ax, group, batch_sizes, f"acc_{variant}", 100.0, shift, label=LABELS[variant])
        ax.set_title(f"{ARCH_TITLES[arch]}\ntest accuracy (mean ± std)")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=8)
        ax = row_axes[1]
        for i in range(1, layers + 1):
            _errorbar(ax, group, batch_sizes, f"gap_var_bn{i}", 1.0, label=f"BN {i}: gap_var_mean")
        _errorbar(ax, group, batch_sizes, "gap_var_max", 1.0, label="summary: gap_var_max", ls="--", color="black")
        ax.set_yscale("log")
        ax.set_title("BNStatsMonitor: batch vs running gap\n(mean over the last epoch; mean ± std over seeds)")
        ax.set_ylabel("|log(batch var / running var)|")
        ax.legend(fontsize=7)
        ax = row_axes[2]
        for i in range(1, layers + 1):
            _errorbar(ax, group, batch_sizes, f"est_shift_var_bn{i}", 1.0, label=f"BN {i}")
        ax.set_title('estimation shift: "train" vs "sequential"\nmedian over channels; mean ± std over seeds')
        ax.set_ylabel("|log(var_train / var_sequential)|")
        ax.legend(fontsize=7)
        for ax in row_axes:
            ax.set_xscale("log", base=2)
            ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
            ax.set_xlabel("batch size (training and recalibration)")
            ax.grid(alpha=0.3)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    """Run the grid and write the CSV, the summary tables and the figure."""
    args = parse_args(__doc__, epochs=5, extra=_extra, argv=argv)
    if args.smoke:
        args.epochs = 1
        args.batch_sizes = [max(args.batch_sizes)]
        args.mlp_depth = min(args.mlp_depth, 3)
    with Timer(NAME):
        rows = [run(seed, arch, bs, args) for arch in args.archs for bs in args.batch_sizes for seed in args.seeds]
        columns = list(dict.fromkeys(key for row in rows for key in row))  # the deepest network's columns
        rows = [{key: row.get(key, math.nan) for key in columns} for row in rows]
        write_csv(rows, args.out_dir / f"{NAME}.csv")
        tables = []
        for arch in args.archs:
            group = [r for r in rows if r["arch"] == arch]
            layers = _layer_count(group, "est_shift_var_bn")
            accs = [*(f"acc_{v}" for v in VARIANTS), "seq_minus_train"]
            gaps = ["gap_mean_max", "gap_var_max", *[f"gap_var_bn{i}" for i in range(1, layers + 1)]]
            shifts = [f"est_shift_var_bn{i}" for i in range(1, layers + 1)]
            tables.append(f"**{ARCH_TITLES[arch]}**: test accuracy (%)\n\n")
            tables.append(summarize(group, ["batch_size"], accs, percent=accs) + "\n")
            tables.append("BNStatsMonitor gaps (mean over the last epoch)\n\n")
            tables.append(summarize(group, ["batch_size"], gaps, digits=3) + "\n")
            tables.append('Estimation shift, `mode="train"` vs `mode="sequential"` (median over channels)\n\n')
            tables.append(summarize(group, ["batch_size"], shifts, digits=3) + "\n")
        write_summary("".join(tables).rstrip() + "\n", args.out_dir / f"{NAME}_summary.md", command_line())
        plot(rows, args.archs, args.batch_sizes, args.out_dir / f"{NAME}.png")
    for arch in args.archs:
        for bs in args.batch_sizes:
            group = [r for r in rows if r["arch"] == arch and r["batch_size"] == bs]
            cells = [f"{v}={mean_std([100 * r[f'acc_{v}'] for r in group])[0]:.2f}%" for v in VARIANTS]
            shifts = [k for k in group[0] if k.startswith("est_shift") and not math.isnan(group[0][k])]
            extra = [f"{k}={mean_std([r[k] for r in group])[0]:.3f}" for k in ("gap_var_max", *shifts)]
            print(f"{arch} batch {bs}: " + " ".join(cells + extra))


if __name__ == "__main__":
    main()
