"""ScatterNet: fixed wavelet-scattering features with a small trainable head (Tramèr & Boneh 2021).

Why: under DP-SGD, every trained parameter pays for noise. Tramèr & Boneh ("Differentially Private
Learning Needs Better Features (or Much More Data)", ICLR 2021) showed that hand-crafted scattering
features (Oyallon & Mallat) with a linear model or a small CNN on top beat end-to-end CNNs under DP
on small image sets, with no public data. The scattering transform comes from kymatio (its 2D torch
front end; optional: ``pip install 'medflower[scatter]'``); the head, and the data-independent
GroupNorm on the features that Tramèr & Boneh use, are ours. 2D only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medflower.schema import ConfigError
from medflower.smallcnn import ACTIVATIONS, GROUPS

HEADS = ("linear", "cnn")


def _scattering(j: int, shape: Sequence[int]) -> nn.Module:
    try:
        # the 2D front end directly: kymatio.torch also imports its 3D filter bank, which needs the
        # scipy.special.sph_harm that SciPy 1.17 removed
        from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
    except ImportError as err:
        raise ConfigError(
            f"model.name: 'scatternet' needs kymatio ({err}); install it with pip install 'medflower[scatter]'"
        ) from err
    return ScatteringTorch2D(J=j, shape=tuple(int(s) for s in shape), L=8)


class ScatterNet(nn.Module):
    """Scattering features of order 2 (J scales, 8 angles), GroupNorm, then a ``linear`` or ``cnn`` head.

    Each input channel gives 1 + 8J + 32J(J-1) feature maps at 1/2^J the resolution (81 for J = 2).
    The scattering filters are fixed: they are not parameters and not in the state dict, so sites
    send, and DP-SGD noises, only the head.
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        img_size: Sequence[int],
        j: int = 2,
        head: str = "cnn",
        width: int = 16,
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(f"spatial_dims: the scattering front end is 2D, got {spatial_dims}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        if any(s % 2**j for s in img_size) or min(img_size) < 2 ** (j + 1):
            raise ValueError(
                f"j: the image size {list(img_size)} must be a multiple of 2^j = {2**j}, and >= {2 ** (j + 1)}; "
                "set data.size accordingly, or model.params.j"
            )
        self.scattering = _scattering(j, img_size)
        for name in list(self.scattering._buffers):  # fixed filters: keep them out of the state dict
            self.scattering._non_persistent_buffers_set.add(name)
        per_channel = 1 + 8 * j + 32 * j * (j - 1)
        channels = in_channels * per_channel
        self.norm = nn.GroupNorm(_groups(channels), channels)
        side = [s // 2**j for s in img_size]
        if head == "linear":
            self.head: nn.Module = nn.Sequential(nn.Flatten(), nn.Linear(channels * side[0] * side[1], out_channels))
        else:
            act = ACTIVATIONS[activation]
            self.head = nn.Sequential(
                nn.Conv2d(channels, width, 3, padding=1),
                nn.GroupNorm(min(GROUPS, width), width),
                act(),
                nn.Conv2d(width, 2 * width, 3, padding=1),
                nn.GroupNorm(min(GROUPS, 2 * width), 2 * width),
                act(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(2 * width, out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.scattering(x.float().contiguous())  # (N, C, K, H', W')
        feats = feats.flatten(1, 2)
        return self.head(self.norm(feats))


def _groups(channels: int) -> int:
    """The largest of 27, 9, 3, 1 that divides ``channels`` (81 per input channel at J = 2)."""
    return next(g for g in (27, 9, 3, 1) if channels % g == 0)
