"""Light on-the-fly augmentation of training batches (``train.augment``).

Why batch-level and hand-written: MONAI's random transforms (``RandFlip``, ``RandAffine``) act on
one channel-first sample at a time through a Dataset, which does not fit the in-memory tensor
loaders (and Opacus' Poisson loader) used here. Flips and small integer shifts are a few tensor
ops; they apply to images and, for segmentation, to their label maps identically.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Augment = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
CHOICES = ("none", "flip", "shift", "flip+shift")


def make_augment(kind: str, *, seed: int, max_shift: int = 2) -> Augment | None:
    """``flip``: random flip of each spatial axis per sample; ``shift`` (alone or ``+shift``): random
    shift by up to ``max_shift`` pixels (zero padded), for images whose orientation means something
    (an ultrasound's probe side, a chest's left and right). Deterministic in ``seed``."""
    if kind not in CHOICES:
        raise ValueError(f"train.augment: invalid value {kind!r}; valid choices are " + ", ".join(map(repr, CHOICES)))
    if kind == "none":
        return None
    gen = torch.Generator().manual_seed(seed)
    shift = kind.endswith("shift")
    flips = kind.startswith("flip")

    def augment(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spatial = x.ndim - 2
        dense = y.ndim == x.ndim  # segmentation: label map with the image's grid
        for axis in range(2, x.ndim) if flips else ():
            flip = torch.rand(len(x), generator=gen) < 0.5
            view = (-1,) + (1,) * (x.ndim - 1)
            x = torch.where(flip.view(view), x.flip(axis), x)
            if dense:
                y = torch.where(flip.view(view), y.flip(axis), y)
        if shift and max_shift > 0:
            pad = (max_shift,) * (2 * spatial)
            xp = F.pad(x, pad)
            yp = F.pad(y, pad) if dense else y
            offs = torch.randint(0, 2 * max_shift + 1, (len(x), spatial), generator=gen)
            xs, ys = [], []
            for i in range(len(x)):
                idx = (
                    slice(None),
                    *tuple(slice(int(o), int(o) + s) for o, s in zip(offs[i], x.shape[2:], strict=True)),
                )
                xs.append(xp[i][idx])
                if dense:
                    ys.append(yp[i][idx])
            x = torch.stack(xs)
            y = torch.stack(ys) if dense else y
        return x, y

    return augment
