"""FedAvg (McMahan et al., AISTATS 2017): the example-weighted mean of the sites' models.

Server half: Flower's ``FedAvg`` as it is. The site only trains.
"""

from __future__ import annotations

from flwr.serverapp import strategy as fl

from medflower.strategies.registry import Method, NoParams

METHOD = Method(
    name="fedavg",
    summary="weighted mean of the sites' models (weights: training examples)",
    params=NoParams,
    build=lambda ctx: fl.FedAvg(**ctx.flower),
    privacy={"none": None, "sample": None, "client": None},
    secure_aggregation=None,
    reference="McMahan et al., AISTATS 2017",
)
