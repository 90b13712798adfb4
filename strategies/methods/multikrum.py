"""MultiKrum (Blanchard et al., NeurIPS 2017): the mean of the m updates with the best Krum scores.

Server half: Flower's ``MultiKrum``.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.serverapp import strategy as fl

from medflower.schema import ConfigError, rng_field
from medflower.strategies.methods.krum import check_byzantine
from medflower.strategies.registry import ROBUST, Method, ServerContext


@dataclass(frozen=True)
class MultiKrumParams:
    num_malicious_nodes: int = rng_field(1, min=0)
    num_nodes_to_select: int = rng_field(2, min=1)


def build(ctx: ServerContext) -> fl.MultiKrum:
    p: MultiKrumParams = ctx.params
    check_byzantine("multikrum", p.num_malicious_nodes, ctx.num_sites)
    if p.num_nodes_to_select > ctx.num_sites:
        raise ConfigError(
            f"strategy.params.num_nodes_to_select: {p.num_nodes_to_select} exceeds the {ctx.num_sites} sites"
        )
    return fl.MultiKrum(
        **ctx.flower, num_malicious_nodes=p.num_malicious_nodes, num_nodes_to_select=p.num_nodes_to_select
    )


METHOD = Method(
    name="multikrum",
    summary="mean of the updates with the best Krum scores (Byzantine-robust)",
    params=MultiKrumParams,
    build=build,
    **ROBUST,
    reference="Blanchard et al., NeurIPS 2017",
)
