"""FedAdagrad (Reddi et al., ICLR 2021): Adagrad on the server.

Server half: Flower's ``FedAdagrad`` (medflower's default ``eta`` is 0.01, as for FedAdam).
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.serverapp import strategy as fl

from medflower.schema import rng_field
from medflower.strategies.registry import MEAN_ONLY, Method, ServerContext


@dataclass(frozen=True)
class FedAdagradParams:
    eta: float = rng_field(0.01, min=0.0, exclusive_min=True)
    tau: float = rng_field(1e-3, min=0.0, exclusive_min=True)


def build(ctx: ServerContext) -> fl.FedAdagrad:
    p: FedAdagradParams = ctx.params
    return fl.FedAdagrad(**ctx.flower, eta=p.eta, eta_l=ctx.train_lr, tau=p.tau)


METHOD = Method(
    name="fedadagrad",
    summary="Adagrad on the server, with the averaged update as its gradient",
    params=FedAdagradParams,
    build=build,
    **MEAN_ONLY,
    reference="Reddi et al., ICLR 2021",
)
