"""The experiment's ``participation:`` policy at run time: who must be connected before a round.

Flower's strategies wait, before *every* round, until ``min_available_nodes`` SuperNodes are
connected, forever. With that set to the federation's size (so that the first round starts only
when every hospital is online), one hospital dropping out stalls the run for good. This module
waits for the whole federation once, at the start, for at most ``participation.startup_timeout``
seconds, and then lowers the strategy's requirement to ``participation.min_sites`` so that later
rounds go ahead with whoever is connected (stragglers are cut off by ``round_timeout`` in
:func:`medflower.server.loop.run_rounds`, and the absence is recorded in the round's ``failures``).
"""

from __future__ import annotations

import time
from logging import INFO, WARNING

from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from medflower.config import ParticipationConfig
from medflower.strategies.state import unwrap


def wait_for_sites(grid: Grid, *, expected: int, policy: ParticipationConfig, poll_s: float = 1.0) -> int:
    """Wait until ``expected`` sites are connected or ``startup_timeout`` passes; returns how many are."""
    deadline = time.monotonic() + policy.startup_timeout
    last = -1
    while True:
        n = len(list(grid.get_node_ids()))
        if n >= expected:
            return n
        if time.monotonic() >= deadline:
            log(
                WARNING,
                "participation: %d of %d sites connected after startup_timeout=%.0fs; going ahead "
                "with at least min_sites=%s",
                n,
                expected,
                policy.startup_timeout,
                policy.min_sites or 1,
            )
            return n
        if n != last:
            log(INFO, "participation: waiting for sites: %d of %d connected", n, expected)
            last = n
        time.sleep(poll_s)


def relax_availability(strategy: Strategy, policy: ParticipationConfig) -> None:
    """After the start, a round needs only ``min_sites`` connected sites (not all of them)."""
    for s in unwrap(strategy):  # Flower's DP wrappers hold the strategy that samples the sites
        if "min_available_nodes" in vars(s):
            s.min_available_nodes = max(1, policy.min_sites or 1)  # type: ignore[attr-defined]
