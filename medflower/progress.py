"""Round events for whoever watches a run: a progress display, experiment tracking.

The round loop (:mod:`medflower.server.loop`) calls :func:`round_started`, :func:`sites_done` and
:func:`round_ended`; observers registered with :func:`observe` receive them. A registry and not a
parameter, because ``medflower simulate`` runs the ServerApp inside Flower's ``run_simulation``, which
takes a ServerApp object and no callbacks: the display and the trackers live in the same process
and register around the call. Without an observer the loop behaves exactly as before (in
particular :func:`send_and_receive` is the grid's own call).

It sits in the shared package so that both the server's loop and the simulation's display import
it without importing each other.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from flwr.app import Message
from flwr.serverapp import Grid

# seconds between polls for replies. Flower's own ``HttpGrid.send_and_receive`` (the grid of a
# deployed ServerApp, flwr/superlink/grid/http_grid.py) sleeps a fixed 3 s between pulls, which cost
# a deployed round 1.5 s on average per stage (train, evaluate) for nothing; its in-memory grid
# (simulation) already polls every 0.1 s. A pull is one small local request to the SuperLink.
PULL_INTERVAL = 0.1


class RoundObserver(Protocol):
    """What an observer implements; every method may be a no-op."""

    def round_started(self, server_round: int, num_rounds: int) -> None: ...

    def sites_done(self, server_round: int, stage: str, done: int, total: int) -> None:
        """``done`` of the ``total`` sites asked in ``stage`` ("train", "evaluate") have answered."""
        ...

    def round_ended(self, server_round: int, num_rounds: int, record: Any) -> None: ...


_lock = threading.Lock()
_observers: list[RoundObserver] = []


@contextmanager
def observe(observer: RoundObserver) -> Iterator[RoundObserver]:
    """Register ``observer`` for the duration of the ``with`` block."""
    with _lock:
        _observers.append(observer)
    try:
        yield observer
    finally:
        with _lock:
            _observers.remove(observer)


def observers() -> list[RoundObserver]:
    with _lock:
        return list(_observers)


def round_started(server_round: int, num_rounds: int) -> None:
    for obs in observers():
        obs.round_started(server_round, num_rounds)


def sites_done(server_round: int, stage: str, done: int, total: int) -> None:
    for obs in observers():
        obs.sites_done(server_round, stage, done, total)


def round_ended(server_round: int, num_rounds: int, record: Any) -> None:
    for obs in observers():
        obs.round_ended(server_round, num_rounds, record)


def send_and_receive(
    grid: Grid, messages: list[Message], *, timeout: float, server_round: int, stage: str
) -> list[Message]:
    """``grid.send_and_receive``, announcing each reply as it arrives when someone is watching.

    This pushes the messages and pulls the replies itself, exactly as Flower's grids do, with the
    same timeout, for two reasons: a display can count sites within a round (Flower's
    ``send_and_receive`` returns only when every reply is in), and replies are pulled every
    :data:`PULL_INTERVAL` instead of the deployed grid's fixed 3 s. A grid that answers only
    synchronously (``push_messages`` raises ``NotImplementedError``, as the in-process grid does)
    gets them all at once, or one at a time while someone is watching; a stand-in grid without
    ``push_messages`` (a test's) gets its own ``send_and_receive``.
    """
    if not messages:
        return []
    if not hasattr(grid, "push_messages"):
        return list(grid.send_and_receive(messages, timeout=timeout))
    total = len(messages)
    sites_done(server_round, stage, 0, total)
    try:
        ids = set(grid.push_messages(messages))
    except NotImplementedError:
        if not observers():  # all at once: an engine may run them in parallel
            return list(grid.send_and_receive(messages, timeout=timeout))
        out: list[Message] = []
        for msg in messages:
            out += grid.send_and_receive([msg], timeout=timeout)
            sites_done(server_round, stage, len(out), total)
        return out
    end = time.time() + timeout
    got: list[Message] = []
    while ids:
        replies = list(grid.pull_messages(ids))
        if replies:
            got += replies
            ids.difference_update(m.metadata.reply_to_message_id for m in replies)
            sites_done(server_round, stage, len(got), total)
        if not ids or time.time() >= end:
            break
        time.sleep(PULL_INTERVAL)
    return got
