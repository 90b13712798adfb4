"""FedAvgM (Hsu et al. 2019): FedAvg with server momentum on the averaged update.

Server half: Flower's ``FedAvgM``. Flower's default ``server_momentum=0`` makes it plain FedAvg,
so medflower's default is 0.9.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.serverapp import strategy as fl

from medflower.schema import rng_field
from medflower.strategies.registry import MEAN_ONLY, Method, ServerContext


@dataclass(frozen=True)
class FedAvgMParams:
    server_learning_rate: float = rng_field(1.0, min=0.0, exclusive_min=True)
    server_momentum: float = rng_field(0.9, min=0.0, max=1.0)


def build(ctx: ServerContext) -> fl.FedAvgM:
    p: FedAvgMParams = ctx.params
    return fl.FedAvgM(**ctx.flower, server_learning_rate=p.server_learning_rate, server_momentum=p.server_momentum)


METHOD = Method(
    name="fedavgm",
    summary="FedAvg plus server momentum",
    params=FedAvgMParams,
    build=build,
    **MEAN_ONLY,
    reference="Hsu et al. 2019",
)
