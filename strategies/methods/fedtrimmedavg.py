"""FedTrimmedAvg (Yin et al., ICML 2018): the coordinate-wise mean after cutting both tails.

Server half: Flower's ``FedTrimmedAvg``, which cuts ``int(beta * n)`` values per tail: with few
sites a small ``beta`` trims nothing, and the builder says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import WARNING

from flwr.common.logger import log
from flwr.serverapp import strategy as fl

from medflower.schema import rng_field
from medflower.strategies.registry import ROBUST, Method, ServerContext


@dataclass(frozen=True)
class TrimmedAvgParams:
    beta: float = rng_field(0.2, min=0.0, max=0.499)


def build(ctx: ServerContext) -> fl.FedTrimmedAvg:
    beta = ctx.params.beta
    if int(beta * ctx.num_sites) == 0:
        log(
            WARNING,
            "strategy.params.beta=%s trims nothing with %d sites (it cuts int(beta*n) per tail): "
            "FedTrimmedAvg is plain averaging here",
            beta,
            ctx.num_sites,
        )
    return fl.FedTrimmedAvg(**ctx.flower, beta=beta)


METHOD = Method(
    name="fedtrimmedavg",
    summary="coordinate-wise mean after cutting the beta share of each tail (robust)",
    params=TrimmedAvgParams,
    build=build,
    **ROBUST,
    reference="Yin et al., ICML 2018",
)
