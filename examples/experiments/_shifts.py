"""Deterministic image corruptions for the distribution-shift experiment (``bn_shift.py``).

Each function takes grey images ``(N, C, H, W)`` in pixel space [0, 1] and returns new images of the same shape,
clipped to [0, 1]; the input is never changed. They are loosely modelled on four of the ImageNet-C corruptions
(Hendrycks & Dietterich 2019) that Schneider et al. 2020 adapt to, written here for 8x8 grey digits.
``gaussian_noise`` draws its noise from its own seeded generator, so the same call gives the same images.

Examples:
    >>> x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    >>> bool(contrast(x, 1.0).allclose(x)), bool(brightness(x, 0.0).equal(x)), bool(blur(x, 0.0).equal(x))
    (True, True, True)
    >>> bool(gaussian_noise(x, 0.2, seed=1).equal(gaussian_noise(x, 0.2, seed=1)))
    True
    >>> all(0.0 <= float(f(x, 0.5).min()) and float(f(x, 0.5).max()) <= 1.0 for f in SHIFTS.values())
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def contrast(images: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale each image's deviation from its own mean grey level by ``factor`` (1: unchanged, 0: flat grey)."""
    mean = images.mean(dim=(-3, -2, -1), keepdim=True)
    return ((images - mean) * factor + mean).clamp(0.0, 1.0)


def brightness(images: torch.Tensor, delta: float) -> torch.Tensor:
    """Add ``delta`` to every pixel (0: unchanged); pixels pushed past white are clipped."""
    return (images + delta).clamp(0.0, 1.0)


def gaussian_noise(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """Add independent Gaussian noise of standard deviation ``sigma`` to every pixel (seeded: deterministic)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
    return (images + sigma * noise).clamp(0.0, 1.0)


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of standard deviation ``sigma`` pixels (0: unchanged), edges padded by replication."""
    if sigma <= 0:
        return images.clone()
    radius = max(1, math.ceil(2 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = images.shape[-3]
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    both = F.conv2d(rows, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)
    return both.clamp(0.0, 1.0)


SHIFTS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "contrast": contrast,
    "brightness": brightness,
    "gaussian_noise": gaussian_noise,
    "blur": blur,
}
"""The shifts by name; each is called as ``shift(images, severity_parameter)``."""
