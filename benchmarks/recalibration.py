"""Cost and accuracy of ``recalibrate_bn`` next to plain forwards and two peers, measured side by side in one run.

Time: for each model, K batches are run by

* ``plain``: K no-grad train-mode forwards (the floor every method pays),
* ``recalibrate_bn`` (mode ``"train"``),
* ``fvcore-style``: the approach of fvcore's ``update_bn_stats`` / detectron2's ``PreciseBN``, written here (no
  fvcore install): momentum 1.0, a forward pre-hook per BatchNorm layer that notes the batch size, and after each
  forward a count-weighted update of every layer's mean and E[x^2] (exact population variance, float32),
* ``update_bn-style``: what ``torch.optim.swa_utils.update_bn`` does: reset, ``momentum=None`` (BatchNorm's own
  cumulative average of per-batch statistics; inexact), plain forwards,

interleaved over the repeats (the order alternates); each cell is the median over repeats of the ratio to the
plain forwards of the same repeat. Rows: the four models of issue 16 and a model with a heavy head after its last
BatchNorm layer (``recalibrate_bn`` ends each forward there).

Error: the first BatchNorm layer's statistics against the exact ones on class-sorted data (``--errors``).

Run ``python benchmarks/recalibration.py`` (``--quick`` for a shorter run; ``--processes 3`` runs each row in three
fresh processes and pools their repeats, since where the allocator puts the activations, which differs from process
to process, moves the speed of small convolutions by a few percent). Times are never asserted in tests.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_bnsgd.bn.recalibrate import recalibrate_bn
from lightning_bnsgd.models.cnn import BNConvNet

Method = Callable[[nn.Module, list[torch.Tensor]], None]


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


def deep_chain(layers: int, channels: int) -> nn.Module:
    """``layers`` blocks of 3x3 conv, BatchNorm2d, ReLU: many small layers, where per-layer overhead shows."""
    blocks: list[nn.Module] = [nn.Conv2d(1, channels, 3, padding=1, bias=False)]
    for _ in range(layers):
        blocks += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
    return nn.Sequential(*blocks)


class HeavyHead(nn.Module):
    """A BatchNorm conv stem, then a transformer encoder layer and a wide MLP head with no BatchNorm."""

    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 4, stride=4, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.encoder = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=4 * width, batch_first=True)
        self.head = nn.Sequential(
            nn.Linear(width, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.encoder(tokens)).mean(1)


def make_data(n: int, size: int, sort: bool, seed: int = 0) -> torch.Tensor:
    """Grey images with a per-sample brightness offset; ``sort`` orders them by it (as class-sorted data)."""
    gen = torch.Generator().manual_seed(seed)
    offset = torch.randn(n, generator=gen) * 1.5
    x = torch.randn(n, 1, size, size, generator=gen) * 0.5 + offset.view(-1, 1, 1, 1)
    if sort:
        x = x[offset.argsort()]
    return x


def bn_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def plain_forwards(model: nn.Module, batches: list[torch.Tensor]) -> None:
    model.train()
    with torch.no_grad():
        for b in batches:
            model(b)


def update_bn_style(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """torch's ``update_bn``: cumulative average of per-batch statistics by BatchNorm itself (momentum None)."""
    layers = bn_layers(model)
    momenta = [bn.momentum for bn in layers]
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None
    plain_forwards(model, batches)
    for bn, momentum in zip(layers, momenta, strict=True):
        bn.momentum = momentum


def fvcore_style(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """fvcore's ``update_bn_stats`` approach: per-layer pre-hooks for batch sizes, per-layer updates each forward."""
    layers = bn_layers(model)
    momenta = [bn.momentum for bn in layers]
    counts = [0] * len(layers)
    sizes = [0] * len(layers)
    means = [torch.zeros_like(bn.running_mean) for bn in layers]  # type: ignore[arg-type]
    squares = [torch.zeros_like(bn.running_mean) for bn in layers]  # type: ignore[arg-type]
    handles = []
    for i, bn in enumerate(layers):
        bn.momentum = 1.0

        def note(module: nn.Module, args: tuple[torch.Tensor, ...], i: int = i) -> None:
            sizes[i] = args[0].numel() // args[0].shape[1]

        handles.append(bn.register_forward_pre_hook(note))
    model.train()
    with torch.no_grad():
        for b in batches:
            model(b)
            for i, bn in enumerate(layers):
                n = sizes[i]
                batch_sq = bn.running_var * (n - 1) / n + bn.running_mean**2  # type: ignore[operator]
                weight = n / (counts[i] + n)
                means[i] += (bn.running_mean - means[i]) * weight
                squares[i] += (batch_sq - squares[i]) * weight
                counts[i] += n
        for i, bn in enumerate(layers):
            n = counts[i]
            bn.running_mean.copy_(means[i])  # type: ignore[union-attr]
            bn.running_var.copy_((squares[i] - means[i] ** 2) * n / (n - 1))  # type: ignore[union-attr]
    for handle in handles:
        handle.remove()
    for bn, momentum in zip(layers, momenta, strict=True):
        bn.momentum = momentum


def recalibrate(model: nn.Module, batches: list[torch.Tensor]) -> None:
    model.train()
    recalibrate_bn(model, batches)


METHODS: dict[str, Method] = {
    "plain": plain_forwards,
    "recalibrate_bn": recalibrate,
    "fvcore-style": fvcore_style,
    "update_bn-style": update_bn_style,
}


def time_ratios(model: nn.Module, batches: list[torch.Tensor], repeats: int) -> dict[str, list[float]]:
    """Per interleaved repeat, each method's time over the plain forwards' time of the same repeat (``plain_ms``:
    the plain forwards' times in milliseconds)."""
    times: dict[str, list[float]] = {k: [] for k in METHODS}
    for fn in METHODS.values():  # warm-up (also learns recalibrate_bn's per-shape plan once, as any run does)
        fn(model, batches[:2])
    for r in range(repeats):
        order = list(METHODS) if r % 2 == 0 else list(reversed(METHODS))
        for name in order:
            start = time.perf_counter()
            METHODS[name](model, batches)
            times[name].append(time.perf_counter() - start)
    ratios = {k: [t / p for t, p in zip(v, times["plain"], strict=True)] for k, v in times.items()}
    ratios["plain_ms"] = [t * 1e3 for t in times["plain"]]
    return ratios


def row_in_fresh_processes(index: int, args: argparse.Namespace) -> tuple[dict[str, list[float]], list[float]]:
    """Row ``index`` run in ``args.processes`` fresh processes: the pooled per-repeat ratios, and per process the
    median ratio of ``recalibrate_bn`` (where the allocator puts the activations differs from process to process,
    and with it the speed of small convolutions by a few percent)."""
    pooled: dict[str, list[float]] = {}
    medians = []
    for _ in range(args.processes):
        command = [sys.executable, __file__, "--row", str(index), "--repeats", str(args.repeats)]
        command += ["--threads", str(args.threads)] + (["--quick"] if args.quick else [])
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        ratios = json.loads(result.stdout.strip().splitlines()[-1])
        for k, v in ratios.items():
            pooled.setdefault(k, []).extend(v)
        medians.append(statistics.median(ratios["recalibrate_bn"]))
    return pooled, medians


def cases(quick: bool) -> list[tuple[str, nn.Module, int, int, int]]:
    """(name, model, batches, batch size, image size) for each row.

    The deep chains get 1,024 samples, the low end of what precise BatchNorm needs (Wu & Johnson 2021: 10^3 to
    10^4), so the fixed cost of a call (setting up, the first forward of a shape with hooks, the merge) weighs
    as it does in use; ``--quick`` halves every row.
    """
    k = 0.5 if quick else 1
    return [
        ("BNConvNet, 12 x 256 at 28x28", BNConvNet(), int(12 * k), 256, 28),
        ("small ResNet, 16 x 64 at 32x32", SmallResNet(blocks=2), int(16 * k), 64, 32),
        ("50 BN layers, 32 x 32, 16 ch at 8x8", deep_chain(50, 16), int(32 * k), 32, 8),
        ("100 BN layers, 64 x 16, 8 ch at 4x4", deep_chain(100, 8), int(64 * k), 16, 4),
        ("heavy head (BN stem, transformer layer, MLP), 16 x 32 at 16x16", HeavyHead(), int(16 * k), 32, 16),
    ]


def first_bn_error(model: nn.Module, fn: Method, batches: list[torch.Tensor]) -> tuple[float, float]:
    """Error of ``fn``'s first-layer statistics: ``max |m - m*| / sqrt(v*)`` and ``max |v - v*| / v*``."""
    m = copy.deepcopy(model)
    bn = bn_layers(m)[0]
    captured: list[torch.Tensor] = []
    handle = bn.register_forward_pre_hook(lambda mod, a: captured.append(a[0].double()))
    m.eval()
    with torch.no_grad():
        m(torch.cat(batches))
    handle.remove()
    h = captured[0]
    dims = [0, *range(2, h.dim())]
    exact_mean, exact_var = h.mean(dims), h.var(dims)
    fn(m, batches)
    assert bn.running_mean is not None and bn.running_var is not None
    mean_err = ((bn.running_mean.double() - exact_mean).abs() / exact_var.sqrt()).max()
    var_err = ((bn.running_var.double() - exact_var).abs() / exact_var).max()
    return float(mean_err), float(var_err)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="half the batches, 5 repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier timings)")
    parser.add_argument("--errors", action="store_true", help="also tabulate the first layer's error (sorted data)")
    parser.add_argument(
        "--processes", type=int, default=1, help="run each row in this many fresh processes and pool the repeats"
    )
    parser.add_argument("--row", type=int, default=None, help=argparse.SUPPRESS)  # one row, raw ratios as JSON
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    args.repeats = args.repeats or (5 if args.quick else 9)
    rows = cases(args.quick)
    if args.row is not None:
        name, model, k, batch, size = rows[args.row]
        print(
            json.dumps(
                time_ratios(model, list(torch.split(make_data(k * batch, size, sort=False), batch)), args.repeats)
            )
        )
        return
    where = f", each row in {args.processes} fresh processes" if args.processes > 1 else ""
    print(f"torch {torch.__version__}, cpu, {args.threads} thread(s), {args.repeats} interleaved repeats{where}")
    print("time / plain no-grad train-mode forwards over the same batches (median of per-repeat ratios)\n")
    spread = " | `recalibrate_bn` per process |" if args.processes > 1 else " |"
    print(f"| model | plain (ms) | `recalibrate_bn` | fvcore-style | update_bn-style{spread}")
    print("|---|---|---|---|---|" + ("---|" if args.processes > 1 else ""))
    for index, (name, model, k, batch, size) in enumerate(rows):
        if args.processes > 1:
            r, medians = row_in_fresh_processes(index, args)
        else:
            r, medians = (
                time_ratios(model, list(torch.split(make_data(k * batch, size, sort=False), batch)), args.repeats),
                [],
            )
        m = {key: statistics.median(values) for key, values in r.items()}
        extra = f" {min(medians):.3f} to {max(medians):.3f} |" if medians else ""
        print(
            f"| {name} | {m['plain_ms']:.1f} | {m['recalibrate_bn']:.3f} | {m['fvcore-style']:.3f} "
            f"| {m['update_bn-style']:.3f} |{extra}",
            flush=True,
        )
    if args.errors:
        print("\nfirst BatchNorm layer vs exact, class-sorted data, batches of 96 and a last one of 40\n")
        print("| model | method | mean error | var error |")
        print("|---|---|---|---|")
        for name, model, _, _, size in rows[:2]:
            batches = list(torch.split(make_data(1000, size, sort=True, seed=1), 96))
            for method in ("recalibrate_bn", "fvcore-style", "update_bn-style"):
                mean_err, var_err = first_bn_error(model, METHODS[method], batches)
                print(f"| {name} | {method} | {mean_err:.1e} | {var_err:.1e} |")


if __name__ == "__main__":
    main()
