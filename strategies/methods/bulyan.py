"""Bulyan (El Mhamdi et al., ICML 2018): MultiKrum selection, then a trimmed mean per coordinate.

Server half: Flower's ``Bulyan``, which needs at least 4f+3 sites: checked when it is built.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.serverapp import strategy as fl

from medflower.schema import ConfigError, rng_field
from medflower.strategies.methods.krum import check_byzantine
from medflower.strategies.registry import ROBUST, Method, ServerContext


@dataclass(frozen=True)
class BulyanParams:
    num_malicious_nodes: int = rng_field(1, min=0)


def build(ctx: ServerContext) -> fl.Bulyan:
    f = ctx.params.num_malicious_nodes
    if ctx.num_sites < 4 * f + 3:
        raise ConfigError(
            f"strategy.params.num_malicious_nodes: Bulyan needs at least 4*f+3 = {4 * f + 3} "
            f"sites for f={f}; the federation has {ctx.num_sites}"
        )
    check_byzantine("bulyan", f, ctx.num_sites)
    return fl.Bulyan(**ctx.flower, num_malicious_nodes=f)


METHOD = Method(
    name="bulyan",
    summary="Krum selection then a trimmed mean (Byzantine-robust, needs 4f+3 sites)",
    params=BulyanParams,
    build=build,
    **ROBUST,
    reference="El Mhamdi et al., ICML 2018",
)
