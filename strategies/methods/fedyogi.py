"""FedYogi (Reddi et al., ICLR 2021): Yogi on the server (Adam with a sign-controlled second moment).

Server half: Flower's ``FedYogi``, with FedAdam's parameters and defaults.
"""

from __future__ import annotations

from flwr.serverapp import strategy as fl

from medflower.strategies.methods.fedadam import FedOptParams
from medflower.strategies.registry import NEEDS_WEIGHTED_MEAN, Method, ServerContext


def build(ctx: ServerContext) -> fl.FedYogi:
    p: FedOptParams = ctx.params
    return fl.FedYogi(**ctx.flower, eta=p.eta, eta_l=ctx.train_lr, beta_1=p.beta_1, beta_2=p.beta_2, tau=p.tau)


METHOD = Method(
    name="fedyogi",
    summary="Yogi on the server: Adam whose second moment grows more cautiously",
    params=FedOptParams,
    build=build,
    privacy={"none": None, "sample": None, "client": NEEDS_WEIGHTED_MEAN},
    secure_aggregation=None,
    reference="Reddi et al., ICLR 2021",
)
