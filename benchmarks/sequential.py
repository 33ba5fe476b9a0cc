"""Mode ``"sequential"`` against the same estimate written as a loop of one-pass recalibrations, side by side.

``sequential``: ``recalibrate_bn(model, batches, mode="sequential")``, one pass per BatchNorm layer, each forward
stopped after the layer it estimates. ``loop``: for each layer in forward order, ``recalibrate_bn(model, batches,
mode="train", dropout="eval")`` with that layer alone in train mode (every other BatchNorm layer in eval mode), the
definition `tests/unit/test_recalibrate_sequential_loop.py` checks mode "sequential" against (same statistics on
models whose layers run once per forward). Both run interleaved over the repeats, on copies of one model; each
cell is the median over repeats of the ratio to the plain no-grad eval-mode forwards of the same repeat.

Run ``python benchmarks/sequential.py`` (``--repeats N``, ``--threads N``). Times are never asserted in tests.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from _models import ResNet18
from _overhead import deep_net
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_bnsgd.bn.recalibrate import recalibrate_bn
from lightning_bnsgd.models.cnn import BNConvNet


def forward_order(model: nn.Module, batch: torch.Tensor) -> list[_BatchNorm]:
    """The BatchNorm layers in the order one forward first calls them."""
    order: list[_BatchNorm] = []
    handles = [
        m.register_forward_pre_hook(lambda mod, args: None if mod in order else order.append(mod))
        for m in model.modules()
        if isinstance(m, _BatchNorm)
    ]
    try:
        with torch.no_grad():
            model.eval()(batch)
    finally:
        for handle in handles:
            handle.remove()
    return order


def loop_of_one_pass(model: nn.Module, batches: list[torch.Tensor], order: list[_BatchNorm]) -> None:
    model.train()
    for target in order:
        for layer in order:
            layer.train(layer is target)
        recalibrate_bn(model, batches, mode="train", dropout="eval")
    model.train()


def sequential(model: nn.Module, batches: list[torch.Tensor], order: list[_BatchNorm]) -> None:
    recalibrate_bn(model.train(), batches, mode="sequential")


def plain(model: nn.Module, batches: list[torch.Tensor], order: list[_BatchNorm]) -> None:
    with torch.no_grad():
        model.eval()
        for batch in batches:
            model(batch)


def _seconds(fn: Callable[..., None], *args: object) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier timings)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [
        ("BNConvNet, 8 x 128 at 28x28 (2 BN)", BNConvNet(), 8, 128, (1, 28, 28)),
        ("12 Conv-BN blocks, 8 x 64 at 8x8 (12 BN)", deep_net(12), 8, 64, (1, 8, 8)),
        ("ResNet-18 layout, 4 x 16 at 32x32 (20 BN)", ResNet18(num_classes=10), 4, 16, (3, 32, 32)),
    ]
    methods = {"sequential": sequential, "loop": loop_of_one_pass}
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} interleaved repeats")
    print("time / plain no-grad eval-mode forwards over the same batches (median of per-repeat ratios)\n")
    print("| model | plain (ms) | sequential | loop of one-pass | loop / sequential | max abs diff |")
    print("|---|---|---|---|---|---|")
    for label, model, count, size, shape in rows:
        batches = [torch.randn(size, *shape) for _ in range(count)]
        order = forward_order(model, batches[0])
        ratios: dict[str, list[float]] = {name: [] for name in methods}
        base_times = []
        copies = {name: copy.deepcopy(model) for name in methods}
        for repeat in range(args.repeats):
            base = _seconds(plain, model, batches, order)
            base_times.append(base)
            names = list(methods) if repeat % 2 == 0 else list(reversed(methods))
            for name in names:
                work = copies[name]
                ratios[name].append(_seconds(methods[name], work, batches, forward_order(work, batches[0])) / base)
        diff = max(
            (a - b).abs().max().item()
            for a, b in zip(copies["sequential"].buffers(), copies["loop"].buffers(), strict=True)
            if a.is_floating_point()
        )
        seq, loop = (statistics.median(ratios[n]) for n in methods)
        paired = statistics.median(b / a for a, b in zip(ratios["sequential"], ratios["loop"], strict=True))
        print(
            f"| {label} | {1000 * statistics.median(base_times):.1f} | {seq:.2f} | {loop:.2f} | {paired:.3f} | "
            f"{diff:.1e} |"
        )


if __name__ == "__main__":
    main()
