"""The method registry: every aggregation method medflower offers, each declared once.

One module per method in :mod:`medflower.strategies.methods` declares a module-level ``METHOD``
(a :class:`Method`): its parameter schema, its server half (a factory returning a Flower
``Strategy``: Flower's own class where Flower has the method), its site half (a
:class:`SiteHalf`, or None when the site only trains), the message keys it adds, and its
compatibility with the privacy modes, secure aggregation and model kinds. Modules are discovered
by scanning that package, so adding a method is one module plus its tests: YAML validation
(:mod:`medflower.config.strategy`), the coordinator's builder (:mod:`medflower.server.build`),
the compatibility errors and the documentation table all read :data:`METHODS`.

Flower has the strategies but no such registry (its examples wire each strategy by hand) and no
site halves (it leaves the client to the user), hence this module.

This package sits just above the shared core (schema, keys, hooks) and below
:mod:`medflower.config`: nothing here imports the experiment config, the client or the server.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import Strategy
from torch import nn

from medflower import keys, records
from medflower.hooks import LocalHooks, SiteRuntime, TrainStats
from medflower.schema import ConfigError, from_dict
from medflower.strategies import methods

PRIVACY_MODES = ("none", "sample", "client")  # medflower.config.privacy.PrivacyMode

Spec = dict[str, tuple[tuple[int, ...], str]]  # array key -> (shape, dtype string)

# Reasons shared by several methods' compatibility declarations.
NEEDS_WEIGHTED_MEAN = (
    "client-level DP bounds each site's influence on a weighted mean (Flower's DP wrappers and accountant "
    "assume FedAvg's aggregation); this method aggregates differently, so its sensitivity is another"
)
SEES_EACH_UPDATE = "its server half must see each site's update, not only their sum"
# Compatibility presets (keyword arguments of Method) for two families of Flower's strategies:
MEAN_ONLY: dict[str, Any] = {  # server optimizers on the mean: any site-side DP; the server sees only a sum
    "privacy": {"none": None, "sample": None, "client": NEEDS_WEIGHTED_MEAN},
    "secure_aggregation": None,
}
ROBUST: dict[str, Any] = {  # robust aggregators: they must see every update
    "privacy": {"none": None, "sample": None, "client": NEEDS_WEIGHTED_MEAN},
    "secure_aggregation": SEES_EACH_UPDATE,
}


@dataclass(frozen=True, kw_only=True)
class ServerContext:
    """What a method's server half may read to build itself (the builder fills it from the config).

    ``flower`` holds the keyword arguments every Flower strategy of the FedAvg family takes
    (sampling fractions, minimum node counts, record and weight keys). ``param_keys`` and
    ``norm_keys`` build the experiment's model on demand: only SCAFFOLD and FedBN need them.
    """

    params: Any
    num_sites: int
    flower: Mapping[str, Any]
    train_lr: float
    train_optimizer: str
    local_epochs: int
    param_keys: Callable[[], list[str]]
    norm_keys: Callable[[], list[str]]


def tensors_to_arrays(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """CPU float arrays for a message or ``context.state`` (0-d arrays stay 0-d)."""
    return ArrayRecord({k: Array(np.array(t.detach().cpu().numpy(), order="C")) for k, t in tensors.items()})


def arrays_to_tensors(record: ArrayRecord, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Tensors on ``device`` (the model's, where they meet its parameters; default CPU)."""
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)).to(device) for k, a in record.items()}


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class SiteUpdate:
    """What a site half adds to a train reply: the state to send, extra records, extra metrics."""

    state: dict[str, torch.Tensor]
    records: dict[str, ArrayRecord] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


class SiteHalf:
    """A method's work at a site, for one message; the default does nothing (plain local training).

    Built right after the site loaded the message's global model into ``model``, so a method that
    keeps layers at the site (FedBN) restores them here. ``state`` is the node's persistent
    ``context.state``: what a method keeps across rounds lives there, under its own keys.
    """

    def __init__(self, *, message: Message, state: RecordDict, model: nn.Module, runtime: SiteRuntime) -> None:
        self.message = message
        self.state = state
        self.model = model
        self.runtime = runtime
        self.config: ConfigRecord = records.config(message, keys.CONFIG)
        self.global_arrays: ArrayRecord = records.arrays(message, keys.ARRAYS)

    def hooks(self) -> LocalHooks:
        """Additions to the local objective (loss terms, gradient corrections)."""
        return LocalHooks()

    def after_train(self, model: nn.Module, stats: TrainStats) -> SiteUpdate:
        """The reply's model state (all of it by default), extra records and metrics."""
        return SiteUpdate(state=dict(model.state_dict()))

    def evaluation_metrics(self, split: Any, split_name: str) -> dict[str, float]:
        """Metrics added to an evaluation reply (Ditto: its personal model's)."""
        return {}


def model_arrays(global_spec: Spec, strategy: Strategy) -> dict[str, Spec]:
    """The default reply layout: one ArrayRecord with every array of the global model."""
    return {keys.ARRAYS: global_spec}


@dataclass(frozen=True, kw_only=True)
class Method:
    """One aggregation method, declared once (see the module docstring).

    ``privacy`` maps every privacy mode to None (compatible) or the reason it is refused;
    ``secure_aggregation`` is None when the server half needs only the weighted sum of the updates
    (so secure aggregation could hide each one), else the reason it must see each update;
    ``models`` says which models the method needs (checked when it is built); ``personal_model``
    whether each site keeps a model of its own (a hospital's policy may refuse that). ``reply_arrays``
    gives the ArrayRecords a valid train reply carries, from the global model's layout.
    """

    name: str
    summary: str
    params: type
    build: Callable[[ServerContext], Strategy]
    site: type[SiteHalf] = SiteHalf
    message_keys: tuple[str, ...] = ()
    privacy: Mapping[str, str | None]
    secure_aggregation: str | None
    models: str = "any"
    personal_model: bool = False  # keeps a model at each site that is trained there and never aggregated
    source: str = "Flower"
    reference: str = ""
    reply_arrays: Callable[[Spec, Strategy], dict[str, Spec]] = model_arrays

    def __post_init__(self) -> None:
        if set(self.privacy) != set(PRIVACY_MODES):
            raise ValueError(f"method {self.name!r}: privacy must declare every mode {PRIVACY_MODES}")
        if not dataclasses.is_dataclass(self.params):
            raise ValueError(f"method {self.name!r}: params must be a dataclass")

    def parse_params(self, raw: Mapping[str, Any]) -> Any:
        """The typed parameters; errors name ``strategy.params.<key>`` and list the valid keys."""
        valid = [f.name for f in dataclasses.fields(self.params)]
        for key in raw:
            if key not in valid:
                raise ConfigError(
                    f"strategy.params.{key}: not a parameter of {self.name!r}; "
                    + (f"valid parameters are {', '.join(valid)}" if valid else f"{self.name!r} takes no parameters")
                )
        return from_dict(self.params, dict(raw), "strategy.params")

    def refusal(self, privacy_mode: str) -> str | None:
        """Why this method cannot run under ``privacy_mode`` (None if it can)."""
        return self.privacy[privacy_mode]


@dataclass(frozen=True)
class NoParams:
    """The method takes no parameters."""


def _discover() -> dict[str, Method]:
    found: dict[str, Method] = {}
    for info in sorted(pkgutil.iter_modules(methods.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{methods.__name__}.{info.name}")
        declared = getattr(module, "METHODS", None) or [getattr(module, "METHOD", None)]
        for method in declared:
            if not isinstance(method, Method):
                raise TypeError(f"{module.__name__} declares no METHOD (a medflower.strategies.registry.Method)")
            if method.name in found:
                raise ValueError(f"method {method.name!r} is declared twice ({module.__name__})")
            found[method.name] = method
    clash = _key_clashes(found)
    if clash:
        raise ValueError(clash)
    return found


def _key_clashes(found: Mapping[str, Method]) -> str | None:
    """Two methods, or a method and the core protocol, must never use the same message key."""
    core = {v for k, v in vars(keys).items() if k.isupper() and isinstance(v, str)}
    owner: dict[str, str] = {}
    for m in found.values():
        for k in m.message_keys:
            if k in core:
                return f"method {m.name!r}: message key {k!r} is a core key (medflower.keys)"
            if k in owner and owner[k] != m.name:
                return f"message key {k!r} is declared by both {owner[k]!r} and {m.name!r}"
            owner[k] = m.name
    return None


METHODS: dict[str, Method] = _discover()


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def get_method(name: str) -> Method:
    """The method called ``name``; a ConfigError naming ``strategy.name`` lists the valid ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            f"strategy.name: invalid value {name!r}; valid choices are " + ", ".join(repr(n) for n in METHODS)
        ) from None
