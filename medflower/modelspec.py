"""The input/output sizes a model is built for, from the config or else from the data set."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medflower.config import ExperimentConfig
from medflower.data import load_dataset
from medflower.models import build_model
from medflower.schema import ConfigError


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
    if exp.model.whiten_features:
        parent, attr = last_linear(model)
        setattr(parent, attr, WhitenedHead(getattr(parent, attr)))
    if exp.model.freeze:
        freeze_parameters(model, exp.model.freeze)
    return model


def head_name(model: nn.Module) -> str:
    """The qualified name of the model's last ``nn.Linear``: the classifier head."""
    found = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ConfigError("model: no nn.Linear head found: this applies to classification networks only")
    return found[-1]


def last_linear(model: nn.Module) -> tuple[nn.Module, str]:
    """The classifier head: the parent and attribute name of the model's last ``nn.Linear``."""
    path = head_name(model).split(".")
    parent = model.get_submodule(".".join(path[:-1])) if len(path) > 1 else model
    return parent, path[-1]


class WhitenedHead(nn.Module):
    """``linear((x - mean) @ transform)``: a classifier head that sees its input features through a fixed
    affine map (``model.whiten_features``), held in buffers: never trained, never noised, saved in the state dict
    and sent with the weights, so every site applies the same map.

    Why: under DP-SGD a linear head on frozen features trains by clipped, isotropically noised steps. The
    ``cnn`` trunk's pooled tanh features of a `medflower prior` are dominated by their common mean (on
    BreastMNIST the mean vector's norm is 4.0 of the features' 4.3) and their spreads differ 7x, so the clipped
    steps spend most of their length on a direction that carries no information and the head converges
    slowly: in a pooled DP-SGD simulation even noise-free clipped SGD stopped 0.04 AUC short of the logistic
    regression optimum on the same features (bench/RESULTS.md, stage 24). `medflower prior` fills ``mean`` and
    ``transform`` from the trunk's features of its own synthetic images (no data read: no privacy cost). As
    built, the map is the identity. Nothing in Flower, MONAI or Opacus offers a data-free feature whitening,
    hence written here. The same input shape as the wrapped head's; the map acts on the last dimension.
    """

    mean: torch.Tensor
    transform: torch.Tensor

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        self.linear = linear
        d = linear.in_features
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("transform", torch.eye(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) @ self.transform)


def freeze_parameters(model: nn.Module, prefixes: tuple[str, ...]) -> None:
    """Stop training the parameters whose state-dict names start with one of ``prefixes`` (``model.freeze``).

    Why by name prefix on the built network: both sides build it, so both agree on which parameters train
    (SCAFFOLD's control variates and FedProx's proximal term cover the trainable ones only), and the names
    are the ones a user reads in ``model.pt``. A prefix matches whole name components (``features.1`` does
    not match ``features.10``). A prefix that matches nothing, or one that leaves nothing to train, is a
    ConfigError naming it. Buffers are not parameters: a frozen BatchNorm still updates its running
    statistics in training (medflower's networks use GroupNorm, which has none).
    """

    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(under(n, prefix) for n in names):
            tops = sorted({n.split(".")[0] for n in names})
            raise ConfigError(
                f"model.freeze: {prefix!r} matches no parameter of this model; its top-level modules: {', '.join(tops)}"
            )
    for n, p in model.named_parameters():
        if any(under(n, prefix) for prefix in prefixes):
            p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"model.freeze: {list(prefixes)} freezes every parameter: nothing would train")


def initial_model(exp: ExperimentConfig) -> nn.Module:
    """The network a run starts from: :func:`build_experiment_model`, then ``model.init``'s weights if set.

    Why a separate function: only the coordinator (and ``compare``'s baselines, which must start where the
    federation starts) read ``model.init``; sites build the same network and receive its weights. The file
    must fit the network exactly (every key, every shape): a partial load would silently mix pretrained
    and random layers. Errors name the file and the keys.
    """
    model = build_experiment_model(exp)
    if exp.model.init is None:
        return model
    path = exp.resolve_path(exp.model.init)
    if path is None or not path.is_file():
        raise ConfigError(f"model.init: {path} is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt or non-torch file: torch raises several kinds
        raise ConfigError(f"model.init: cannot read {path} as a torch state dict: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.init: {path} holds no state dict (a mapping of names to tensors)")
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or extra or shapes:
        parts = [f"missing {missing[:5]}" if missing else "", f"unexpected {extra[:5]}" if extra else ""]
        parts.append(f"shapes {shapes[:5]}" if shapes else "")
        hint = ""
        if exp.model.whiten_features and any(k.endswith((".mean", ".transform")) for k in missing):
            hint = (
                " (model.whiten_features needs a file written by `medflower prior` for this experiment; an earlier "
                "prior gains the whitening with `medflower prior EXPERIMENT.yaml --init OLD.pt --steps 0 -o NEW.pt`)"
            )
        raise ConfigError(
            f"model.init: {path} does not fit model {exp.model.name!r} as configured: "
            + "; ".join(p for p in parts if p)
            + hint
        )
    model.load_state_dict(state)
    return model
