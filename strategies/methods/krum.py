"""Krum (Blanchard et al., NeurIPS 2017): the one update closest to its n-f-2 nearest neighbours.

Server half: Flower's ``Krum``. The site-count checks are shared with MultiKrum and Bulyan.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import WARNING

from flwr.common.logger import log
from flwr.serverapp import strategy as fl

from medflower.schema import ConfigError, rng_field
from medflower.strategies.registry import ROBUST, Method, ServerContext


@dataclass(frozen=True)
class KrumParams:
    num_malicious_nodes: int = rng_field(1, min=0)


def check_byzantine(name: str, f: int, num_sites: int) -> None:
    """f must leave honest sites to choose from; Krum's guarantee needs n >= 2f+3 (a warning)."""
    if f >= num_sites:
        raise ConfigError(f"strategy.params.num_malicious_nodes: {f} must be below the number of sites ({num_sites})")
    if num_sites < 2 * f + 3:
        log(WARNING, "strategy %s: Krum's guarantee needs n >= 2f+3 sites (n=%d, f=%d)", name, num_sites, f)


def build(ctx: ServerContext) -> fl.Krum:
    p: KrumParams = ctx.params
    check_byzantine("krum", p.num_malicious_nodes, ctx.num_sites)
    return fl.Krum(**ctx.flower, num_malicious_nodes=p.num_malicious_nodes)


METHOD = Method(
    name="krum",
    summary="the single update closest to its neighbours (Byzantine-robust)",
    params=KrumParams,
    build=build,
    **ROBUST,
    reference="Blanchard et al., NeurIPS 2017",
)
