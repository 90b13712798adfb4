"""FedMedian (Yin et al., ICML 2018): the coordinate-wise median of the sites' models.

Server half: Flower's ``FedMedian``. Robust to a minority of bad updates; weights are ignored.
"""

from __future__ import annotations

from flwr.serverapp import strategy as fl

from medflower.strategies.registry import ROBUST, Method, NoParams

METHOD = Method(
    name="fedmedian",
    summary="coordinate-wise median of the sites' models (robust)",
    params=NoParams,
    build=lambda ctx: fl.FedMedian(**ctx.flower),
    **ROBUST,
    reference="Yin et al., ICML 2018",
)
