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
from collections.abc import Callable
from logging import INFO, WARNING

from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from medflower.config import ParticipationConfig
from medflower.strategies.state import unwrap


def waiting_line(expected: int, connected: list[int], names: dict[int, str]) -> str:
    """``waiting for N hospitals (k connected: names)``, with where N comes from."""
    who = ", ".join(sorted(names.get(n, f"node-{n}") for n in connected)) or "none"
    return (
        f"waiting for {expected} hospitals ({len(connected)} connected: {who}); "
        "N is the experiment's partition.num_sites"
    )


def wait_for_sites(
    grid: Grid,
    *,
    expected: int,
    policy: ParticipationConfig,
    poll_s: float = 1.0,
    names: Callable[[], dict[int, str]] | None = None,
    report_every_s: float = 5.0,
) -> int:
    """Wait until ``expected`` sites are connected or ``startup_timeout`` passes; returns how many are.

    ``expected`` is ``partition.num_sites``. Every ``report_every_s`` seconds (and whenever the count
    changes) it logs who is connected, by registered name where ``names`` (node id -> name, e.g.
    the site directory) knows them: an administrator waiting for a run to start sees whom it waits for.
    """
    deadline = time.monotonic() + policy.startup_timeout
    last, last_report = -1, -float("inf")
    while True:
        connected = sorted(int(n) for n in grid.get_node_ids())
        n = len(connected)
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
        now = time.monotonic()
        if n != last or now - last_report >= report_every_s:
            log(INFO, "participation: %s", waiting_line(expected, connected, names() if names else {}))
            last, last_report = n, now
        time.sleep(poll_s)


def relax_availability(strategy: Strategy, policy: ParticipationConfig) -> None:
    """After the start, a round needs only ``min_sites`` connected sites (not all of them)."""
    for s in unwrap(strategy):  # Flower's DP wrappers hold the strategy that samples the sites
        if "min_available_nodes" in vars(s):
            s.min_available_nodes = max(1, policy.min_sites or 1)  # type: ignore[attr-defined]
