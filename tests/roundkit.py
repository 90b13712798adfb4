"""Test helpers: run one round's stages on hand-made replies, without sites or Ray."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.serverapp.strategy import Strategy

from medflower.server.build import RoundParts, build_round
from medflower.server.loop import aggregate_train
from medflower.server.screens import RoundView, Screened, UpdateShape, run_screens, spec_of
from medflower.strategies.registry import METHODS
from medflower.strategies.testing import StubGrid, arrays_of, numpy_of


def parts_of(strategy: Strategy, method: str, **kw: Any) -> RoundParts:
    """Round parts around a hand-built strategy (e.g. ``Scaffold(...)`` with chosen keys)."""
    return RoundParts(method=METHODS[method], strategy=strategy, base=strategy, screens=[UpdateShape()], **kw)


def parts_for(exp: Any, num_sites: int) -> RoundParts:
    return build_round(exp, num_sites=num_sites)


def configure(parts: RoundParts, g: dict[str, np.ndarray], rnd: int = 1, nodes: int | None = None) -> list[Message]:
    n = nodes or getattr(parts.base, "min_available_nodes", 1)
    return list(parts.strategy.configure_train(rnd, arrays_of(g), ConfigRecord(), StubGrid(n)))


def screen(parts: RoundParts, g: dict[str, np.ndarray], replies: list[Message], rnd: int = 1) -> Screened:
    spec = spec_of(arrays_of(g))
    view = RoundView(rnd, arrays_of(g), parts.method.reply_arrays(spec, parts.base))
    names = {int(m.metadata.src_node_id): m.content["site"]["site-name"] for m in replies}
    return run_screens(parts.screens, replies, view, site_of=names, what="update")


def run_round(parts: RoundParts, g: dict[str, np.ndarray], replies: list[Message], rnd: int = 1):
    """configure (strategies remember the global model there), screen, then the guarded aggregation."""
    configure(parts, g, rnd, nodes=max(len(replies), getattr(parts.base, "min_available_nodes", 1)))
    screened = screen(parts, g, replies, rnd)
    result = aggregate_train(parts, rnd, screened.valid, spec_of(arrays_of(g)))
    return (None if result.arrays is None else numpy_of(result.arrays)), result.metrics
