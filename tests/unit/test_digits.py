from __future__ import annotations

import pytest
import torch

from lightning_bnsgd.data.digits import DigitsDataModule, stratified_split


def _labels(dm: DigitsDataModule, split: str) -> torch.Tensor:
    return dm._splits[split].tensors[1]


def test_split_sizes_cover_all_digits_without_overlap():
    dm = DigitsDataModule(val_fraction=0.1, test_fraction=0.2)
    dm.setup("fit")
    sizes = {k: len(v) for k, v in dm._splits.items()}
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == pytest.approx(0.2 * 1797, abs=1)
    assert sizes["val"] == pytest.approx(0.1 * 1797, abs=1)
    tr, va, te = stratified_split(torch.arange(1797) % 10, 0.1, 0.2, seed=0)
    assert len(set(tr.tolist()) | set(va.tolist()) | set(te.tolist())) == len(tr) + len(va) + len(te)


def test_split_is_stratified_and_deterministic():
    a, b, c = DigitsDataModule(seed=3), DigitsDataModule(seed=3), DigitsDataModule(seed=4)
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(_labels(a, "test"), _labels(b, "test"))
    assert not torch.equal(_labels(a, "test"), _labels(c, "test"))
    counts = torch.bincount(_labels(a, "test"), minlength=10).float()
    assert counts.min() >= 0.8 * counts.mean()


def test_normalize_uses_training_statistics():
    dm = DigitsDataModule(normalize=True)
    dm.setup()
    x = dm._splits["train"].tensors[0]
    assert abs(float(x.mean())) < 1e-4
    assert abs(float(x.std()) - 1.0) < 1e-3
    raw = DigitsDataModule(normalize=False)
    raw.setup()
    xr = raw._splits["train"].tensors[0]
    assert float(xr.min()) >= 0.0 and float(xr.max()) <= 1.0


def test_resize_changes_input_size_and_tensors():
    dm = DigitsDataModule(resize=28, batch_size=16)
    assert dm.input_size == 28 and dm.in_channels == 1 and dm.num_classes == 10
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 28, 28) and y.dtype == torch.long


def test_label_noise_corrupts_only_training_labels():
    clean, noisy = DigitsDataModule(), DigitsDataModule(label_noise=0.2)
    clean.setup(), noisy.setup()
    y_clean, y_noisy = clean._splits["train"].tensors[1], noisy._splits["train"].tensors[1]
    changed = int((y_clean != y_noisy).sum())
    assert changed == round(0.2 * len(y_clean))
    assert int(y_noisy.min()) >= 0 and int(y_noisy.max()) <= 9
    for split in ("val", "test"):
        assert torch.equal(clean._splits[split].tensors[1], noisy._splits[split].tensors[1])
    again = DigitsDataModule(label_noise=0.2)
    again.setup()
    assert torch.equal(again._splits["train"].tensors[1], y_noisy)  # seeded
