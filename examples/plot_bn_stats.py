"""Plot the BatchNorm statistics that ``BNStatsMonitor`` logged to a ``CSVLogger``.

One panel per statistic, one line per layer; the whole-model summary, where it exists, is a dashed black line.

    python examples/plot_bn_stats.py runs/digits/version_0/metrics.csv -o bn_stats.png
    python examples/plot_bn_stats.py metrics.csv --stats gap_var_max running_var_mean dead_frac
    python examples/plot_bn_stats.py metrics.csv --stats all

Needs matplotlib (``pip install "lightning-bnsgd[plots]"``).
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path

DEFAULT_STATS = (
    "running_mean_absmean",
    "running_var_mean",
    "running_var_min",
    "weight_std",
    "gain_max",
    "gap_mean_max",
    "gap_var_max",
    "samples_per_channel",
)
Series = dict[str, dict[str, list[tuple[float, float]]]]  # statistic -> layer -> [(step, value)]


def read_bn_metrics(path: str | Path, prefix: str = "bn/") -> Series:
    """Read the ``bn/<layer>/<statistic>`` columns of a CSVLogger ``metrics.csv`` (empty cells skipped)."""
    series: Series = defaultdict(lambda: defaultdict(list))
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step", "")
            if not step:
                continue
            for key, value in row.items():
                if not key or not key.startswith(prefix) or value in ("", None):
                    continue
                layer, _, stat = key[len(prefix) :].rpartition("/")
                if layer and stat:
                    series[stat][layer].append((float(step), float(value)))
    return series


def plot(series: Series, stats: list[str], output: str | Path, title: str | None = None) -> Path:
    """Draw one panel per statistic in ``stats`` and save the figure as ``output`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = [s for s in stats if s in series]
    if not stats:
        raise SystemExit(f"None of the requested statistics were logged; found: {sorted(series)}")
    cols = min(4, len(stats))
    rows = math.ceil(len(stats) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    layers = sorted({layer for s in stats for layer in series[s] if layer != "summary"})
    colors = {layer: plt.get_cmap("tab10")(i % 10) for i, layer in enumerate(layers)}
    for ax, stat in zip(axes.flat, stats, strict=False):
        for layer, points in sorted(series[stat].items()):
            points.sort()
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            if layer == "summary":
                ax.plot(xs, ys, "k--", linewidth=1.2, label="summary")
            else:
                ax.plot(xs, ys, color=colors[layer], linewidth=1.4, label=layer)
        ax.set_title(stat, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(stats) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    seen = dict(zip(labels, handles, strict=True))
    for ax in list(axes.flat)[1 : len(stats)]:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, h)
    fig.legend(list(seen.values()), list(seen), loc="lower center", ncol=min(len(seen), 4), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08 if rows == 1 else 0.05, 1, 1))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics_csv", help="a CSVLogger metrics.csv written during a run with BNStatsMonitor")
    parser.add_argument("-o", "--output", default="bn_stats.png", help="PNG file to write")
    parser.add_argument(
        "--stats",
        nargs="+",
        default=list(DEFAULT_STATS),
        help="statistics to plot, or 'all' (default: a useful 8)",
    )
    parser.add_argument("--title", default=None)
    args = parser.parse_args()
    series = read_bn_metrics(args.metrics_csv)
    stats = sorted(series) if args.stats == ["all"] else args.stats
    print(f"wrote {plot(series, stats, args.output, args.title)}")


if __name__ == "__main__":
    main()
