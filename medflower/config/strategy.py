"""``strategy:`` — how the coordinator aggregates site updates (see :mod:`strategies`).

Each strategy's ``params`` have their own frozen dataclass below, so that a typo or an out-of-range
value is caught when the YAML is loaded (naming ``strategy.params.<key>`` and listing the valid
keys), not rounds later on the coordinator. The defaults are Flower's own, except where Flower's
default makes the method a no-op (FedProx ``proximal_mu=0``, FedAvgM ``server_momentum=0``) or is
known to diverge on small CNNs (FedAdam/FedAdagrad ``eta=0.1``); docs/strategies.md
("Aggregation strategies") lists every value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from medflower.schema import ConfigError, from_dict, rng_field

StrategyName = Literal[
    "fedavg",
    "fedavgm",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
    "qfedavg",
    "scaffold",
    "fedbn",
    "ditto",
]
STRATEGY_NAMES: tuple[str, ...] = get_args(StrategyName)


@dataclass(frozen=True)
class NoParams:
    """FedAvg, FedMedian and FedBN take no parameters."""


@dataclass(frozen=True)
class FedAvgMParams:
    server_learning_rate: float = rng_field(1.0, min=0.0, exclusive_min=True)
    server_momentum: float = rng_field(0.9, min=0.0, max=1.0)


@dataclass(frozen=True)
class FedProxParams:
    proximal_mu: float = rng_field(0.01, min=0.0)


@dataclass(frozen=True)
class FedOptParams:
    """FedAdam / FedYogi (Reddi et al. 2021). ``beta_*`` are ignored by FedAdagrad (it has none)."""

    eta: float = rng_field(0.01, min=0.0, exclusive_min=True)
    beta_1: float = rng_field(0.9, min=0.0, max=1.0)
    beta_2: float = rng_field(0.99, min=0.0, max=1.0)
    tau: float = rng_field(1e-3, min=0.0, exclusive_min=True)


@dataclass(frozen=True)
class FedAdagradParams:
    eta: float = rng_field(0.01, min=0.0, exclusive_min=True)
    tau: float = rng_field(1e-3, min=0.0, exclusive_min=True)


@dataclass(frozen=True)
class TrimmedAvgParams:
    beta: float = rng_field(0.2, min=0.0, max=0.499)


@dataclass(frozen=True)
class KrumParams:
    num_malicious_nodes: int = rng_field(1, min=0)


@dataclass(frozen=True)
class MultiKrumParams:
    num_malicious_nodes: int = rng_field(1, min=0)
    num_nodes_to_select: int = rng_field(2, min=1)


@dataclass(frozen=True)
class BulyanParams:
    num_malicious_nodes: int = rng_field(1, min=0)


@dataclass(frozen=True)
class QFedAvgParams:
    q: float = rng_field(0.1, min=0.0)
    # None = the experiment's train.lr (q-FedAvg estimates the Lipschitz constant as 1/lr)
    client_learning_rate: float | None = rng_field(None, min=0.0, exclusive_min=True)


@dataclass(frozen=True)
class ScaffoldParams:
    server_learning_rate: float = rng_field(1.0, min=0.0, exclusive_min=True)


@dataclass(frozen=True)
class DittoParams:
    lam: float = rng_field(0.1, min=0.0)  # λ: pull of the personal model toward the global one
    personal_epochs: int | None = rng_field(None, min=1)  # None = train.local_epochs
    personal_lr: float | None = rng_field(None, min=0.0, exclusive_min=True)  # None = train.lr


PARAMS: dict[str, type] = {
    "fedavg": NoParams,
    "fedavgm": FedAvgMParams,
    "fedprox": FedProxParams,
    "fedadam": FedOptParams,
    "fedyogi": FedOptParams,
    "fedadagrad": FedAdagradParams,
    "fedmedian": NoParams,
    "fedtrimmedavg": TrimmedAvgParams,
    "krum": KrumParams,
    "multikrum": MultiKrumParams,
    "bulyan": BulyanParams,
    "qfedavg": QFedAvgParams,
    "scaffold": ScaffoldParams,
    "fedbn": NoParams,
    "ditto": DittoParams,
}


def parse_params(name: str, params: dict[str, Any]) -> Any:
    """The typed parameters of strategy ``name``; errors name ``strategy.params.<key>``."""
    if name not in PARAMS:
        raise ConfigError(f"strategy.name: invalid value {name!r}; valid choices are " + ", ".join(STRATEGY_NAMES))
    cls = PARAMS[name]
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in params:
        if key not in valid:
            raise ConfigError(
                f"strategy.params.{key}: not a parameter of {name!r}; "
                + (f"valid parameters are {', '.join(valid)}" if valid else f"{name!r} takes no parameters")
            )
    return from_dict(cls, params, "strategy.params")


@dataclass(frozen=True)
class StrategyConfig:
    """Aggregation strategy by name, its ``params``, sampling, and the update screening bound.

    Every strategy is wrapped by :class:`medflower.strategies.robust.RobustStrategy`, which rejects updates
    that are non-finite or do not match the global model; ``max_update_norm`` additionally rejects
    updates whose L2 distance from the global model exceeds it (None = no norm bound).
    """

    name: StrategyName = "fedavg"
    params: dict[str, Any] = field(default_factory=dict)
    fraction_train: float = rng_field(1.0, min=0.0, exclusive_min=True, max=1.0)
    fraction_evaluate: float = rng_field(1.0, min=0.0, max=1.0)
    max_update_norm: float | None = rng_field(None, min=0.0, exclusive_min=True)

    def __post_init__(self) -> None:
        parse_params(self.name, self.params)  # validate at load time

    def typed_params(self) -> Any:
        return parse_params(self.name, self.params)
