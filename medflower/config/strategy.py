"""``strategy:`` — how the coordinator aggregates site updates (see :mod:`strategies`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from medflower.schema import rng_field


@dataclass(frozen=True)
class StrategyConfig:
    """Aggregation strategy by name; ``params`` are validated by :func:`strategies.build_strategy`."""

    name: str = "fedavg"
    params: dict[str, Any] = field(default_factory=dict)
    fraction_train: float = rng_field(1.0, min=0.0, exclusive_min=True, max=1.0)
    fraction_evaluate: float = rng_field(1.0, min=0.0, max=1.0)
