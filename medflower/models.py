"""The model zoo: every network is MONAI's, except the tiny quick-start CNN.

Both sides build the same network from the experiment's ``model:`` section, so that the server's
initial weights and the clients' state dicts agree key for key. GroupNorm is the default norm
because BatchNorm's running statistics are incompatible with DP-SGD (and leak batch statistics).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.networks import nets
from torch import nn

from medflower.config import ModelConfig
from medflower.schema import ConfigError

CLASSIFIERS = ("cnn", "resnet18", "resnet34", "densenet121", "efficientnet-b0", "vit")
SEGMENTERS = ("unet", "basicunet", "swinunetr")
GROUPS = 8  # divides every channel width of the networks below


def _norm(name: str) -> Any:
    if name == "group":
        return ("group", {"num_groups": GROUPS})
    if name == "instance":
        return ("instance", {"affine": True})
    return "batch"


class SmallCNN(nn.Module):
    """Three conv blocks with GroupNorm and a linear head: the quick start's fast model.

    Written here (not MONAI) because MONAI's smallest classifiers are ~10x slower on 2 CPU cores,
    and the quick start must finish in under two minutes.
    """

    def __init__(
        self, *, spatial_dims: int, in_channels: int, out_channels: int, width: int = 16, norm: str = "group"
    ) -> None:
        super().__init__()
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
        for c_out in (width, width * 2, width * 4):
            layers += [conv(c_in, c_out, 3, padding=1), norm_layer(c_out), nn.ReLU(), maxpool(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers[:-1], pool(1))
        self.head = nn.Linear(c_in, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def _check_params(name: str, fn: Callable[..., Any], params: dict[str, Any], fixed: Sequence[str]) -> None:
    sig = inspect.signature(fn)
    accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    valid = [p for p in sig.parameters if p not in fixed and p not in ("self", "kwargs", "args")]
    for key in params:
        if key in fixed:
            raise ConfigError(f"model.params.{key}: set by medflower for {name!r} (from the data set); remove it")
        if key not in sig.parameters and not accepts_kwargs:
            raise ConfigError(
                f"model.params.{key}: not an argument of {name!r}; valid: " + ", ".join(sorted(valid))
            )


def build_model(
    cfg: ModelConfig,
    *,
    in_channels: int,
    out_channels: int,
    img_size: Sequence[int],
    task: str = "classification",
) -> nn.Module:
    """Build the configured network for the given input/output sizes.

    ``img_size`` is the spatial size of the (resized or patched) inputs; ViT and SwinUNETR need it.
    Raises :class:`ConfigError` naming ``model.name``/``model.params.*`` on a bad choice.
    """
    name, sd, params = cfg.name, cfg.spatial_dims, dict(cfg.params)
    if len(img_size) != sd:
        raise ConfigError(f"model.spatial_dims: is {sd} but the data's images are {len(img_size)}D {tuple(img_size)}")
    if task == "classification" and name not in CLASSIFIERS:
        raise ConfigError(f"model.name: {name!r} is not a classifier; valid for classification: {', '.join(CLASSIFIERS)}")
    if task == "segmentation" and name not in SEGMENTERS:
        raise ConfigError(f"model.name: {name!r} is not a segmenter; valid for segmentation: {', '.join(SEGMENTERS)}")
    norm = _norm(cfg.norm)

    def make(fn: Callable[..., nn.Module], fixed: dict[str, Any], defaults: dict[str, Any] | None = None) -> nn.Module:
        _check_params(name, fn, params, tuple(fixed))
        kwargs = {**(defaults or {}), **params, **fixed}
        try:
            return fn(**kwargs)
        except (TypeError, ValueError, AssertionError) as err:
            raise ConfigError(f"model: cannot build {name!r} with {params or 'defaults'}: {err}") from err

    if name == "cnn":
        return make(
            SmallCNN,
            {"spatial_dims": sd, "in_channels": in_channels, "out_channels": out_channels, "norm": cfg.norm},
        )
    if name in ("resnet18", "resnet34"):
        layers = [2, 2, 2, 2] if name == "resnet18" else [3, 4, 6, 3]
        small = min(img_size) < 64  # MedMNIST-sized inputs: no stem downsampling (as MedMNIST's baseline)
        return make(
            nets.ResNet,
            {"block": "basic", "layers": layers, "block_inplanes": [64, 128, 256, 512], "spatial_dims": sd,
             "n_input_channels": in_channels, "num_classes": out_channels, "norm": norm},
            {"conv1_t_size": 3 if small else 7, "conv1_t_stride": 1 if small else 2, "no_max_pool": small},
        )
    if name == "densenet121":
        return make(
            nets.DenseNet121,
            {"spatial_dims": sd, "in_channels": in_channels, "out_channels": out_channels, "norm": norm},
        )
    if name == "efficientnet-b0":
        return make(
            nets.EfficientNetBN,
            {"model_name": "efficientnet-b0", "pretrained": False, "spatial_dims": sd,
             "in_channels": in_channels, "num_classes": out_channels, "norm": norm},
        )
    if name == "vit":
        patch = 4 if max(img_size) <= 64 else 16
        return make(
            nets.ViT,
            {"in_channels": in_channels, "img_size": tuple(img_size), "classification": True,
             "num_classes": out_channels, "spatial_dims": sd, "post_activation": None},
            {"patch_size": patch, "hidden_size": 192, "mlp_dim": 384, "num_layers": 4, "num_heads": 4},
        )
    if name == "unet":
        return make(
            nets.UNet,
            {"spatial_dims": sd, "in_channels": in_channels, "out_channels": out_channels, "norm": norm},
            {"channels": (16, 32, 64, 128), "strides": (2, 2, 2), "num_res_units": 1},
        )
    if name == "basicunet":
        return make(
            nets.BasicUNet,
            {"spatial_dims": sd, "in_channels": in_channels, "out_channels": out_channels, "norm": norm},
            {"features": (16, 16, 32, 64, 128, 16)},
        )
    # swinunetr
    return make(
        nets.SwinUNETR,
        {"spatial_dims": sd, "in_channels": in_channels, "out_channels": out_channels,
         "norm_name": norm if cfg.norm != "group" else ("group", {"num_groups": GROUPS})},
        {"feature_size": 24},
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
