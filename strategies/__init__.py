"""Aggregation strategies, chosen by name in the experiment's ``strategy:`` section.

Flower's strategies are used as they are; this package only builds them from config and adds what
Flower lacks (one module per algorithm).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, Strategy

from medflower import keys
from medflower.config import ExperimentConfig
from medflower.schema import ConfigError

STRATEGIES = ("fedavg",)


def build_strategy(exp: ExperimentConfig, *, num_sites: int) -> Strategy:
    """Build the configured strategy; ``num_sites`` is how many nodes the federation expects."""
    s = exp.strategy
    if s.name not in STRATEGIES:
        raise ConfigError(f"strategy.name: invalid value {s.name!r}; valid choices are " + ", ".join(STRATEGIES))
    min_sites = exp.participation.min_sites or 1
    common = dict(
        fraction_train=s.fraction_train, fraction_evaluate=s.fraction_evaluate,
        min_train_nodes=min(min_sites, num_sites), min_evaluate_nodes=min(min_sites, num_sites),
        min_available_nodes=num_sites, weighted_by_key=keys.NUM_EXAMPLES,
        arrayrecord_key=keys.ARRAYS, configrecord_key=keys.CONFIG,
    )
    if s.params:
        raise ConfigError(f"strategy.params.{next(iter(s.params))}: 'fedavg' takes no parameters")
    return FedAvg(**common)
