"""Eval inference time of models with BatchNorm folded away (`fold_batchnorm`) over the unfolded model, next to what
torch's fx ``fuse`` (``torch.fx.experimental.optimization.fuse``: conv directly followed by BatchNorm only) gets on
the same models, measured side by side in one run, with the largest output difference of each. ``no BN`` is the
model with its BatchNorm layers replaced by identity (not equivalent): the floor a fold can reach.

Models: ``BNConvNet()`` at 28x28 (post-activation BatchNorm: only forward folds apply), the packaged 8x8 model
(``padding="same"``), and ResNet-18 with torchvision's layout (torchvision's own when it imports, else the same
layers built here). One thread, batch 64 (``--batch``), the three arms interleaved over the repeats (the order
rotates), each cell the median over repeats of the ratio to the unfolded model of the same repeat.

    python benchmarks/fold.py               # 30 repeats
    python benchmarks/fold.py --repeats 10  # quicker
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lightning_bnsgd.bn.fold import fold_batchnorm
from lightning_bnsgd.models.cnn import BNConvNet


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


def resnet18(num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-18 when torchvision imports, else the same layers (names and order) built here."""
    try:
        from torchvision.models import resnet18 as tv_resnet18

        return tv_resnet18(num_classes=num_classes)
    except Exception:  # torchvision missing, or its operators do not load against this torch build
        pass
    net = nn.Module()
    net.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    net.bn1 = nn.BatchNorm2d(64)
    net.relu = nn.ReLU(inplace=True)
    net.maxpool = nn.MaxPool2d(3, 2, 1)
    cin = 64
    for i, (cout, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)], start=1):
        setattr(net, f"layer{i}", nn.Sequential(_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)))
        cin = cout
    net.avgpool = nn.AdaptiveAvgPool2d(1)
    net.fc = nn.Linear(512, num_classes)
    return _Wrapped(net)


class _Wrapped(nn.Module):
    """A plain module around the hand-built ResNet (its forward is a method, so torch.fx traces it)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        for i in range(1, 5):
            x = getattr(n, f"layer{i}")(x)
        return n.fc(torch.flatten(n.avgpool(x), 1))


def trained_like(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (as after training), positive scales."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def without_batchnorm(model: nn.Module) -> nn.Module:
    """The model with every BatchNorm layer replaced by identity: not equivalent, the time floor a fold can reach."""
    bare = copy.deepcopy(model).eval()
    for module in list(bare.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(module, child_name, nn.Identity())
    return bare


def fx_fuse(model: nn.Module) -> nn.Module:
    from torch.fx.experimental.optimization import fuse

    return fuse(copy.deepcopy(model).eval())


def median_ratios(arms: dict[str, Callable[[], object]], repeats: int, inner: int) -> dict[str, float]:
    names = list(arms)
    ratios: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        times: dict[str, float] = {}
        for name in order:
            start = time.perf_counter()
            for _ in range(inner):
                arms[name]()
            times[name] = time.perf_counter() - start
        for name in names:
            ratios[name].append(times[name] / times["unfolded"])
    return {name: statistics.median(values) for name, values in ratios.items()}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = {
        "BNConvNet() 28x28": (trained_like(BNConvNet()), (1, 28, 28), 20),
        "packaged 8x8 (padding same)": (trained_like(BNConvNet(input_size=8, padding="same")), (1, 8, 8), 50),
        "ResNet-18 (torchvision layout) 64x64": (trained_like(resnet18()), (3, 64, 64), 2),
    }
    print(f"torch {torch.__version__}, 1 thread, batch {args.batch}, {args.repeats} interleaved repeats")
    print(
        f"{'model':38s} {'folded BN':>10s} {'folded/unfolded':>16s} {'fx fuse/unfolded':>17s} "
        f"{'no BN/unfolded':>15s} {'max diff fold / fuse':>21s}"
    )
    for name, (model, shape, inner) in models.items():
        x = torch.randn(args.batch, *shape)
        folded, report = fold_batchnorm(model, x)
        fused = fx_fuse(model)
        reference = model(x)
        diff_fold = float((folded(x) - reference).abs().max())
        diff_fuse = float((fused(x) - reference).abs().max())
        bare = without_batchnorm(model)
        arms = {
            "unfolded": lambda m=model, x=x: m(x),
            "folded": lambda m=folded, x=x: m(x),
            "fx fuse": lambda m=fused, x=x: m(x),
            "no BN": lambda m=bare, x=x: m(x),
        }
        for arm in arms.values():  # warm-up
            arm()
        ratios = median_ratios(arms, args.repeats, inner)
        count = f"{len(report.folded)}/{len(report.decisions)}"
        print(
            f"{name:38s} {count:>10s} {ratios['folded']:16.3f} {ratios['fx fuse']:17.3f} {ratios['no BN']:15.3f} "
            f"{diff_fold:11.1e} / {diff_fuse:7.1e}"
        )


if __name__ == "__main__":
    main()
