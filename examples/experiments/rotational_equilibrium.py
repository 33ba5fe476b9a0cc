"""Rotational equilibrium: does the measured angular update of BN-normalized weights converge to sqrt(2 lr wd / (1+m))?

Question: a conv weight followed by BatchNorm is scale-invariant. Under SGD with weight decay ``wd``, momentum
``m`` and a constant LR ``lr``, Wan et al. 2021 ("Spherical Motion Dynamics", arXiv 2006.08419) and Kosson et al.
2023 ("Rotational Equilibrium", arXiv 2305.17212) predict that its norm and its angular update per step settle to
an equilibrium where the expected angle per step is ``sqrt(2 lr wd / (1 + m))`` whatever the layer; with Nesterov
momentum our derivation multiplies it by ``sqrt(1 + 2m - 2m^3)``. The relaxation takes about
``(1 - m) / (2 lr wd)`` steps (the time constant of ``||w||^2`` under weight decay).

Here: ``BNConvNet(channels=(32, 64, 128), padding="same", norm_position="pre_activation")`` (Conv-BN-ReLU, so each
conv weight alone is scale-invariant) on the 8x8 digits, batch 32 (40 steps per epoch), constant-LR
``torch.optim.SGD`` with weight decay on conv/linear weights only (`param_groups`), 60 epochs (2,400 steps).
``WeightDynamicsMonitor(log_every_n_steps=1)`` measures every step's angle; per layer, the measured value is the
root mean square of the angle per step over the last third of the run (steps 1,601-2,400), since the theory
predicts the expected *squared* update; the plain mean is reported too.

Run: ``python examples/experiments/rotational_equilibrium.py`` (``--smoke`` for a quick check).
"""

from __future__ import annotations

import argparse
import math
import statistics
from typing import Any

from _common import (
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
from _dynamics import DynamicsRecorder, SGDClassifier, running_mean

from lightning_bnsgd import DigitsDataModule
from lightning_bnsgd.bn.dynamics import equilibrium_angular_update
from lightning_bnsgd.callbacks.dynamics_monitor import WeightDynamicsMonitor

NAME = "rotational_equilibrium"
LAYERS = ("net.features.0.conv", "net.features.1.conv", "net.features.2.conv")
#: (lr, weight decay, momentum, nesterov): relaxation times (1 - m) / (2 lr wd) of 100 to 500 steps.
SETTINGS = (
    (0.1, 5e-3, 0.9, False),
    (0.05, 5e-3, 0.9, False),
    (0.1, 1e-3, 0.9, False),
    (0.1, 5e-3, 0.5, False),
    (0.2, 5e-3, 0.0, False),
    (0.1, 5e-3, 0.9, True),
)
SMOKE_SETTINGS = SETTINGS[:1]


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default: %(default)s)")


def label(setting: tuple[float, float, float, bool]) -> str:
    lr, wd, m, nesterov = setting
    return f"lr {lr:g}, wd {wd:g}, m {m:g}{' Nesterov' if nesterov else ''}"


def run_one(setting: tuple[float, float, float, bool], seed: int, args: argparse.Namespace, epochs: int) -> list[dict]:
    """Train one setting with one seed; one row per scale-invariant layer."""
    lr, wd, m, nesterov = setting
    seed_all(seed)
    model = SGDClassifier(
        lr, wd, m, nesterov, input_size=8, padding="same", channels=(32, 64, 128), norm_position="pre_activation"
    )
    recorder = DynamicsRecorder()
    monitor = WeightDynamicsMonitor(log_every_n_steps=1, log_grad_flow=False, warn_off_equilibrium=False)
    trainer = quiet_trainer(epochs, [monitor], logger=recorder, limit_val_batches=0)
    trainer.fit(model, DigitsDataModule(batch_size=args.batch_size))
    predicted = equilibrium_angular_update(lr, wd, m, nesterov)
    rows = []
    for layer in LAYERS:
        steps, angles = recorder.series(f"dynamics/{layer}/angular_update")
        _, norms = recorder.series(f"dynamics/{layer}/weight_norm")
        tail = angles[len(angles) * 2 // 3 :]
        measured = math.sqrt(statistics.fmean([a * a for a in tail]))  # the theory predicts E[angle^2]
        rows.append(
            {
                "setting": label(setting),
                "lr": lr,
                "weight_decay": wd,
                "momentum": m,
                "nesterov": int(nesterov),
                "relaxation_steps": round((1 - m) / (2 * lr * wd)),
                "layer": layer,
                "seed": seed,
                "steps": steps[-1],
                "measured": measured,
                "predicted": predicted,
                "ratio": measured / predicted,
                "ratio_mean": statistics.fmean(tail) / predicted,
                "norm_start": norms[0],
                "norm_end": norms[-1],
                "angles": angles,
            }
        )
    return rows


def plot(rows: list[dict[str, Any]], path: Any) -> None:
    """Left: angle per step / prediction over training for the first setting; right: ratio per setting."""
    fig, axes = new_figure(ncols=2, width=5.6)
    ax_t, ax_r = axes[0]
    first = rows[0]["setting"]
    colors = ("tab:blue", "tab:orange", "tab:green")
    for layer, color in zip(LAYERS, colors, strict=True):
        mine = [r for r in rows if r["setting"] == first and r["layer"] == layer]
        for i, r in enumerate(mine):
            smooth = running_mean(r["angles"], 40)
            ax_t.plot(
                range(1, len(smooth) + 1),
                [a / r["predicted"] for a in smooth],
                color=color,
                lw=0.8,
                label=layer.replace("net.features.", "block ").replace(".conv", "") if i == 0 else None,
            )
    ax_t.axhline(1.0, color="black", ls=":", lw=1)
    ax_t.set(yscale="log", xlabel="optimizer step", ylabel="angular update / predicted")
    ax_t.set_title(f"{first} (running mean of 40 steps, every seed)", fontsize=9)
    ax_t.legend(fontsize=8)
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    width = 0.8 / len(LAYERS)
    for j, (layer, color) in enumerate(zip(LAYERS, colors, strict=True)):
        stats = [mean_std([r["ratio"] for r in rows if r["setting"] == s and r["layer"] == layer]) for s in settings]
        xs = [i + (j - 1) * width for i in range(len(settings))]
        ax_r.bar(xs, [mu for mu, _ in stats], width, yerr=[sd for _, sd in stats], color=color, alpha=0.8)
    ax_r.axhline(1.0, color="black", ls=":", lw=1)
    ax_r.set_xticks(range(len(settings)), [s.replace(", m", "\nm") for s in settings], fontsize=7, rotation=30)
    ax_r.set(ylabel="RMS angle / predicted (last third)")
    ax_r.set_title("Equilibrium ratio per setting and block (mean ± std)", fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    """Run every setting with every seed; write the CSV, the summary table and the figure."""
    args = parse_args(__doc__, epochs=60, extra=_extra, argv=argv)
    quiet_lightning()
    settings = SMOKE_SETTINGS if args.smoke else SETTINGS
    epochs = 2 if args.smoke else args.epochs
    rows: list[dict[str, Any]] = []
    with Timer(NAME):
        for setting in settings:
            for seed in args.seeds:
                new = run_one(setting, seed, args, epochs)
                rows += new
                ratios = ", ".join(f"{r['ratio']:.2f}" for r in new)
                print(f"{label(setting):<32} seed {seed}: measured / predicted per block {ratios}", flush=True)
        write_csv([{k: v for k, v in r.items() if k != "angles"} for r in rows], args.out_dir / f"{NAME}.csv")
        table = summarize(
            rows, ["setting", "relaxation_steps", "layer"], ["ratio", "ratio_mean", "measured", "predicted"], digits=3
        )
        overall = [r["ratio"] for r in rows]
        mu, sd = mean_std(overall)
        worst = max(abs(math.log(r)) for r in overall)
        table += (
            f"\n`ratio`: root mean square of the angle per step over the last third of the run / predicted; "
            f"`ratio_mean`: its plain mean / predicted. All {len(overall)} layer runs: `ratio` {mu:.3f} ± {sd:.3f}; "
            f"the farthest is {math.exp(worst):.2f}x off.\n"
        )
        write_summary(table, args.out_dir / f"{NAME}_summary.md", command_line())
        plot(rows, args.out_dir / f"{NAME}.png")
    print(table)


if __name__ == "__main__":
    main()
