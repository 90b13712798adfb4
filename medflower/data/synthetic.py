"""SYNTHETIC images for the quick start and fast tests — not medical data.

Each image is smooth random texture plus Gaussian noise; class ``k`` adds a faint blob ("lesion")
at an angle of ``2*pi*k/C`` around the centre, with jittered position, size and brightness. The
signal-to-noise ratio is set so a small CNN needs several epochs to learn it: accuracy rises over
rounds instead of saturating in the first one. Fully deterministic in ``seed``.
"""

from __future__ import annotations

import numpy as np

from medflower.data.base import ArraySplit, DatasetSplits


def _make(
    n: int, *, num_classes: int, size: int, channels: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, num_classes, size=n)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    images = np.empty((n, channels, size, size), dtype=np.float32)
    # low-frequency background texture, shared basis
    fx, fy = rng.uniform(1, 4, size=(2, n, 1, 1)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1)).astype(np.float32)
    background = 0.3 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
    angle = 2 * np.pi * labels / num_classes + rng.normal(0, 0.35, size=n)
    radius = rng.uniform(0.12, 0.3, size=n)
    cx, cy = radius * np.cos(angle), radius * np.sin(angle)
    sigma = rng.uniform(0.05, 0.1, size=n)
    amp = rng.uniform(0.5, 1.0, size=n)
    blob = amp[:, None, None] * np.exp(
        -((xx - cx[:, None, None]) ** 2 + (yy - cy[:, None, None]) ** 2) / (2 * sigma[:, None, None] ** 2)
    )
    for c in range(channels):
        tint = 1.0 - 0.2 * c
        images[:, c] = background + tint * blob + rng.normal(0, 0.6, size=(n, size, size))
    return images, labels.astype(np.int64)


def synthetic_classification(
    *, samples: int = 1200, num_classes: int = 2, size: int = 28, channels: int = 1, seed: int = 0
) -> DatasetSplits:
    """A SYNTHETIC data set: ``samples`` training images, plus val (15%) and test (25%) of that size."""
    rng = np.random.default_rng(seed)
    n_val, n_test = max(20, int(samples * 0.15)), max(40, int(samples * 0.25))
    tr = _make(samples, num_classes=num_classes, size=size, channels=channels, rng=rng)
    va = _make(n_val, num_classes=num_classes, size=size, channels=channels, rng=rng)
    te = _make(n_test, num_classes=num_classes, size=size, channels=channels, rng=rng)
    return DatasetSplits(
        name="synthetic-blobs",
        task="classification",
        train=ArraySplit(*tr),
        val=ArraySplit(*va),
        test=ArraySplit(*te),
        num_classes=num_classes,
        in_channels=channels,
        img_size=(size, size),
        synthetic=True,
    )
