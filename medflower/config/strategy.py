"""``strategy:`` — how the coordinator aggregates site updates.

The methods, their parameters, defaults and ranges are declared once, in
:mod:`medflower.strategies.registry` (one module per method); this section only names one and
validates its ``params`` against it at load time, so that a typo or an out-of-range value is caught
when the YAML is loaded (naming ``strategy.params.<key>`` and listing the valid keys), not rounds
later on the coordinator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from medflower.schema import rng_field
from medflower.strategies.registry import get_method, method_names

STRATEGY_NAMES: tuple[str, ...] = method_names()


@dataclass(frozen=True)
class StrategyConfig:
    """Aggregation method by name, its ``params``, sampling, and the update screening bound.

    Every reply is screened before aggregation (:mod:`medflower.server.screens`): non-finite
    updates, or updates that do not match the global model, are rejected by site;
    ``max_update_norm`` additionally rejects updates whose L2 distance from the global model
    exceeds it (None = no norm bound).

    ``weighting`` sets each update's weight in the mean, on the coordinator: ``examples`` (the
    training examples the site reports, FedAvg's rule), ``uniform`` (1 per site), or ``capped``
    (the reported examples, but at most the size the site declared when it was registered, else
    at most ``weight_cap_multiple`` times the round's median): one site claiming 10^9 examples
    cannot dominate. Client-level DP always weighs uniformly.

    ``ema_decay`` β > 0 releases, evaluates and saves an exponential moving average of the global
    models instead of the last one (``released = β·released + (1−β)·global`` after each round, the
    first round's global model as its start), while the sites keep training from the global model
    (:mod:`medflower.server.release`). Averaging the iterates damps the random walk that DP-SGD's
    noise drives in the weights; it is post-processing, so it costs no privacy budget. 0: off.
    """

    name: str = field(default="fedavg", metadata={"choices": STRATEGY_NAMES})
    params: dict[str, Any] = field(default_factory=dict)
    fraction_train: float = rng_field(1.0, min=0.0, exclusive_min=True, max=1.0)
    fraction_evaluate: float = rng_field(1.0, min=0.0, max=1.0)
    max_update_norm: float | None = rng_field(None, min=0.0, exclusive_min=True)
    weighting: Literal["examples", "uniform", "capped"] = "examples"
    weight_cap_multiple: float = rng_field(3.0, min=1.0)  # capped: at most this many times the median
    ema_decay: float = rng_field(0.0, min=0.0, max=1.0, exclusive_max=True)

    def __post_init__(self) -> None:
        self.typed_params()  # validate at load time

    def typed_params(self) -> Any:
        """The method's parameters as its frozen dataclass (defaults filled in)."""
        return get_method(self.name).parse_params(self.params)
