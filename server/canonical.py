"""A canonical order for the round: replies sorted by site, sampling seeded per round.

Floating-point sums depend on their order, so a FedAvg mean over replies in *arrival* order (what a
Grid returns) differs in its last bits from run to run, and after a few rounds of training those
bits are visible in the metrics. Flower's strategies also sample sites with Python's global
``random`` over ``grid.get_node_ids()``, whose order (and, on the simulation engine, whose ids) vary
per run. Flower offers no canonical order, so the round pipeline (:mod:`medflower.server.loop`)
uses this module to:

* sort every batch of replies by site name, then node id, before screening and aggregation;
* offer the strategies the node ids sorted by site name (names learnt from replies, or the site
  directory's), then node id;
* seed Python's ``random`` from the experiment seed and the round before each sampling.

A site that has never replied has no name yet: on Flower's simulation engine (random node ids) the
first round's *sample* therefore follows node ids when ``strategy.fraction_train`` < 1; with every
site sampled (the default) the order of the sample does not matter.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from medflower.seeding import derive_seed


def site_key(node_id: int, names: dict[int, str]) -> tuple[int, str, int]:
    """Sort key: named sites by name, then unnamed ones, each tie broken by node id."""
    name = names.get(node_id)
    return (0, name, node_id) if name is not None else (1, "", node_id)


def canonical(replies: Iterable[Message], names: dict[int, str]) -> list[Message]:
    """``replies`` sorted by their site (see :func:`site_key`), whatever order they arrived in."""
    return sorted(replies, key=lambda m: site_key(int(m.metadata.src_node_id), names))


def seed_sampling(seed: int | None, server_round: int, what: str) -> None:
    """Seed Python's ``random`` (Flower's ``sample_nodes``) for this round's ``what`` sample."""
    if seed is not None:
        random.seed(derive_seed(seed, "sample", what, server_round))


class CanonicalGrid(Grid):
    """``grid`` with its node ids in canonical order; everything else is passed through."""

    def __init__(self, grid: Grid, names: dict[int, str]) -> None:
        self.inner = grid
        self.names = names  # shared with the pipeline: learnt names count at once

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return sorted((int(n) for n in self.inner.get_node_ids()), key=lambda n: site_key(n, self.names))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        push = getattr(self.inner, "push_messages", None)
        if push is None:  # a stand-in grid (a test's) that only answers synchronously
            raise NotImplementedError("the wrapped grid has no push_messages")
        return push(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.inner.send_and_receive(messages, timeout=timeout)
