"""The input/output sizes a model is built for, from the config or else from the data set."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from medflower.config import ExperimentConfig
from medflower.data import load_dataset
from medflower.models import build_model


@dataclass(frozen=True)
class ModelSpec:
    in_channels: int
    out_channels: int
    img_size: tuple[int, ...]


def model_spec(exp: ExperimentConfig) -> ModelSpec:
    m = exp.model
    if m.in_channels is not None and m.out_channels is not None and m.img_size is not None:
        return ModelSpec(m.in_channels, m.out_channels, tuple(m.img_size))
    ds = load_dataset(exp)
    return ModelSpec(
        m.in_channels if m.in_channels is not None else ds.in_channels,
        m.out_channels if m.out_channels is not None else ds.num_classes,
        tuple(m.img_size) if m.img_size is not None else tuple(ds.img_size),
    )


def build_experiment_model(exp: ExperimentConfig) -> nn.Module:
    """The experiment's network, sized for its data: what both apps call."""
    spec = model_spec(exp)
    model = build_model(
        exp.model, in_channels=spec.in_channels, out_channels=spec.out_channels, img_size=spec.img_size, task=exp.task
    )
    if exp.privacy.mode == "sample":  # DP-SGD: both sides must hold the same (Opacus-compatible) net
        # imported here: Opacus takes seconds to import and only privacy.mode 'sample' needs it
        from medflower.dpcompat import make_dp_compatible

        model = make_dp_compatible(model, exp.model, in_channels=spec.in_channels, img_size=spec.img_size)
    return model
