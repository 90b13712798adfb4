"""FedMedian (Yin et al., ICML 2018): the coordinate-wise median of the sites' models.

Server half: Flower's ``FedMedian``. Robust to a minority of bad updates; weights are ignored.
"""

from __future__ import annotations

from flwr.serverapp import strategy as fl

from medflower.strategies.registry import NEEDS_WEIGHTED_MEAN, SEES_EACH_UPDATE, Method, NoParams

METHOD = Method(
    name="fedmedian",
    summary="coordinate-wise median of the sites' models (robust)",
    params=NoParams,
    build=lambda ctx: fl.FedMedian(**ctx.flower),
    privacy={"none": None, "sample": None, "client": NEEDS_WEIGHTED_MEAN},
    secure_aggregation=SEES_EACH_UPDATE,
    reference="Yin et al., ICML 2018",
)
