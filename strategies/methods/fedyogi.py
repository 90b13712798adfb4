"""FedYogi (Reddi et al., ICLR 2021): Yogi on the server (Adam with a sign-controlled second moment).

Server half: Flower's ``FedYogi``, with FedAdam's parameters and defaults.
"""

from __future__ import annotations

from flwr.serverapp import strategy as fl

from medflower.strategies.methods.fedadam import FedOptParams, fedopt_builder
from medflower.strategies.registry import MEAN_ONLY, Method

METHOD = Method(
    name="fedyogi",
    summary="Yogi on the server: Adam whose second moment grows more cautiously",
    params=FedOptParams,
    build=fedopt_builder(fl.FedYogi),
    **MEAN_ONLY,
    reference="Reddi et al., ICLR 2021",
)
