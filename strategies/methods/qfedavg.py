"""q-FedAvg (Li et al., ICLR 2020): fairer models by weighting sites with a higher loss more.

Server half: Flower's ``QFedAvg``; it reads each site's ``train-loss`` from the train reply.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.serverapp import strategy as fl

from medflower import keys
from medflower.schema import rng_field
from medflower.strategies.registry import NEEDS_WEIGHTED_MEAN, Method, ServerContext


@dataclass(frozen=True)
class QFedAvgParams:
    q: float = rng_field(0.1, min=0.0)
    # None = the experiment's train.lr (q-FedAvg estimates the Lipschitz constant as 1/lr)
    client_learning_rate: float | None = rng_field(None, min=0.0, exclusive_min=True)


def build(ctx: ServerContext) -> fl.QFedAvg:
    p: QFedAvgParams = ctx.params
    return fl.QFedAvg(
        **ctx.flower,
        q=p.q,
        client_learning_rate=p.client_learning_rate or ctx.train_lr,
        train_loss_key=keys.TRAIN_LOSS,
    )


METHOD = Method(
    name="qfedavg",
    summary="weights sites by their loss raised to q, for a fairer model across sites",
    params=QFedAvgParams,
    build=build,
    privacy={"none": None, "sample": None, "client": NEEDS_WEIGHTED_MEAN},
    secure_aggregation="Flower's QFedAvg computes each site's loss-weighted update on the server",
    reference="Li et al., ICLR 2020",
)
