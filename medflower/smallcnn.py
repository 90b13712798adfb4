"""The quick start's small CNN, in a module of its own that imports torch only.

Why apart from :mod:`medflower.models`: that module imports MONAI (about 2 s), and the plain-PyTorch
FedAvg loop of ``bench/engine.py`` must build this very network without paying for MONAI.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "GROUPS", "SmallCNN"]

GROUPS = 8  # divides every channel width of medflower's networks (GroupNorm groups)

# 'tanh': a bounded ("tempered sigmoid") activation keeps per-sample gradients small, so DP-SGD's clipping
# discards less of them (Papernot et al., "Tempered Sigmoid Activations for Deep Learning with
# Differential Privacy", AAAI 2021).
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU}


class SmallCNN(nn.Module):
    """Three stages of (conv, norm, activation) x ``convs_per_stage`` with pooling, and a linear head.

    Written here (not MONAI) because MONAI's smallest classifiers are ~10x slower on 2 CPU cores,
    and the quick start must finish in under two minutes. ``width`` is the first stage's channels
    (doubled per stage); ``activation`` one of :data:`ACTIVATIONS`; ``convs_per_stage: 2`` gives a
    VGG-style network that learns real 28px images (MedMNIST) far better than one conv per stage, at
    about twice the cost.
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        width: int = 16,
        norm: str = "group",
        convs_per_stage: int = 1,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        pool = nn.AdaptiveAvgPool2d if spatial_dims == 2 else nn.AdaptiveAvgPool3d
        maxpool = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d

        def norm_layer(c: int) -> nn.Module:
            if norm == "batch":
                return nn.BatchNorm2d(c) if spatial_dims == 2 else nn.BatchNorm3d(c)
            if norm == "instance":
                return nn.GroupNorm(c, c)  # GroupNorm with one channel per group == InstanceNorm+affine
            return nn.GroupNorm(min(GROUPS, c), c)

        layers: list[nn.Module] = []
        c_in = in_channels
        if convs_per_stage < 1:
            raise ValueError(f"convs_per_stage must be >= 1, got {convs_per_stage}")
        for c_out in (width, width * 2, width * 4):
            for _ in range(convs_per_stage):
                layers += [conv(c_in, c_out, 3, padding=1), norm_layer(c_out), ACTIVATIONS[activation]()]
                c_in = c_out
            layers.append(maxpool(2))
        self.features = nn.Sequential(*layers[:-1], pool(1))
        self.head = nn.Linear(c_in, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))
