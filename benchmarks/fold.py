"""Eval inference time of models with BatchNorm folded away (`fold_batchnorm`) over the unfolded model, next to what
torch's fx ``fuse`` (``torch.fx.experimental.optimization.fuse``: conv directly followed by BatchNorm only) gets on
the same models, measured side by side in one run, with the largest output difference of each. ``no BN`` is the
model with its BatchNorm layers replaced by identity (not equivalent): the floor a fold can reach.

Models: ``BNConvNet()`` at 28x28 (post-activation BatchNorm: only forward folds apply), the packaged 8x8 model
(``padding="same"``), and where torchvision imports its ``resnet18`` and ``mobilenet_v3_small`` at 64x64 (random
init); where it does not, a ResNet-18 with torchvision's layout built in ``_models.py`` instead (the run says which).
One thread, batch 64 (``--batch``), the three arms interleaved over the repeats (the order
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
from _models import ResNet18, torchvision_models
from torch import nn

from lightning_bnsgd.bn.fold import fold_batchnorm
from lightning_bnsgd.models.cnn import BNConvNet


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
    }
    vision = torchvision_models()
    if isinstance(vision, dict):
        models["torchvision resnet18 64x64"] = (trained_like(vision["resnet18"]), (3, 64, 64), 2)
        models["torchvision mobilenet_v3_small 64x64"] = (trained_like(vision["mobilenet_v3_small"]), (3, 64, 64), 10)
        ran = "torchvision's own resnet18 and mobilenet_v3_small"
    else:
        models["ResNet-18 (built here) 64x64"] = (trained_like(ResNet18()), (3, 64, 64), 2)
        ran = f"torchvision does not load ({vision}): a ResNet-18 in its layout built here, no MobileNetV3"
    print(f"torch {torch.__version__}, 1 thread, batch {args.batch}, {args.repeats} interleaved repeats; {ran}")
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
