"""BatchNorm under distribution shift: training statistics, precise statistics, or statistics of the shifted data?

Li et al. (2016), "Revisiting Batch Normalization For Practical Domain Adaptation" (AdaBN): a network trained on
one domain adapts to another when its BatchNorm statistics are recomputed on the new domain's inputs; no labels
and no weight updates are needed. Schneider et al. (2020), "Improving robustness against common corruptions by
covariate shift adaptation": the same re-estimation on corrupted test images (ImageNet-C) recovers much of the
accuracy the corruption costs, and how many test samples it needs matters.

Per seed, ``ConvNetClassifier`` is trained on ``DigitsDataModule`` with the packaged recipe (batch 64, 15 epochs,
``SGDWarmup`` with 1 warmup epoch and cosine decay, ``padding="same"``) and no recalibration callback. The digits
test set (360 images) is then corrupted deterministically (``_shifts.py``: contrast, brightness, Gaussian noise,
blur, 4 severities each, in pixel space [0, 1], then standardized with the training set's mean and std as the
data module does) and evaluated with three sets of BatchNorm statistics on the same trained weights, each on its
own deep copy:

* ``ema``: the training run's running statistics (the model as trained);
* ``precise``: ``recalibrate_bn`` on the whole training set (precise BN);
* ``adabn``: ``recalibrate_bn`` on the shifted test images themselves (their labels unused), all 360 of them.

A second part recomputes the ``adabn`` statistics from only ``num_samples`` random shifted test images (several
random subsets per size) and evaluates the whole shifted test set with them: how many samples does it need?

    python examples/experiments/bn_shift.py   # results in a scratch folder; --publish: in docs/experiments
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from _common import (
    Timer,
    command_line,
    mean_std,
    new_figure,
    parse_args,
    quiet_lightning,
    quiet_trainer,
    recalibrated_copy,
    save_figure,
    seed_all,
    summarize,
    write_csv,
    write_summary,
)
from _common import accuracy as eval_accuracy
from _shifts import SHIFTS, gaussian_noise
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bnsgd import ConvNetClassifier, DigitsDataModule, SGDWarmup

NAME = "bn_shift"
# Severity parameters 1-4 per shift (severity 0 is the clean test set): contrast factor, brightness offset,
# noise standard deviation and blur sigma (pixels), all in pixel units of [0, 1] images.
SEVERITIES: dict[str, tuple[float, ...]] = {
    "contrast": (0.7, 0.5, 0.35, 0.2),
    "brightness": (0.1, 0.2, 0.3, 0.4),
    "gaussian_noise": (0.1, 0.2, 0.3, 0.4),
    "blur": (0.5, 0.7, 0.9, 1.1),
}
SAMPLE_SIZES = (4, 8, 16, 32, 64, 128)
VARIANTS = ("ema", "precise", "adabn")
SHIFT_COLORS = {"none": "black", "contrast": "tab:purple", "brightness": "tab:orange", "gaussian_noise": "tab:brown"}
SHIFT_COLORS["blur"] = "tab:cyan"
EVAL_BATCH = 256


def conditions(smoke: bool) -> list[tuple[str, int, float]]:
    """``(shift, severity, parameter)`` for the clean test set and every shift and severity (smoke: the last)."""
    grid = [("none", 0, 0.0)]
    for shift, params in SEVERITIES.items():
        levels = list(enumerate(params, start=1))
        grid += [(shift, level, param) for level, param in (levels[-1:] if smoke else levels)]
    return grid


def split_tensors(data: DigitsDataModule, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(images, labels)`` tensors of one split (``"train"`` or ``"test"``) of ``data``."""
    loader = data.train_dataloader() if split == "train" else data.test_dataloader()
    dataset = loader.dataset
    if not isinstance(dataset, TensorDataset):
        raise TypeError(
            f"expected DigitsDataModule's {split} split to be a TensorDataset, got {type(dataset).__name__}"
        )
    images, labels = dataset.tensors
    return images, labels


def shifted_test_images(shift: str, severity: int, param: float, raw: DigitsDataModule) -> torch.Tensor:
    """The test images under ``shift`` at ``param``, standardized with the training set's pixel mean and std.

    ``raw`` is the data module with ``normalize=False`` (same split): pixels in [0, 1]. The noise of
    ``gaussian_noise`` is seeded by the severity, so every training seed sees the same corrupted test set.
    """
    train_x, _ = split_tensors(raw, "train")
    test_x, _ = split_tensors(raw, "test")
    if shift == "gaussian_noise":
        images = gaussian_noise(test_x, param, seed=severity)
    elif shift == "none":
        images = test_x.clone()
    else:
        images = SHIFTS[shift](test_x, param)
    return (images - train_x.mean()) / train_x.std()


def train(seed: int, epochs: int) -> nn.Module:
    """One training run with the packaged recipe; returns the trained network (its own running statistics)."""
    seed_all(seed)
    data = DigitsDataModule(batch_size=64)
    model = ConvNetClassifier(input_size=data.input_size, padding="same", optimizer=SGDWarmup(warmup_epochs=1))
    quiet_trainer(epochs, limit_val_batches=0).fit(model, datamodule=data)
    return model.net


def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of a deep copy of ``net`` in eval mode on ``images``; ``net`` itself is untouched."""
    return eval_accuracy(copy.deepcopy(net), DataLoader(TensorDataset(images, labels), batch_size=EVAL_BATCH))


def adapted(net: nn.Module, images: torch.Tensor) -> tuple[nn.Module, tuple[float, float]]:
    """AdaBN: a copy of ``net`` with statistics recomputed on ``images`` alone (no labels); and how far they moved."""
    copied, report = recalibrated_copy(net, DataLoader(TensorDataset(images), batch_size=EVAL_BATCH))
    return copied, report.max_shift()


def evaluate_seed(
    seed: int, epochs: int, grid: Sequence[tuple[str, int, float]], sizes: Sequence[int], subsets: int
) -> list[dict[str, Any]]:
    """Train one seed, then test every condition with the three sets of statistics and the sample-count sweep."""
    net = train(seed, epochs)
    data = DigitsDataModule(batch_size=EVAL_BATCH)
    raw = DigitsDataModule(batch_size=EVAL_BATCH, normalize=False)
    clean_x, labels = split_tensors(data, "test")
    if not torch.allclose(shifted_test_images("none", 0, 0.0, raw), clean_x, atol=1e-5):
        raise RuntimeError("the unshifted test images do not match DigitsDataModule's standardized test set")
    precise, _ = recalibrated_copy(net, DataLoader(data.train_dataloader().dataset, batch_size=EVAL_BATCH))
    rows: list[dict[str, Any]] = []
    for shift, severity, param in grid:
        images = shifted_test_images(shift, severity, param, raw)
        common = {"seed": seed, "shift": shift, "severity": severity, "param": param}
        acc_ema, acc_precise = accuracy(net, images, labels), accuracy(precise, images, labels)
        # Recalibrating the precise copy or the EMA one gives the same statistics (they are recomputed from
        # scratch); starting from the precise copy makes the reported shift the distance from the training data's.
        full, (mean_shift, var_shift) = adapted(precise, images)
        acc_adabn = accuracy(full, images, labels)
        rows.append(
            {
                "part": "all",
                **common,
                "num_samples": len(images),
                "subset": "",
                "acc_ema": acc_ema,
                "acc_precise": acc_precise,
                "acc_adabn": acc_adabn,
                "adabn_minus_precise": acc_adabn - acc_precise,
                "mean_shift": mean_shift,
                "var_shift": var_shift,
            }
        )
        for size in sizes:
            for subset in range(subsets):
                generator = torch.Generator().manual_seed(seed * 100_003 + severity * 1_009 + size * 101 + subset)
                chosen = torch.randperm(len(images), generator=generator)[:size]
                few, (mean_shift, var_shift) = adapted(precise, images[chosen])
                acc_few = accuracy(few, images, labels)
                rows.append(
                    {
                        "part": "samples",
                        **common,
                        "num_samples": size,
                        "subset": subset,
                        "acc_ema": acc_ema,
                        "acc_precise": acc_precise,
                        "acc_adabn": acc_few,
                        "adabn_minus_precise": acc_few - acc_precise,
                        "mean_shift": mean_shift,
                        "var_shift": var_shift,
                    }
                )
    return rows


def percent_cell(rows: Sequence[dict[str, Any]], column: str) -> str:
    """``mean ± std`` of ``column`` x100 over ``rows``, one decimal."""
    mean, std = mean_std([100 * r[column] for r in rows])
    return f"{mean:.1f} ± {std:.1f}"


def sample_table(rows: Sequence[dict[str, Any]], sizes: Sequence[int]) -> str:
    """Markdown: one line per shift and severity, AdaBN accuracy (%) per number of adaptation samples."""
    full = [r for r in rows if r["part"] == "all"]
    keys = list(dict.fromkeys((r["shift"], r["severity"], r["param"]) for r in full))
    total = full[0]["num_samples"]
    header = ["shift", "severity", "param", "precise", *(f"n={n}" for n in sizes), f"n={total} (all)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in keys:
        these = [r for r in rows if (r["shift"], r["severity"], r["param"]) == key]
        whole = [r for r in these if r["part"] == "all"]
        few = [[r for r in these if r["part"] == "samples" and r["num_samples"] == n] for n in sizes]
        cells = [*map(str, key), percent_cell(whole, "acc_precise"), *(percent_cell(f, "acc_adabn") for f in few)]
        cells.append(percent_cell(whole, "acc_adabn"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], sizes: Sequence[int], path: Path) -> None:
    """Four panels of accuracy vs severity (one per shift); AdaBN vs samples; AdaBN gain vs statistics shift."""
    fig, axes = new_figure(ncols=3, nrows=2, width=4.3, height=3.5)
    from matplotlib.ticker import ScalarFormatter  # after new_figure has set the Agg backend

    full = [r for r in rows if r["part"] == "all"]
    colors = {"ema": "tab:red", "precise": "tab:blue", "adabn": "tab:green"}
    labels = {
        "ema": "(a) training running stats",
        "precise": "(b) precise BN, train data",
        "adabn": "(c) AdaBN, shifted test data",
    }
    shifts = [s for s in SEVERITIES if any(r["shift"] == s for r in full)]
    for i, shift in enumerate(shifts):
        ax = axes[i // 3][i % 3]
        these = [r for r in full if r["shift"] in ("none", shift)]
        levels = sorted({(r["severity"], r["param"]) for r in these})
        for variant in VARIANTS:
            stat = [mean_std([100 * r[f"acc_{variant}"] for r in these if r["severity"] == s]) for s, _ in levels]
            ax.errorbar(
                [s for s, _ in levels],
                [m for m, _ in stat],
                yerr=[d for _, d in stat],
                marker="o",
                ms=4,
                capsize=3,
                color=colors[variant],
                label=labels[variant],
                ls="--" if variant == "ema" else "-",
            )
        ax.set_xticks([s for s, _ in levels], [f"{s}\n({p:g})" if s else "0\n(clean)" for s, p in levels])
        ax.set_title(shift.replace("_", " "))
        ax.set_xlabel("severity (parameter)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7, loc="lower left")

    ax = axes[1][1]
    sweep = [r for r in rows if r["part"] == "samples"]
    for shift in ["none", *shifts]:
        present = {r["severity"] for r in sweep if r["shift"] == shift}
        severity = 3 if 3 in present else max(present)  # the middle-to-hard severity 3 (smoke: the one there is)
        these = [r for r in sweep if r["shift"] == shift and r["severity"] == severity]
        all_rows = [r for r in full if r["shift"] == shift and r["severity"] == severity]
        total = all_rows[0]["num_samples"]
        xs = [*sizes, total]
        stat = [mean_std([100 * r["acc_adabn"] for r in these if r["num_samples"] == n]) for n in sizes]
        stat.append(mean_std([100 * r["acc_adabn"] for r in all_rows]))
        color = SHIFT_COLORS[shift]
        name = "clean" if shift == "none" else f"{shift.replace('_', ' ')} {severity}"
        ax.errorbar(
            xs, [m for m, _ in stat], yerr=[d for _, d in stat], marker="o", ms=3, capsize=2, color=color, label=name
        )
        precise, _ = mean_std([100 * r["acc_precise"] for r in all_rows])
        ax.axhline(precise, color=color, ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("shifted test images used by AdaBN (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("AdaBN from few samples\n(dotted: precise BN, no adaptation)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)

    ax = axes[1][2]
    for shift in ["none", *shifts]:
        these = [r for r in full if r["shift"] == shift]
        color = SHIFT_COLORS[shift]
        ax.scatter(
            [r["var_shift"] for r in these],
            [100 * r["adabn_minus_precise"] for r in these],
            s=10,
            alpha=0.6,
            color=color,
            label="clean" if shift == "none" else shift.replace("_", " "),
        )
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("statistics shift: test vs train (worst layer,\nmean |log variance ratio|)")
    ax.set_ylabel("AdaBN - precise BN (accuracy points)")
    ax.set_title("gain vs measured shift\n(one dot per seed and condition)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    def extra(parser: Any) -> None:
        parser.add_argument(
            "--sizes",
            type=int,
            nargs="+",
            default=list(SAMPLE_SIZES),
            help="AdaBN sample counts (default: %(default)s)",
        )
        parser.add_argument("--subsets", type=int, default=5, help="random subsets per sample count (default: 5)")

    args = parse_args(__doc__, epochs=15, seeds=(0, 1, 2, 3, 4), extra=extra, argv=argv)
    if args.smoke:
        args.epochs, args.sizes, args.subsets = 1, args.sizes[:1], 1
    quiet_lightning()
    grid = conditions(args.smoke)
    rows: list[dict[str, Any]] = []
    with Timer(NAME):
        for seed in args.seeds:
            seed_rows = evaluate_seed(seed, args.epochs, grid, args.sizes, args.subsets)
            rows += seed_rows
            clean = next(r for r in seed_rows if r["part"] == "all" and r["shift"] == "none")
            print(
                f"seed {seed}: clean test acc ema {clean['acc_ema']:.4f} precise {clean['acc_precise']:.4f} "
                f"adabn {clean['acc_adabn']:.4f}"
            )
        write_csv(rows, args.out_dir / f"{NAME}.csv")
        accs = ["acc_ema", "acc_precise", "acc_adabn", "adabn_minus_precise"]
        table = (
            "**(a) Test accuracy (%) of the same weights with (a) the training run's running statistics, (b) precise "
            "statistics of the training set, (c) statistics of the shifted test images (AdaBN, all 360, labels "
            "unused); `adabn_minus_precise` in points; `var_shift`: distance of the AdaBN statistics from the "
            "precise ones (worst layer, mean over channels of |log variance ratio|)**\n\n"
        )
        table += summarize(
            [r for r in rows if r["part"] == "all"],
            ["shift", "severity", "param"],
            [*accs, "var_shift"],
            percent=accs,
        )
        table += (
            f"\n**(b) Test accuracy (%) with AdaBN statistics from only `n` random shifted test images, evaluated on "
            f"all 360 ({args.subsets} subsets per size x {len(args.seeds)} seeds); `precise`: no adaptation**\n\n"
        )
        table += sample_table(rows, args.sizes)
        write_summary(table, args.out_dir / f"{NAME}_summary.md", command_line())
        plot(rows, args.sizes, args.out_dir / f"{NAME}.png")


if __name__ == "__main__":
    main()
