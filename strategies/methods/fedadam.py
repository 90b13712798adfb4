"""FedAdam (Reddi et al., ICLR 2021): Adam on the server, the averaged update as its gradient.

Server half: Flower's ``FedAdam``. Flower's default ``eta=0.1`` diverges on small CNNs, so
medflower's default is 0.01. ``eta_l`` is informational in Flower; the sites use ``train.lr``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flwr.serverapp import strategy as fl
from flwr.serverapp.strategy import Strategy

from medflower.schema import rng_field
from medflower.strategies.registry import MEAN_ONLY, Method, ServerContext


@dataclass(frozen=True)
class FedOptParams:
    """FedAdam / FedYogi's server optimizer."""

    eta: float = rng_field(0.01, min=0.0, exclusive_min=True)
    beta_1: float = rng_field(0.9, min=0.0, max=1.0)
    beta_2: float = rng_field(0.99, min=0.0, max=1.0)
    tau: float = rng_field(1e-3, min=0.0, exclusive_min=True)


def fedopt_builder(cls: type[fl.FedAdam] | type[fl.FedYogi]) -> Callable[[ServerContext], Strategy]:
    """The server half of FedAdam or FedYogi: same parameters, Flower's class for each."""

    def build(ctx: ServerContext) -> Strategy:
        p: FedOptParams = ctx.params
        return cls(**ctx.flower, eta=p.eta, eta_l=ctx.train_lr, beta_1=p.beta_1, beta_2=p.beta_2, tau=p.tau)

    return build


METHOD = Method(
    name="fedadam",
    summary="Adam on the server, with the averaged update as its gradient",
    params=FedOptParams,
    build=fedopt_builder(fl.FedAdam),
    **MEAN_ONLY,
    reference="Reddi et al., ICLR 2021",
)
