"""The quick start's small CNN, in a module of its own that imports torch only.

Why apart from :mod:`medflower.models`: that module imports MONAI (about 2 s), and the plain-PyTorch
FedAvg loop of ``bench/engine.py`` must build this very network without paying for MONAI.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "GROUPS", "POOLS", "GlobalPool", "SmallCNN"]

GROUPS = 8  # divides every channel width of medflower's networks (GroupNorm groups)

# 'tanh': a bounded ("tempered sigmoid") activation keeps per-sample gradients small, so DP-SGD's clipping
# discards less of them (Papernot et al., "Tempered Sigmoid Activations for Deep Learning with
# Differential Privacy", AAAI 2021).
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU}

# How the last stage's feature map becomes the head's input: its mean over space, its maximum, or both side by
# side ('avgmax', 2x the features; fastai's AdaptiveConcatPool). See GlobalPool.
POOLS = ("avg", "max", "avgmax")


class GlobalPool(nn.Module):
    """Global pooling over every spatial axis, ``(n, c, *spatial) -> (n, c)`` or ``(n, 2c)`` for 'avgmax'.

    Why 'max' besides the mean: a small structure (an aneurysm on a vessel segment, a lesion's rim) moves a
    channel's maximum but barely its mean over the volume, so a frozen trunk's averaged features can hide it
    from a linear head. Measured on a frozen, data-free prior trunk (bench/RESULTS.md, stage 29): on
    VesselMNIST3D 'avgmax' raised the pooled linear probe (test AUC 0.815 -> 0.830) but not the federated DP-SGD
    head (0.702 against 0.715 at the same step), and on BreastMNIST it lowered the probe; so 'avg' stays the
    default and 'avgmax' is an option to measure, not a recommendation. No parameters: a trunk pretrained with
    one readout loads into a network built with another.
    """

    def __init__(self, mode: str) -> None:
        super().__init__()
        if mode not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {mode!r}")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)
        if self.mode == "avg":
            return flat.mean(2)
        if self.mode == "max":
            return flat.amax(2)
        return torch.cat([flat.mean(2), flat.amax(2)], 1)

    def extra_repr(self) -> str:
        return repr(self.mode)


class SmallCNN(nn.Module):
    """Three stages of (conv, norm, activation) x ``convs_per_stage`` with pooling, and a linear head.

    Written here (not MONAI) because MONAI's smallest classifiers are ~10x slower on 2 CPU cores,
    and the quick start must finish in under two minutes. ``width`` is the first stage's channels
    (doubled per stage); ``activation`` one of :data:`ACTIVATIONS`; ``pool`` one of :data:`POOLS` (the
    readout, :class:`GlobalPool`); ``convs_per_stage: 2`` gives a
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
        pool: str = "avg",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        pool_avg = nn.AdaptiveAvgPool2d if spatial_dims == 2 else nn.AdaptiveAvgPool3d
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
        # 'avg' keeps the adaptive average pool the network always had (same outputs, same module)
        readout = pool_avg(1) if pool == "avg" else GlobalPool(pool)
        self.features = nn.Sequential(*layers[:-1], readout)
        self.head = nn.Linear(c_in * (2 if pool == "avgmax" else 1), out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))
