"""Live progress: the round loop's events, counted sites within a round, plain lines without a terminal."""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

import pytest
from flwr.app import Message

from medflower import progress
from medflower.config import ExperimentConfig
from medflower.simulation.clientapp import app as simulation_app
from medflower.simulation.inprocess import InProcessGrid, simulate_inprocess
from medflower.simulation.progress import RunProgress


def tiny(rounds: int = 2) -> ExperimentConfig:
    return ExperimentConfig.from_dict(
        {
            "name": "progress-synthetic",
            "data": {"kind": "synthetic", "synthetic_samples": 120},
            "partition": {"num_sites": 3, "alpha": 5.0},
            "model": {"name": "cnn", "params": {"width": 8}},
            "train": {"rounds": rounds},
        }
    )


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def round_started(self, server_round: int, num_rounds: int) -> None:
        self.events.append(("start", server_round, num_rounds))

    def sites_done(self, server_round: int, stage: str, done: int, total: int) -> None:
        self.events.append(("sites", server_round, stage, done, total))

    def round_ended(self, server_round: int, num_rounds: int, record: Any) -> None:
        self.events.append(("end", server_round, len(record.sites_train)))


class PollingGrid(InProcessGrid):
    """An in-process grid answering through push/pull, one reply per pull (as a slow federation would)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(simulation_app, **kw)
        self.pending: dict[str, Message] = {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for reply in super().send_and_receive(list(messages)):
            ids.append(reply.metadata.reply_to_message_id)
            self.pending[reply.metadata.reply_to_message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = [i for i in message_ids if i in self.pending]
        return [self.pending.pop(wanted[0])] if wanted else []


@pytest.mark.parametrize("grid_kind", ["in-process", "push-pull"])
def test_observer_counts_sites_within_each_round(tmp_path: Any, grid_kind: str, monkeypatch: Any) -> None:
    monkeypatch.setattr(progress, "PULL_INTERVAL", 0.0)
    exp = tiny()
    grid = InProcessGrid(simulation_app, num_sites=3) if grid_kind == "in-process" else PollingGrid(num_sites=3)
    with progress.observe(Recorder()) as rec:
        simulate_inprocess(exp, tmp_path, grid=grid)
    assert progress.observers() == []  # unregistered on exit
    ev = rec.events
    assert [e for e in ev if e[0] == "start"] == [("start", 1, 2), ("start", 2, 2)]
    assert [e for e in ev if e[0] == "end"] == [("end", 1, 3), ("end", 2, 3)]
    train_r1 = [e[3:] for e in ev if e[:3] == ("sites", 1, "train")]
    assert train_r1 == [(0, 3), (1, 3), (2, 3), (3, 3)]  # one site at a time, as they answer
    assert [e[3:] for e in ev if e[:3] == ("sites", 2, "evaluate")][-1] == (3, 3)
    # order: a round's site events fall between its start and its end
    assert ev.index(("start", 2, 2)) < ev.index(("sites", 2, "train", 3, 3)) < ev.index(("end", 2, 3))


def test_without_a_terminal_one_plain_line_per_round(tmp_path: Any) -> None:
    out = io.StringIO()
    with RunProgress(label="progress-synthetic", num_rounds=2, stream=out):
        simulate_inprocess(tiny(), tmp_path)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("progress-synthetic: round 1/2 | 3/3 sites | accuracy ")
    assert "elapsed" in lines[0] and "ETA" in lines[0]
    assert lines[1].endswith("ETA 0:00")
    assert not any(c in out.getvalue() for c in "\x1b\r\b")


def test_live_display_shows_rounds_and_sites(tmp_path: Any) -> None:
    """Forced live (as on a terminal): rich's display, then nothing left registered."""
    out = io.StringIO()
    bar = RunProgress(label="live", num_rounds=2, stream=out, live=True)
    with bar:
        simulate_inprocess(tiny(), tmp_path)
        task = bar._rich.tasks[0]
        assert (task.completed, task.total) == (2, 2)
        assert task.fields["sites"] == "evaluate 3/3 sites" and task.description == "live: round 2/2"
    assert progress.observers() == []
