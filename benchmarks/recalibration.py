"""Cost and accuracy of ``recalibrate_bn`` next to plain forwards and ``torch.optim.swa_utils.update_bn``.

Prints, for ``BNConvNet`` and a ResNet-style model defined here:

* time ratios, measured side by side in one run (interleaved repeats, median):
  ``recalibrate_bn`` over K batches / K plain no-grad train-mode forwards, and
  ``recalibrate_bn`` / ``update_bn`` on the same batches;
* the error of each method's statistics against the exact ones, on shuffled and on class-sorted data. The
  exact statistics are those of the first BatchNorm layer's inputs over all samples at once (for deeper
  layers in train mode "exact" depends on the batch split, so the table uses the first layer).
  Errors: mean ``max_c |m - m*| / sqrt(v*)``; variance ``max_c |v - v*| / v*``.

Run ``python benchmarks/recalibration.py`` (``--quick`` for a shorter run). Times are never asserted.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from lightning_bnsgd.bn.recalibrate import recalibrate_bn
from lightning_bnsgd.models.cnn import BNConvNet


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet: stem, three stages of ``blocks`` basic blocks (16/32/64 channels), a head."""

    def __init__(self, in_channels: int = 1, blocks: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        layers: list[nn.Module] = []
        cin = 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks):
                layers.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


def make_data(n: int, size: int, sort: bool, seed: int = 0) -> torch.Tensor:
    """Grey images with a per-sample brightness offset; ``sort`` orders them by it (as class-sorted data)."""
    gen = torch.Generator().manual_seed(seed)
    offset = torch.randn(n, generator=gen) * 1.5
    x = torch.randn(n, 1, size, size, generator=gen) * 0.5 + offset.view(-1, 1, 1, 1)
    if sort:
        x = x[offset.argsort()]
    return x


def plain_forwards(model: nn.Module, batches: list[torch.Tensor]) -> None:
    model.train()
    with torch.no_grad():
        for b in batches:
            model(b)


def run_update_bn(model: nn.Module, batches: list[torch.Tensor]) -> None:
    update_bn(batches, model)


def run_recalibrate(model: nn.Module, batches: list[torch.Tensor]) -> None:
    model.train()
    recalibrate_bn(model, batches)


def time_ratios(model: nn.Module, batches: list[torch.Tensor], repeats: int) -> tuple[float, float, dict[str, float]]:
    """Times of the three methods, interleaved; returns the two median per-repeat ratios and median times."""
    methods: dict[str, Callable[[nn.Module, list[torch.Tensor]], None]] = {
        "plain": plain_forwards,
        "update_bn": run_update_bn,
        "recalibrate_bn": run_recalibrate,
    }
    times: dict[str, list[float]] = {k: [] for k in methods}
    for fn in methods.values():  # warm-up
        fn(model, batches[:2])
    for r in range(repeats):
        order = list(methods) if r % 2 == 0 else list(reversed(methods))
        for name in order:
            start = time.perf_counter()
            methods[name](model, batches)
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    # ratios per repeat (the three runs of one repeat are adjacent in time), then their median
    vs_plain = statistics.median(r / p for r, p in zip(times["recalibrate_bn"], times["plain"], strict=True))
    vs_update = statistics.median(r / u for r, u in zip(times["recalibrate_bn"], times["update_bn"], strict=True))
    med.update({f"min_{k}": min(v) for k, v in times.items()})
    return vs_plain, vs_update, med


def bookkeeping_overhead_us(repeats: int, layers: int = 32, forwards: int = 64) -> float:
    """Extra time per BatchNorm layer and forward (microseconds), on a chain of tiny BN layers (worst case)."""
    model = nn.Sequential(*[nn.BatchNorm1d(64) for _ in range(layers)])
    batches = [torch.randn(16, 64) for _ in range(forwards)]
    _, _, med = time_ratios(model, batches, repeats)
    return (med["recalibrate_bn"] - med["plain"]) / (layers * forwards) * 1e6


def first_bn(model: nn.Module) -> nn.BatchNorm2d:
    return next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def first_bn_inputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    captured: list[torch.Tensor] = []
    handle = first_bn(model).register_forward_pre_hook(lambda m, a: captured.append(a[0].double()))
    model.eval()
    with torch.no_grad():
        model(x)
    handle.remove()
    return captured[0]


def errors(model: nn.Module, exact_mean: torch.Tensor, exact_var: torch.Tensor) -> tuple[float, float]:
    bn = first_bn(model)
    assert bn.running_mean is not None and bn.running_var is not None
    mean_err = ((bn.running_mean.double() - exact_mean).abs() / exact_var.sqrt()).max()
    var_err = ((bn.running_var.double() - exact_var).abs() / exact_var).max()
    return float(mean_err), float(var_err)


def error_table(model: nn.Module, n: int, size: int, batch: int) -> list[tuple[str, str, float, float]]:
    rows = []
    for sort in (False, True):
        x = make_data(n, size, sort, seed=1)
        sizes = [batch] * (n // batch) + ([n % batch] if n % batch > 1 else [])
        batches = list(torch.split(x[: sum(sizes)], sizes))
        h = first_bn_inputs(model, torch.cat(batches))
        exact_mean, exact_var = h.mean((0, 2, 3)), h.var((0, 2, 3))
        for name, fn in (
            ("EMA over the batches (momentum 0.1, from reset)", plain_forwards),
            ("update_bn", run_update_bn),
            ("recalibrate_bn", run_recalibrate),
        ):
            m = copy.deepcopy(model)
            for layer in m.modules():
                if isinstance(layer, nn.BatchNorm2d):
                    layer.reset_running_stats()
            fn(m, batches)
            rows.append(("sorted" if sort else "shuffled", name, *errors(m, exact_mean, exact_var)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer batches and repeats (well under 2 minutes)")
    parser.add_argument("--batches", type=int, default=None, help="K: batches per timed run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier timings)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    k = args.batches or (8 if args.quick else 16)
    repeats = args.repeats or (5 if args.quick else 7)
    models = {
        "BNConvNet (28x28)": (BNConvNet(), 28),
        "SmallResNet-14 (32x32)": (SmallResNet(blocks=2), 32),
    }
    print(
        f"torch {torch.__version__}, cpu, {args.threads} thread(s), K={k} batches of {args.batch_size}, "
        f"{repeats} interleaved repeats (median of per-repeat ratios)"
    )
    print()
    print(
        "| model | plain fwd (s) | update_bn (s) | recalibrate_bn (s) | recal / plain | recal / update_bn "
        "| same, ratio of fastest runs |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, (model, size) in models.items():
        batches = list(torch.split(make_data(k * args.batch_size, size, sort=False), args.batch_size))
        r_plain, r_update, med = time_ratios(model, batches, repeats)
        print(
            f"| {name} | {med['plain']:.3f} | {med['update_bn']:.3f} | {med['recalibrate_bn']:.3f} "
            f"| {r_plain:.3f} | {r_update:.3f} "
            f"| {med['min_recalibrate_bn'] / med['min_plain']:.3f} / "
            f"{med['min_recalibrate_bn'] / med['min_update_bn']:.3f} |"
        )
    overhead = bookkeeping_overhead_us(repeats)
    print()
    print(f"Bookkeeping cost of recalibrate_bn (chain of 32 tiny BatchNorm1d layers): {overhead:.1f} us per layer")
    print("and forward, whatever the layer's size.")
    print()
    n = 600 if args.quick else 1000
    print(f"Error of the first BatchNorm layer's statistics vs exact ({n} samples, batches of 96 + a smaller last one)")
    print()
    print("| model | data | method | mean error | var error |")
    print("|---|---|---|---|---|")
    for name, (model, size) in models.items():
        for data, method, mean_err, var_err in error_table(model, n, size, 96):
            print(f"| {name} | {data} | {method} | {mean_err:.2e} | {var_err:.2e} |")


if __name__ == "__main__":
    main()
