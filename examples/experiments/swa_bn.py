"""SWA and BatchNorm: which statistics should the averaged weights use?

Izmailov et al. (2018), "Averaging Weights Leads to Wider Optima and Better Generalization": the average of SGD
iterates (SWA) is a new network whose BatchNorm statistics nobody has measured, so they must be recomputed with a
pass over the training data before the averaged model is used. Lightning's ``StochasticWeightAveraging`` does this
with an extra epoch of forwards (BatchNorm with ``momentum=None``: the equal-weight average of the per-batch
statistics); ``BNRecalibration`` listed after it replaces them with the exact population statistics.

Per seed and condition, three training runs from the same seed: Lightning's SWA alone, the same SWA with
``BNRecalibration(num_samples=None)`` listed after it, and plain SGD. They give:

* ``lightning_swa``: Lightning's final model as shipped, from the run with SWA alone (averaged weights, its own
  BatchNorm update, plus the stray optimizer step Lightning takes in that epoch when no validation ran before it);
* ``lightning_swa+recal``: the final model of the run with ``BNRecalibration`` after SWA (it drops the stale
  gradients at the start of SWA's BatchNorm-update epoch, so the weights stay the average, then sets exact
  statistics from the whole training set);
* ``stepped_w+exact_bn``: Lightning's final weights (``lightning_swa``) with exact statistics (``recalibrate_bn``),
  which separates the cost of the stray step from that of the statistics;
* ``avg_w+last_bn``: the averaged weights (as Lightning transfers them) with the running statistics of the last
  SGD iterate, i.e. no BatchNorm update;
* ``avg_w+avg_bn``: the averaged weights with the running statistics averaged over the same snapshots;
* ``avg_w+exact_bn``: the averaged weights with exact statistics (``recalibrate_bn``, whole training set);
* ``sgd_last``: the last SGD iterate of the SWA run with its own running statistics;
* ``sgd_cosine``: the plain SGD run (same seed, same epochs, cosine decay to 0, no SWA), the reference.

Setting: digits, batch 64, 20 epochs, peak LR 0.1 with 1 warmup epoch and cosine decay until SWA takes over the
LR at epoch 11 (``swa_epoch_start=11``, ``annealing_epochs=1``: a constant SWA LR of 0.2 from epoch 12, high so
that the iterates differ); Lightning averages the weights at the start of epochs 11-20. With clean labels and with
20% of the training labels replaced (a harder task where averaging matters more).

    python examples/experiments/swa_bn.py   # results in a scratch folder; --publish: in docs/experiments
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
from torch.utils.data import DataLoader

from lightning_bnsgd import BNRecalibration, ConvNetClassifier, DigitsDataModule, SGDWarmup, recalibrate_bn
from lightning_bnsgd.bn import statistics_shift

NAME = "swa_bn"
VARIANTS = (
    "lightning_swa",
    "lightning_swa+recal",
    "stepped_w+exact_bn",
    "avg_w+last_bn",
    "avg_w+avg_bn",
    "avg_w+exact_bn",
    "sgd_last",
    "sgd_cosine",
)
State = dict[str, torch.Tensor]


def clone_state(net: nn.Module) -> State:
    """A detached copy of ``net``'s state dict."""
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def is_bn_buffer(key: str) -> bool:
    """Whether a state-dict key is a BatchNorm buffer (running statistics or batch counter)."""
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def merge(weights: State, buffers: State) -> State:
    """Parameters from ``weights``, BatchNorm buffers from ``buffers``."""
    return {k: (buffers[k] if is_bn_buffer(k) else weights[k]).clone() for k in weights}


def bn_error(net: nn.Module, loader: DataLoader) -> tuple[float, float]:
    """How far ``net``'s BatchNorm statistics are from the exact ones of its own weights (on a copy).

    Mean over layers of ``recalibrate_bn``'s shift: per channel ``|mean - exact| / sqrt(exact_var + eps)`` and
    ``|log((var + eps) / (exact_var + eps))|``, averaged over channels.
    """
    _, report = recalibrated_copy(net, loader)
    shifts = list(report.shift.values())
    return sum(s.mean for s in shifts) / len(shifts), sum(s.var for s in shifts) / len(shifts)


def buffer_error(state: State, exact: State) -> tuple[float, float]:
    """The same two distances as ``bn_error`` (``statistics_shift``), between the BatchNorm buffers of two states."""
    shifts = []
    for key in state:
        if key.endswith("running_mean"):
            var_key = key[: -len("mean")] + "var"
            shifts.append(statistics_shift(state[key], state[var_key], exact[key], exact[var_key]))
    mean, var = torch.stack(shifts).mean(0).tolist()
    return mean, var


class BeforeSWA(Callback):
    """Listed BEFORE ``StochasticWeightAveraging``: sees the SGD iterate at the moments SWA averages it."""

    def __init__(self, swa: Any) -> None:
        self.swa = swa
        self.buffer_sum: State = {}
        self.snapshots = 0
        self.last_iterate: State | None = None
        self.lrs: list[float] = []

    def on_train_epoch_start(self, trainer: Trainer, pl_module: Any) -> None:
        epoch = trainer.current_epoch
        if self.swa.swa_start <= epoch <= self.swa.swa_end:
            for key, value in clone_state(pl_module.net).items():
                if key.endswith(("running_mean", "running_var")):
                    self.buffer_sum[key] = self.buffer_sum.get(key, 0) + value.double()
            self.snapshots += 1
        if epoch == self.swa.swa_end + 1:  # the extra epoch of Lightning's BatchNorm update starts
            self.last_iterate = clone_state(pl_module.net)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
        self.lrs.append(float(trainer.optimizers[0].param_groups[0]["lr"]))

    def averaged_buffers(self) -> State:
        return {k: (v / self.snapshots).float() for k, v in self.buffer_sum.items()}


class AfterSWA(Callback):
    """Listed AFTER ``StochasticWeightAveraging`` and before ``BNRecalibration``: sees what SWA produced."""

    def __init__(self, swa: Any) -> None:
        self.swa = swa
        self.averaged: State | None = None
        self.lightning_final: State | None = None
        self.steps_in_bn_epoch = 0
        self.stale_grads = False
        self.one_step: State | None = None
        self._step = 0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: Any) -> None:
        if trainer.current_epoch == self.swa.swa_end + 1:  # SWA has just copied the average into the module
            self.averaged = clone_state(pl_module.net)
            self._step = trainer.global_step
            self.stale_grads = any(p.grad is not None for p in pl_module.parameters())
            self.one_step = one_sgd_step(trainer.optimizers[0], pl_module.net)

    def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
        self.lightning_final = clone_state(pl_module.net)
        self.steps_in_bn_epoch = trainer.global_step - self._step


def one_sgd_step(optimizer: torch.optim.Optimizer, net: nn.Module) -> State:
    """What one ``optimizer.step()`` with the gradients and optimizer state present now would make of ``net``'s
    parameters, computed on copies (neither ``net`` nor ``optimizer`` changes)."""
    names = {id(p): name for name, p in net.named_parameters()}
    copies: State = {}
    groups = []
    for group in optimizer.param_groups:
        params = []
        for param in group["params"]:
            twin = param.detach().clone().requires_grad_(True)
            twin.grad = None if param.grad is None else param.grad.detach().clone()
            copies[names[id(param)]] = twin
            params.append(twin)
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    twin_optimizer = type(optimizer)(groups)
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    twin_optimizer.step()
    return {name: twin.detach() for name, twin in copies.items()}


def make_model(data: DigitsDataModule) -> ConvNetClassifier:
    optimizer = SGDWarmup(lr=0.1, warmup_epochs=1.0, decay="cosine")
    return ConvNetClassifier(input_size=data.input_size, padding="same", optimizer=optimizer)


def max_param_diff(a: State, b: State) -> float:
    """Largest absolute difference over all parameters (BatchNorm buffers excluded) of two state dicts."""
    return max(float((a[k] - b[k]).abs().max()) for k in a if not is_bn_buffer(k))


def swa_run(
    seed: int, data: DigitsDataModule, epochs: int, swa_start: int, swa_lr: float, recalibrate: bool
) -> tuple[ConvNetClassifier, BeforeSWA, AfterSWA]:
    """One training run with Lightning's SWA, alone or followed by ``BNRecalibration``; no validation."""
    seed_all(seed)
    model = make_model(data)
    swa = pl.callbacks.StochasticWeightAveraging(swa_lrs=swa_lr, swa_epoch_start=swa_start, annealing_epochs=1)
    before, after = BeforeSWA(swa), AfterSWA(swa)
    callbacks: list[Any] = [before, swa, after]
    if recalibrate:
        callbacks.append(BNRecalibration(num_samples=None, before_validation=False, at_train_end=True))
    quiet_trainer(epochs, callbacks, limit_val_batches=0).fit(model, datamodule=data)
    assert before.last_iterate is not None and after.averaged is not None and after.lightning_final is not None
    return model, before, after


def run_seed(seed: int, label_noise: float, epochs: int, swa_start: int, swa_lr: float) -> list[dict[str, Any]]:
    """SWA alone, SWA + BNRecalibration and plain SGD from the same seed; returns one row per variant."""
    data = DigitsDataModule(batch_size=64, label_noise=label_noise)
    data.setup("fit")
    alone, before, after = swa_run(seed, data, epochs, swa_start, swa_lr, recalibrate=False)
    fixed, _, fixed_after = swa_run(seed, data, epochs, swa_start, swa_lr, recalibrate=True)

    seed_all(seed)
    reference = make_model(data)
    quiet_trainer(epochs, limit_val_batches=0).fit(reference, datamodule=data)

    loader = DataLoader(data.train_dataloader().dataset, batch_size=64)
    assert after.averaged is not None and after.lightning_final is not None and before.last_iterate is not None
    assert fixed_after.averaged is not None
    exact_for_average = copy.deepcopy(alone.net)
    exact_for_average.load_state_dict(after.averaged)
    recalibrate_bn(exact_for_average.train(), loader)
    exact_for_stepped = copy.deepcopy(alone.net)
    exact_for_stepped.load_state_dict(after.lightning_final)
    recalibrate_bn(exact_for_stepped.train(), loader)
    states = {
        "lightning_swa": after.lightning_final,
        "lightning_swa+recal": clone_state(fixed.net),
        "stepped_w+exact_bn": clone_state(exact_for_stepped),
        "avg_w+last_bn": merge(after.averaged, before.last_iterate),
        "avg_w+avg_bn": merge(after.averaged, {**before.last_iterate, **before.averaged_buffers()}),
        "avg_w+exact_bn": clone_state(exact_for_average),
        "sgd_last": before.last_iterate,
        "sgd_cosine": clone_state(reference.net),
    }
    assert after.one_step is not None
    own_mean_err, own_var_err = buffer_error(states["lightning_swa"], states["avg_w+exact_bn"])
    diagnostics = {
        "swa_snapshots": before.snapshots,
        "swa_lr_last_epoch": before.lrs[-1],
        "steps_in_bn_epoch": after.steps_in_bn_epoch,
        "grads_at_bn_epoch_start": after.stale_grads,
        # Lightning alone: how far its final weights are from the average, and how far from one optimizer step
        "drift_alone": max_param_diff(after.averaged, after.lightning_final),
        "drift_alone_minus_one_step": max_param_diff(after.one_step, after.lightning_final),
        # with BNRecalibration: same average (identical training up to there), final weights vs that average
        "average_alone_vs_fixed": max_param_diff(after.averaged, fixed_after.averaged),
        "drift_recal": max_param_diff(fixed_after.averaged, clone_state(fixed.net)),
        "recal_vs_exact_average": max_param_diff(states["avg_w+exact_bn"], states["lightning_swa+recal"]),
        "lightning_bn_mean_err_vs_avg": own_mean_err,
        "lightning_bn_var_err_vs_avg": own_var_err,
    }
    rows = []
    net = copy.deepcopy(alone.net)
    for variant in VARIANTS:
        net.load_state_dict(states[variant])
        mean_err, var_err = bn_error(net, loader)
        rows.append(
            {
                "label_noise": label_noise,
                "seed": seed,
                "variant": variant,
                "test_acc": accuracy(net, data.test_dataloader()),
                "bn_mean_err": mean_err,
                "bn_var_err": var_err,
                **diagnostics,
            }
        )
    return rows


def plot(rows: list[dict[str, Any]], noises: list[float], path: Any) -> None:
    """Left: test accuracy per variant; right: BatchNorm variance error vs exact statistics per variant.

    Small dots: single runs; large markers with bars: mean ± std over seeds.
    """
    floor = 1e-5
    fig, axes = new_figure(ncols=2, width=6.0, height=4.2)
    left, right = axes[0]
    xs = range(len(VARIANTS))
    for i, noise in enumerate(noises):
        offset = (i - (len(noises) - 1) / 2) * 0.22
        for ax, key, scale in ((left, "test_acc", 100.0), (right, "bn_var_err", 1.0)):
            means, stds = [], []
            for x, variant in zip(xs, VARIANTS, strict=True):
                values = [scale * r[key] for r in rows if r["label_noise"] == noise and r["variant"] == variant]
                if key == "bn_var_err":
                    values = [max(v, floor) for v in values]
                ax.plot([x + offset + 0.05] * len(values), values, ".", color=f"C{i}", alpha=0.35, ms=4)
                mean, std = mean_std(values)
                means.append(mean)
                stds.append(std)
            yerr = stds if key == "test_acc" else None
            ax.errorbar(
                [x + offset for x in xs],
                means,
                yerr=yerr,
                fmt="o",
                capsize=3,
                color=f"C{i}",
                label=f"label noise {noise:.0%}" + (" (mean ± std)" if yerr else " (mean)"),
            )
    left.set_ylabel("test accuracy (%)")
    left.set_title("Test accuracy per variant (mean ± std; dots: seeds)")
    right.set_yscale("log")
    right.set_ylim(bottom=floor / 2)
    right.set_ylabel("mean |log(var / exact var)| over channels")
    right.set_title(f"BatchNorm variance error vs exact (shown >= {floor:g})")
    for ax in (left, right):
        ax.set_xticks(list(xs))
        ax.set_xticklabels(VARIANTS, rotation=35, ha="right", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    def extra(parser: Any) -> None:
        parser.add_argument(
            "--label-noise", type=float, nargs="+", default=[0.0, 0.2], help="conditions (default: %(default)s)"
        )
        parser.add_argument(
            "--swa-start", type=int, default=11, help="Lightning's swa_epoch_start, 1-based (default: %(default)s)"
        )
        parser.add_argument("--swa-lr", type=float, default=0.2, help="constant SWA LR (default: %(default)s)")

    args = parse_args(__doc__, epochs=20, seeds=(0, 1, 2, 3, 4), extra=extra, argv=argv)
    if args.smoke:
        args.epochs, args.swa_start, args.label_noise = 2, 1, args.label_noise[:1]
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", ".*SWA is currently only supported every epoch.*")
    rows: list[dict[str, Any]] = []
    with Timer(NAME):
        for noise in args.label_noise:
            for seed in args.seeds:
                result = run_seed(seed, noise, args.epochs, args.swa_start, args.swa_lr)
                rows.extend(result)
                print(f"noise {noise} seed {seed}: " + ", ".join(f"{r['variant']} {r['test_acc']:.4f}" for r in result))
        write_csv(rows, args.out_dir / f"{NAME}.csv")
        table = "**Test accuracy (%)**\n\n"
        table += summarize(rows, ["label_noise", "variant"], ["test_acc"], percent=["test_acc"])
        table += "\n**BatchNorm statistics vs the exact statistics of the same weights (mean over layers)**\n\n"
        table += summarize(rows, ["label_noise", "variant"], ["bn_mean_err", "bn_var_err"], digits=4)
        first = [r for r in rows if r["variant"] == VARIANTS[0]]
        steps = sorted({r["steps_in_bn_epoch"] for r in first})
        grads = sorted({r["grads_at_bn_epoch_start"] for r in first})
        same = max(r["average_alone_vs_fixed"] for r in first)
        table += (
            f"\nSnapshots averaged per run: {sorted({r['swa_snapshots'] for r in first})}; LR in the last epoch: "
            f"{sorted({round(r['swa_lr_last_epoch'], 6) for r in first})}. Optimizer steps during Lightning's "
            f"BatchNorm-update epoch: {steps}; gradients of the last SGD step still present when it starts: {grads}. "
            f"Largest difference between the averages of the two SWA runs of a seed: {same:g}.\n"
            "\n**Final weights vs the SWA average (max abs over all parameters)**: `drift_alone`, Lightning's SWA "
            "alone; `drift_alone_minus_one_step`, Lightning's final weights vs one step of a copy of its optimizer "
            "from the average; `drift_recal`, with `BNRecalibration` after SWA; `recal_vs_exact_average`, that "
            "model's weights vs `avg_w+exact_bn`.\n\n"
        )
        table += summarize(
            first,
            ["label_noise"],
            ["drift_alone", "drift_alone_minus_one_step", "drift_recal", "recal_vs_exact_average"],
            digits=6,
        )
        table += (
            "\n**Lightning's BatchNorm statistics vs the exact statistics of the weights they were computed for "
            "(the average, before the stray step)**\n\n"
        )
        table += summarize(
            first, ["label_noise"], ["lightning_bn_mean_err_vs_avg", "lightning_bn_var_err_vs_avg"], digits=4
        )
        write_summary(table, args.out_dir / f"{NAME}_summary.md", command_line())
        plot(rows, args.label_noise, args.out_dir / f"{NAME}.png")


if __name__ == "__main__":
    main()
