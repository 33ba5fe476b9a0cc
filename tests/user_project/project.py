"""A user's Lightning project, as a new user of the plugin would have it before adding our pieces.

Written against ``lightning.pytorch`` (the unified package; ``pytorch_lightning`` where only that is installed),
with a torchvision-layout ResNet (``conv1``/``bn1``, ``layerN.M.downsample`` with its own BatchNorm, ``fc``), a
DataModule whose batches are dicts of raw, un-normalized pixels that it standardizes in ``on_after_batch_transfer``
(so statistics computed on un-transferred batches are wrong), a shuffled train loader whose last batch is small, and
``configure_optimizers`` with ``SGDWarmup``. Nothing here imports ``ConvNetClassifier`` or ``DigitsDataModule``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

try:  # a user of the unified package; where only the standalone package is installed (CI's second environment), that
    import lightning.pytorch as L
except ImportError:
    import pytorch_lightning as L  # type: ignore[no-redef]

from lightning_bnsgd import SGDWarmup

PIXEL_MEAN, PIXEL_STD = 120.0, 60.0


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock`` layout: conv-bn-relu-conv-bn plus a shortcut (``downsample`` when the shape
    changes)."""

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


class ResNet(nn.Module):
    """A small ResNet in torchvision's layout for 3x16x16 images."""

    def __init__(self, num_classes: int = 4, width: int = 8, head_bn: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        # optional BatchNorm1d head: one value per channel and sample, so a 1-sample batch cannot train it
        self.head: nn.Module = (
            nn.Sequential(nn.Linear(2 * width, 2 * width), nn.BatchNorm1d(2 * width), nn.ReLU())
            if head_bn
            else nn.Identity()
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(self.head(torch.flatten(self.avgpool(x), 1)))


class ShapesDataset(Dataset):
    """Raw pixels in [0, 255] (class-dependent brightness and colour), returned as dicts."""

    def __init__(self, size: int, seed: int, num_classes: int = 4) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, num_classes, (size,), generator=g)
        base = torch.rand(size, 3, 16, 16, generator=g) * 120
        tint = (self.labels.float() * 40).view(-1, 1, 1, 1) * torch.tensor([1.0, 0.5, 0.2]).view(1, 3, 1, 1)
        self.images = (base + tint).clamp(0, 255)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"image": self.images[index], "label": self.labels[index]}


class UserDataModule(L.LightningDataModule):
    """Dict batches of raw pixels, standardized on the device in ``on_after_batch_transfer``."""

    def __init__(self, train_size: int = 97, batch_size: int = 16, seed: int = 0, drop_last: bool = False) -> None:
        super().__init__()
        self.train_size, self.batch_size, self.seed, self.drop_last = train_size, batch_size, seed, drop_last

    def setup(self, stage: str) -> None:
        self.train_set = ShapesDataset(self.train_size, self.seed)
        self.val_set = ShapesDataset(32, self.seed + 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return {**batch, "image": (batch["image"] - PIXEL_MEAN) / PIXEL_STD}


class UserModel(L.LightningModule):
    """The user's LightningModule: dict batches, SGDWarmup in ``configure_optimizers``."""

    def __init__(self, lr: float = 0.05, width: int = 8, head_bn: bool = False, warmup_steps: int = 2) -> None:
        super().__init__()
        self.lr, self.warmup_steps = lr, warmup_steps
        self.net = ResNet(width=width, head_bn=head_bn)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch["image"]), batch["label"])
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log("val/loss", F.cross_entropy(self(batch["image"]), batch["label"]))

    def configure_optimizers(self) -> Any:
        return SGDWarmup(lr=self.lr, warmup_steps=self.warmup_steps, decay="cosine").build(self)


class MemoryLogger(L.loggers.Logger):
    """A Lightning logger that keeps every ``log_metrics`` call in memory, as ``(step, metrics)``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((-1 if step is None else int(step), dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def logged(self, prefix: str) -> list[tuple[int, dict[str, float]]]:
        """The calls that logged at least one metric whose name starts with ``prefix``."""
        return [(s, m) for s, m in self.calls if any(k.startswith(prefix) for k in m)]


def recalibration_forward(module: nn.Module, batch: dict[str, Tensor]) -> None:
    """What a user passes as ``BNRecalibration(forward_fn=...)`` for dict batches."""
    module(batch["image"])


def exact_first_bn_statistics(model: UserModel, datamodule: UserDataModule) -> tuple[Tensor, Tensor]:
    """The population statistics ``net.bn1`` must hold: its inputs over the whole (normalized) train set."""
    x = (datamodule.train_set.images - PIXEL_MEAN) / PIXEL_STD
    with torch.no_grad():
        h = model.net.conv1(x).double()
    return h.mean((0, 2, 3)), h.var((0, 2, 3))


def quiet_trainer(tmp_path: Any, **kwargs: Any) -> L.Trainer:
    """A small silent CPU ``lightning.pytorch`` Trainer."""
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": str(tmp_path),
        "max_epochs": 1,
        "num_sanity_val_steps": 0,
    }
    return L.Trainer(**{**defaults, **kwargs})
