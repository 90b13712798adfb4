"""``model:`` — which network of the zoo to build (see :mod:`medflower.models`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from medflower.schema import rng_field

ModelName = Literal[
    "cnn",
    "scatternet",
    "resnet18",
    "resnet34",
    "densenet121",
    "efficientnet-b0",
    "vit",
    "unet",
    "basicunet",
    "swinunetr",
]
NormName = Literal["group", "batch", "instance"]


@dataclass(frozen=True)
class ModelConfig:
    """Network choice. ``in_channels``/``out_channels`` come from the data set, not from here.

    ``params`` holds extra keyword arguments of the chosen network; :func:`medflower.models.build_model`
    validates them against that network and names any it does not accept.
    """

    name: ModelName = "cnn"
    spatial_dims: Literal[2, 3] = 2
    norm: NormName = "group"
    params: dict[str, Any] = field(default_factory=dict)
    # input/output sizes; None = read from the data set (simulation). A deployed coordinator that
    # holds no data sets them here so that it can build the initial model.
    in_channels: int | None = rng_field(None, min=1)
    out_channels: int | None = rng_field(None, min=1)
    img_size: tuple[int, ...] | None = None
    # the coordinator's initial weights: a state-dict file (``torch.save(model.state_dict(), f)``, e.g. a
    # previous run's model.pt, or a network pretrained on public images), relative to the YAML file.
    # None: seeded random initialisation. Only the coordinator reads it: sites receive the weights.
    init: str | None = None
    # parameter-name prefixes (as in the state dict, e.g. ``features`` or ``features.0``) that stay fixed:
    # not trained, not sent changed, not noised. With ``init`` pretrained weights this is linear probing
    # or partial fine-tuning; under DP-SGD the noise then falls on the trained parameters only.
    freeze: tuple[str, ...] = ()
    # the head sees the trunk's features through a fixed whitening (mean and inverse square root of the covariance
    # of the trunk's features on `medflower prior`'s synthetic images; buffers, never trained). For DP linear
    # probing: DP-SGD clips and noises every direction alike, so features with one dominant direction (their
    # mean) and a 7x spread of scales train slowly under it. Needs a model.init written by `medflower prior`
    # for this model (medflower.modelspec.WhitenedHead, docs/privacy.md). Refused with privacy.mode 'client', whose
    # noise falls on every array the coordinator sends, these buffers included.
    whiten_features: bool = False
