"""Models the benchmarks share: ResNet-18 in torchvision's layout (torchvision's own where it loads), torchvision's
resnet18 and mobilenet_v3_small."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: conv-bn-relu-conv-bn plus the shortcut (``downsample`` when the shape changes)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """torchvision's ``resnet18`` layout: 7x7 stem, max pooling, four stages of two basic blocks, ``fc``."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages, inplanes = [], 64
        for i, planes in enumerate((64, 128, 256, 512)):
            stages.append(nn.Sequential(BasicBlock(inplanes, planes, 1 if i == 0 else 2), BasicBlock(planes, planes)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18() -> tuple[nn.Module, str]:
    """torchvision's ``resnet18`` where torchvision loads, else the same layout built here."""
    try:
        from torchvision.models import resnet18 as torchvision_resnet18

        return torchvision_resnet18(), "torchvision.models.resnet18"
    except Exception:  # not installed, or its ops fail to register against this torch
        return ResNet18(), "ResNet18 built in benchmarks/_models.py (torchvision's layout)"


def torchvision_models() -> dict[str, nn.Module] | str:
    """torchvision's ``resnet18`` and ``mobilenet_v3_small`` (random init), or why torchvision does not load."""
    try:
        from torchvision.models import mobilenet_v3_small
        from torchvision.models import resnet18 as torchvision_resnet18
    except Exception as err:  # not installed, or its ops fail to register against this torch
        return f"{type(err).__name__}: {err}"
    return {"resnet18": torchvision_resnet18(), "mobilenet_v3_small": mobilenet_v3_small()}
