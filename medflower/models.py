"""The model zoo: every network is MONAI's, except the tiny quick-start CNN.

Both sides build the same network from the experiment's ``model:`` section, so that the server's
initial weights and the clients' state dicts agree key for key. GroupNorm is the default norm
because BatchNorm's running statistics are incompatible with DP-SGD (and leak batch statistics).

``model.params`` are the chosen MONAI network's own keyword arguments; they are checked against its
signature (a typo is an error that lists the valid ones), and the input size is checked against
what the network can take (e.g. SwinUNETR needs multiples of 32) before anything is built, so a
bad combination fails with a message naming ``data.size``/``data.patch_size`` instead of a shape
error deep inside a forward pass at a site.

``vit`` is :class:`medflower.dpvit.DPViT`: MONAI's ViT (same arguments and blocks) restructured so
that Opacus can train it; it is built for every privacy mode so that all sides hold one architecture.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from medflower._preload import require_monai
from medflower.config import ModelConfig
from medflower.schema import ConfigError
from medflower.smallcnn import GROUPS, SmallCNN

CLASSIFIERS = ("cnn", "scatternet", "resnet18", "resnet34", "densenet121", "efficientnet-b0", "vit")
SEGMENTERS = ("unet", "basicunet", "swinunetr")
SIZE_HINT = "set data.size (or data.patch_size for segmentation) accordingly"


def replace_batchnorm(module: nn.Module, norm: str) -> nn.Module:
    """Swap every BatchNorm for GroupNorm (``GROUPS`` groups) or affine InstanceNorm, in place.

    Needed because MONAI 1.6.1's ``ResNet._make_layer`` does not pass its ``norm`` argument to the
    residual blocks: ``ResNet(norm="group")`` still builds BatchNorm in every block (only the stem
    follows ``norm``). Written here because neither MONAI nor torch offers the swap; Opacus'
    ``ModuleValidator.fix`` does, but picks its own group count.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            c = child.num_features
            setattr(module, name, nn.GroupNorm(min(GROUPS, c), c) if norm == "group" else nn.GroupNorm(c, c))
        else:
            replace_batchnorm(child, norm)
    return module


def _norm(name: str) -> Any:
    if name == "group":
        return ("group", {"num_groups": GROUPS})
    if name == "instance":
        return ("instance", {"affine": True})
    return "batch"


class WithHead(nn.Sequential):
    """A MONAI segmenter with a 1x1 convolution to ``out_channels`` appended.

    MONAI's U-Net normalises its last up-sampling output, whose width is ``out_channels``: with
    GroupNorm(8) and 2 classes that cannot be built. The U-Net therefore ends at ``channels[0]``
    features (a multiple of 8) and this plain 1x1 convolution maps them to the classes.
    """

    def __init__(self, body: nn.Module, *, spatial_dims: int, features: int, out_channels: int) -> None:
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        super().__init__(body, conv(features, out_channels, kernel_size=1))


def _check_params(name: str, fn: Callable[..., Any], params: dict[str, Any], fixed: Sequence[str]) -> None:
    sig = inspect.signature(fn)
    accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    valid = [p for p in sig.parameters if p not in fixed and p not in ("self", "kwargs", "args")]
    for key in params:
        if key in fixed:
            raise ConfigError(f"model.params.{key}: set by medflower for {name!r} (from the data set); remove it")
        if key not in sig.parameters and not accepts_kwargs:
            raise ConfigError(f"model.params.{key}: not an argument of {name!r}; valid: " + ", ".join(sorted(valid)))


def _ints(value: Any, nd: int) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),) * nd


def check_input_size(
    name: str, img_size: Sequence[int], *, norm: str = "group", params: dict[str, Any] | None = None
) -> None:
    """Raise :class:`ConfigError` if network ``name`` cannot take inputs of ``img_size``.

    The limits come from each MONAI network's down-sampling: DenseNet-121 and EfficientNet-B0 reduce
    every axis 32-fold, SwinUNETR needs multiples of 32, BasicUNet pools four times, U-Net needs
    multiples of the product of its strides, ViT of its patch size. InstanceNorm additionally needs
    more than one value per channel in the last feature map.
    """
    params = params or {}
    size = tuple(int(s) for s in img_size)
    nd = len(size)
    label = f"{name!r} on inputs of size {list(size)}"
    if name in ("densenet121", "efficientnet-b0", "resnet18", "resnet34"):
        factor = 32
        if name.startswith("resnet") and min(size) < 64:
            factor = 8  # small inputs: built without the stem's down-sampling (see build_model)
        elif min(size) < 32:
            raise ConfigError(f"model.name: {label}: every axis must be >= 32 (it is reduced 32-fold); {SIZE_HINT}")
        if norm == "instance" and math.prod(max(1, s // factor) for s in size) < 2:
            raise ConfigError(
                f"model.norm: 'instance' with {label}: the last feature map has one value per "
                f"channel; use norm 'group' or larger inputs ({SIZE_HINT})"
            )
    elif name == "swinunetr":
        if any(s % 32 for s in size):
            raise ConfigError(f"model.name: {label}: SwinUNETR needs every axis to be a multiple of 32; {SIZE_HINT}")
        if norm == "instance" and math.prod(s // 32 for s in size) < 2:
            raise ConfigError(
                f"model.norm: 'instance' with {label}: the bottleneck has one value per channel; "
                f"use norm 'group' or larger inputs ({SIZE_HINT})"
            )
    elif name == "basicunet":
        if min(size) < 16:
            raise ConfigError(f"model.name: {label}: BasicUNet pools four times, every axis must be >= 16; {SIZE_HINT}")
        if norm == "instance" and math.prod(s // 16 for s in size) < 2:
            raise ConfigError(
                f"model.norm: 'instance' with {label}: the bottleneck has one value per channel; "
                f"use norm 'group' or larger inputs ({SIZE_HINT})"
            )
    elif name == "unet":
        strides = params.get("strides", (2, 2, 2))
        factor = math.prod(max(_ints(s, nd)) for s in strides)
        if any(s % factor for s in size):
            raise ConfigError(
                f"model.name: {label}: U-Net with strides {list(strides)} needs every axis to be a "
                f"multiple of {factor}; {SIZE_HINT}"
            )
    elif name == "vit":
        patch = _ints(params.get("patch_size", default_vit_patch(size)), nd)
        if len(patch) != nd or any(s % p for s, p in zip(size, patch, strict=True)):
            raise ConfigError(f"model.params.patch_size: {list(patch)} does not divide {label}; {SIZE_HINT}")


def default_vit_patch(img_size: Sequence[int]) -> tuple[int, ...]:
    """Per axis: 16 for large axes, else the largest of 8/4/2/1 that divides it (tokens stay few on CPU)."""
    out = []
    for s in img_size:
        if s >= 128 and s % 16 == 0:
            out.append(16)
        else:
            out.append(next(p for p in (8 if s > 64 else 4, 2, 1) if s % p == 0))
    return tuple(out)


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
        raise ConfigError(
            f"model.name: {name!r} is not a classifier; valid for classification: {', '.join(CLASSIFIERS)}"
        )
    if task == "segmentation" and name not in SEGMENTERS:
        raise ConfigError(f"model.name: {name!r} is not a segmenter; valid for segmentation: {', '.join(SEGMENTERS)}")
    check_input_size(name, img_size, norm=cfg.norm, params=params)
    norm = _norm(cfg.norm)

    def make(fn: Callable[..., nn.Module], fixed: dict[str, Any], defaults: dict[str, Any] | None = None) -> nn.Module:
        _check_params(name, fn, params, tuple(fixed))
        kwargs = {**(defaults or {}), **params, **fixed}
        try:
            return fn(**kwargs)
        except (TypeError, ValueError, AssertionError) as err:
            hint = (
                f" (model.norm 'group' uses {GROUPS} groups: channel widths must be multiples of {GROUPS})"
                if "num_groups" in str(err)
                else ""
            )
            raise ConfigError(f"model: cannot build {name!r} with {params or 'defaults'}: {err}{hint}") from err

    if name == "cnn":
        return make(
            SmallCNN,
            {"spatial_dims": sd, "in_channels": in_channels, "out_channels": out_channels, "norm": cfg.norm},
        )
    if name == "scatternet":
        from medflower.scatternet import ScatterNet  # kymatio, an optional dependency

        return make(
            ScatterNet,
            {"spatial_dims": sd, "in_channels": in_channels, "out_channels": out_channels, "img_size": tuple(img_size)},
        )
    require_monai()  # every other model is MONAI's (or built from its blocks): imported on first use
    from monai.networks import nets

    if name in ("resnet18", "resnet34"):
        layers = [2, 2, 2, 2] if name == "resnet18" else [3, 4, 6, 3]
        small = min(img_size) < 64  # MedMNIST-sized inputs: no stem downsampling (as MedMNIST's baseline)
        resnet = make(
            nets.ResNet,
            {
                "block": "basic",
                "layers": layers,
                "block_inplanes": [64, 128, 256, 512],
                "spatial_dims": sd,
                "n_input_channels": in_channels,
                "num_classes": out_channels,
                "norm": norm,
            },
            {"conv1_t_size": 3 if small else 7, "conv1_t_stride": 1 if small else 2, "no_max_pool": small},
        )
        return replace_batchnorm(resnet, cfg.norm) if cfg.norm != "batch" else resnet
    if name == "densenet121":
        return make(
            nets.DenseNet121,
            {"spatial_dims": sd, "in_channels": in_channels, "out_channels": out_channels, "norm": norm},
        )
    if name == "efficientnet-b0":
        return make(
            nets.EfficientNetBN,
            {
                "model_name": "efficientnet-b0",
                "pretrained": False,
                "spatial_dims": sd,
                "in_channels": in_channels,
                "num_classes": out_channels,
                "norm": norm,
            },
        )
    if name == "vit":
        # imported here: medflower.dpvit imports Opacus (seconds to import), which only 'vit' needs
        from medflower.dpvit import DPViT  # MONAI's ViT, restructured for DP-SGD (same network)

        return make(
            DPViT,
            {
                "in_channels": in_channels,
                "img_size": tuple(img_size),
                "classification": True,
                "num_classes": out_channels,
                "spatial_dims": sd,
                "post_activation": None,
            },
            {
                "patch_size": default_vit_patch(img_size),
                "hidden_size": 192,
                "mlp_dim": 384,
                "num_layers": 4,
                "num_heads": 4,
            },
        )
    if name == "unet":
        channels: tuple[int, ...] = (16, 32, 64, 128)
        defaults = {"channels": channels, "strides": (2, 2, 2), "num_res_units": 1}
        features = int((params.get("channels") or channels)[0])
        needs_head = cfg.norm == "group" and out_channels % GROUPS != 0
        body = make(
            nets.UNet,
            {
                "spatial_dims": sd,
                "in_channels": in_channels,
                "norm": norm,
                "out_channels": features if needs_head else out_channels,
            },
            defaults,
        )
        return WithHead(body, spatial_dims=sd, features=features, out_channels=out_channels) if needs_head else body
    if name == "basicunet":
        return make(
            nets.BasicUNet,
            {"spatial_dims": sd, "in_channels": in_channels, "out_channels": out_channels, "norm": norm},
            {"features": (16, 16, 32, 64, 128, 16)},
        )
    # swinunetr (MONAI's argument is norm_name, and it takes no img_size since MONAI 1.5)
    return make(
        nets.SwinUNETR,
        {"spatial_dims": sd, "in_channels": in_channels, "out_channels": out_channels, "norm_name": norm},
        {"feature_size": 24},
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
