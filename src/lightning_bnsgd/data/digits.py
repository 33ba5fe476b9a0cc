"""scikit-learn's bundled 8x8 handwritten digits as a LightningDataModule (no download)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_bnsgd._compat import LightningDataModule, batches_done_in_interrupted_epoch
from lightning_bnsgd._validation import check_bool, check_int, check_number

_PIXEL_MAX = 16.0  # the digits are grey levels 0..16


_OWNER = "DigitsDataModule"


def _check_fraction(name: str, value: object) -> float:
    return float(check_number(name, value, 0.0, 1.0, min_open=True, max_open=True, owner=_OWNER))


def load_digits_tensors(resize: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load all 1,797 digits as float images ``(N, 1, S, S)`` scaled to [0, 1] and int64 labels ``(N,)``.

    Examples:
        >>> x, y = load_digits_tensors()
        >>> tuple(x.shape), tuple(y.shape), int(y.max())
        ((1797, 1, 8, 8), (1797,), 9)
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / _PIXEL_MAX
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    if resize is not None and resize != x.shape[-1]:
        x = F.interpolate(x, size=(resize, resize), mode="bilinear", align_corners=False)
    return x, y


def stratified_split(
    labels: torch.Tensor, val_fraction: float, test_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic stratified train/val/test index split.

    Examples:
        >>> tr, va, te = stratified_split(torch.arange(100) % 10, 0.1, 0.2, seed=0)
        >>> len(tr), len(va), len(te)
        (70, 10, 20)
    """
    from sklearn.model_selection import train_test_split

    idx = torch.arange(len(labels)).numpy()
    y = labels.numpy()
    rest, test = train_test_split(idx, test_size=test_fraction, stratify=y, random_state=seed)
    val_size = val_fraction / (1.0 - test_fraction)
    train, val = train_test_split(rest, test_size=val_size, stratify=y[rest], random_state=seed)
    return torch.as_tensor(train), torch.as_tensor(val), torch.as_tensor(test)


def noisy_labels(labels: torch.Tensor, fraction: float, num_classes: int, seed: int) -> torch.Tensor:
    """Replace ``round(fraction * N)`` labels, chosen at random, with a different class drawn uniformly.

    Examples:
        >>> y = torch.arange(100) % 10
        >>> int((noisy_labels(y, 0.3, 10, seed=0) != y).sum()), bool(noisy_labels(y, 0.0, 10, 0).equal(y))
        (30, True)
    """
    if fraction <= 0:
        return labels
    generator = torch.Generator().manual_seed(seed + 7919)
    chosen = torch.randperm(len(labels), generator=generator)[: round(fraction * len(labels))]
    offsets = torch.randint(1, num_classes, (len(chosen),), generator=generator)
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + offsets) % num_classes
    return noisy


class EpochPermutationSampler(Sampler[int]):
    """Shuffles ``size`` indices with a permutation that depends only on ``seed`` and the epoch.

    Lightning calls ``set_epoch`` at the start of every epoch, so the order of every epoch is reproducible without the
    global RNG, and a run resumed from a checkpoint sees the same order as an uninterrupted one. ``skip`` drops the
    first indices of the next iteration only; ``skip_fn``, if given, is asked for that number once, when the first
    iteration starts (used to continue an epoch that a checkpoint interrupted).

    Examples:
        >>> s = EpochPermutationSampler(5, seed=0)
        >>> first = list(s); s.set_epoch(1); second = list(s)
        >>> sorted(first) == sorted(second) == [0, 1, 2, 3, 4], first != second
        (True, True)
        >>> s.skip = 3; len(list(s)), len(list(s))
        (2, 5)
    """

    def __init__(self, size: int, seed: int = 0, skip_fn: Callable[[], int] | None = None) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.skip = 0
        self.skip_fn = skip_fn

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.skip_fn is not None:
            self.skip += self.skip_fn()
            self.skip_fn = None
        skip, self.skip = self.skip, 0
        return iter(order[skip:])

    def __len__(self) -> int:
        return self.size


class ResumableDataLoader(DataLoader):
    """A DataLoader over an :class:`EpochPermutationSampler` that Lightning treats as resumable.

    Its ``state_dict`` holds the sampler's seed and epoch; where to continue inside an interrupted epoch comes from
    the Trainer's own batch progress (the sampler's ``skip_fn``), which is exact whatever Lightning prefetched.
    """

    def state_dict(self) -> dict[str, int]:
        """The sampler's seed and epoch (empty when the sampler is not an `EpochPermutationSampler`)."""
        sampler = self.sampler
        if not isinstance(sampler, EpochPermutationSampler):
            return {}
        return {"seed": sampler.seed, "epoch": sampler.epoch}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Set the sampler's epoch from ``state_dict`` (when the sampler is an `EpochPermutationSampler`)."""
        if isinstance(self.sampler, EpochPermutationSampler) and "epoch" in state_dict:
            self.sampler.set_epoch(int(state_dict["epoch"]))


class DigitsDataModule(LightningDataModule):
    """The 8x8 digits of scikit-learn (1,797 grey images, 10 classes), shipped with the install.

    Args:
        batch_size: samples per batch on each device.
        num_workers: DataLoader worker processes.
        val_fraction: share of all samples used for validation.
        test_fraction: share of all samples used for testing.
        seed: seed of the stratified split (the same seed gives the same split everywhere).
        normalize: standardize pixels with the training set's mean and std (after scaling to [0, 1]).
        resize: resize the images to ``resize x resize`` (bilinear) instead of the native 8x8.
        pin_memory: pin host memory in the DataLoaders (useful when training on a GPU).
        label_noise: share of training labels replaced by a different, uniformly drawn class (seeded by ``seed``);
            validation and test labels stay clean. A harder task for experiments; 0 disables it.

    The attributes ``in_channels``, ``input_size`` and ``num_classes`` are known at construction, so
    LightningCLI links them into the model's arguments.

    On one device the training order of every epoch depends only on ``seed`` and the epoch number
    (:class:`EpochPermutationSampler`), and a run resumed from a mid-epoch checkpoint continues the interrupted
    epoch with exactly the batches an uninterrupted run would see. Under a multi-device strategy Lightning's
    ``DistributedSampler`` shuffles instead (also seeded per epoch); there an interrupted epoch restarts from its
    first batch, as Lightning does for any map-style DataLoader.

    Examples:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), dm.input_size, dm.num_classes
        ((32, 1, 8, 8), 8, 10)
    """

    in_channels: int = 1
    num_classes: int = 10

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        normalize: bool = True,
        resize: int | None = None,
        pin_memory: bool = False,
        label_noise: float = 0.0,
    ) -> None:
        super().__init__()
        check_int("batch_size", batch_size, minimum=1, owner=_OWNER)
        check_int("num_workers", num_workers, minimum=0, owner=_OWNER)
        val = _check_fraction("val_fraction", val_fraction)
        test = _check_fraction("test_fraction", test_fraction)
        if val + test >= 1.0:
            raise ValueError(
                f"{_OWNER}: `val_fraction` + `test_fraction` must be below 1 so that training data remains, "
                f"got {val} + {test} = {val + test}."
            )
        check_int("resize", resize, minimum=1, allow_none=True, owner=_OWNER)
        check_number("label_noise", label_noise, 0.0, 1.0, max_open=True, owner=_OWNER)
        check_int("seed", seed, minimum=0, owner=_OWNER)
        check_bool("normalize", normalize, owner=_OWNER)
        check_bool("pin_memory", pin_memory, owner=_OWNER)
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val
        self.test_fraction = test
        self.seed = seed
        self.normalize = normalize
        self.resize = resize
        self.pin_memory = pin_memory
        self.label_noise = float(label_noise)
        self.input_size: int = resize if resize is not None else 8
        self._splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        """Load the digits and split them (cheap: about 1 MB in memory)."""
        if self._splits:
            return
        x, y = load_digits_tensors(self.resize)
        train, val, test = stratified_split(y, self.val_fraction, self.test_fraction, self.seed)
        if self.normalize:
            mean, std = x[train].mean(), x[train].std()
            x = (x - mean) / std
        self._splits = {
            "train": TensorDataset(x[train], noisy_labels(y[train], self.label_noise, self.num_classes, self.seed)),
            "val": TensorDataset(x[val], y[val]),
            "test": TensorDataset(x[test], y[test]),
        }

    def _loader(self, split: str, shuffle: bool = False, sampler: Sampler[int] | None = None) -> DataLoader:
        if not self._splits:
            self.setup()
        loader_cls = ResumableDataLoader if isinstance(sampler, EpochPermutationSampler) else DataLoader
        return loader_cls(
            self._splits[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def _batches_done_in_interrupted_epoch(self) -> int:
        """Batches of the current epoch already trained when fit resumes from a mid-epoch checkpoint (else 0)."""
        return 0 if self.trainer is None else batches_done_in_interrupted_epoch(self.trainer)

    def train_dataloader(self) -> DataLoader:
        """The training split, on one device in the order of an `EpochPermutationSampler` seeded by ``seed``.

        There a fit resumed from a mid-epoch checkpoint skips the batches of that epoch already trained. Under a
        multi-device strategy the loader shuffles, and Lightning swaps in its seeded ``DistributedSampler``.
        """
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            return self._loader("train", shuffle=True)  # Lightning swaps in a seeded DistributedSampler
        if not self._splits:
            self.setup()
        sampler = EpochPermutationSampler(
            len(self._splits["train"]),
            seed=self.seed,
            skip_fn=lambda: self._batches_done_in_interrupted_epoch() * self.batch_size,
        )
        return self._loader("train", sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        """The validation split, not shuffled."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The test split, not shuffled."""
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test split, not shuffled (prediction runs on the test images)."""
        return self._loader("test", shuffle=False)
