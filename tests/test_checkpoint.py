"""Checkpoints and the participation policy, with the real ClientApp called in-process.

``InlineGrid`` delivers each Message by calling the simulation's ClientApp
(``medflower.simulation.clientapp``) directly (no Flower runtime), so a "coordinator crash" is an
exception at a chosen round and a "dropped site" a node that never answers. The deployed version of
the same scenarios is in tests/test_deploy_netns.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from medflower import keys
from medflower.config import ConfigError, ParticipationConfig, quickstart_experiment
from medflower.server import checkpoint as ck
from medflower.server.app import run_server
from medflower.server.loop import History, RoundAborted, RoundRecord
from medflower.server.participation import relax_availability, wait_for_sites
from medflower.simulation.clientapp import app as simulation_app


class Crash(RuntimeError):
    """Stands in for the ServerApp process dying."""


class InlineGrid:
    """Delivers messages to in-process ClientApps; ``silent`` nodes never reply (link cut)."""

    def __init__(self, exp, *, crash_at_round: int | None = None, silent_from: dict[int, int] | None = None):
        n = exp.partition.num_sites
        self.contexts = {
            101 + i: Context(
                run_id=1,
                node_id=101 + i,
                state=RecordDict(),
                run_config={},
                node_config={keys.NODE_PARTITION_ID: i, keys.NODE_NUM_PARTITIONS: n},
            )
            for i in range(n)
        }
        self.crash_at_round = crash_at_round
        self.silent_from = silent_from or {}  # node id -> first round it stays silent
        self.sent: list[tuple[int, str, int]] = []  # (round, type, node)

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid4().hex
            rnd = int(msg.content[keys.CONFIG].get(keys.SERVER_ROUND, 0))
            if self.crash_at_round is not None and rnd >= self.crash_at_round:
                raise Crash(f"coordinator crashed in round {rnd}")
            nid = msg.metadata.dst_node_id
            self.sent.append((rnd, msg.metadata.message_type, nid))
            if nid in self.silent_from and rnd >= self.silent_from[nid]:
                continue
            replies.append(simulation_app(msg, self.contexts[nid]))
        return replies


def _exp(rounds: int = 3, **participation):
    exp = quickstart_experiment()
    return replace(
        exp,
        name="ckpt-test",
        data=replace(exp.data, synthetic_samples=150),
        train=replace(exp.train, rounds=rounds),
        strategy=replace(exp.strategy, fraction_evaluate=0.0),
        participation=replace(exp.participation, startup_timeout=0.0, **participation),
    )


def test_crashed_run_resumes_without_repeating_or_losing_a_round(tmp_path: Path, flower_identity) -> None:
    exp = _exp(rounds=3)
    out, ckdir = tmp_path / "out", tmp_path / "ckpt"
    with pytest.raises(Crash):
        run_server(InlineGrid(exp, crash_at_round=3), exp, out, checkpoint_dir=ckdir)
    saved = ck.load_checkpoint(ckdir, exp)
    assert saved is not None and saved.round == 2
    assert [r.round for r in saved.history.rounds] == [1, 2]
    assert not (out / "summary.json").exists()

    grid = InlineGrid(exp)
    run_server(grid, exp, out, checkpoint_dir=ckdir)
    assert {r for r, t, _ in grid.sent if t == "train"} == {3}  # only the missing round ran
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    for old, new in zip(saved.history.rounds, summary["rounds"][:2], strict=True):
        assert new["seconds"] == old.seconds and new["train"] == pytest.approx(old.train)
    digest = json.loads((ckdir / ck.DIGEST_FILE).read_text())
    assert [s["start_round"] for s in digest["starts"]] == [1, 3]
    assert digest["round"] == 3 and digest["strategy_state_saved"] is not None


def test_resumed_model_is_the_checkpointed_one(tmp_path: Path, flower_identity) -> None:
    exp = _exp(rounds=2)
    with pytest.raises(Crash):
        run_server(InlineGrid(exp, crash_at_round=2), exp, tmp_path / "out", checkpoint_dir=tmp_path / "c")
    saved = ck.load_checkpoint(tmp_path / "c", exp)
    start, arrays, hist, _ = ck.resume_or_start(tmp_path / "c", exp, _strategy(exp), ArrayRecord())
    assert start == 2 and [r.round for r in hist.rounds] == [1]
    for k, a in saved.arrays.items():
        np.testing.assert_array_equal(arrays[k].numpy(), a.numpy())


def test_a_resumed_run_continues_the_released_average(tmp_path: Path, flower_identity) -> None:
    exp = _exp(rounds=3)
    exp = replace(exp, strategy=replace(exp.strategy, ema_decay=0.5))
    run_server(InlineGrid(exp), exp, tmp_path / "whole", checkpoint_dir=tmp_path / "c1")
    with pytest.raises(Crash):
        run_server(InlineGrid(exp, crash_at_round=3), exp, tmp_path / "cut", checkpoint_dir=tmp_path / "c2")
    run_server(InlineGrid(exp), exp, tmp_path / "cut", checkpoint_dir=tmp_path / "c2")
    whole = torch.load(tmp_path / "whole" / "model.pt")
    cut = torch.load(tmp_path / "cut" / "model.pt")
    global_ = ck.load_checkpoint(tmp_path / "c1", exp).arrays  # what the sites train from
    for k, v in whole.items():
        torch.testing.assert_close(cut[k], v, rtol=0, atol=0)
    assert any(not np.array_equal(whole[k].numpy(), global_[k].numpy()) for k in whole if whole[k].is_floating_point())


def _strategy(exp):
    from medflower.server.build import build_round

    return build_round(exp, num_sites=exp.partition.num_sites)


def test_checkpoint_of_another_experiment_is_refused(tmp_path: Path) -> None:
    exp = _exp()
    ck.save_checkpoint(
        tmp_path, exp, ck.Checkpoint(round=1, arrays=ArrayRecord({"w": torch.ones(2)}), history=History())
    )
    other = replace(exp, train=replace(exp.train, lr=0.5))
    with pytest.raises(ConfigError, match="other settings"):
        ck.load_checkpoint(tmp_path, other)
    assert ck.load_checkpoint(tmp_path, exp).round == 1
    # the YAML's location is not part of the experiment's identity
    assert ck.load_checkpoint(tmp_path, replace(exp, base_dir="/elsewhere")).round == 1


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    exp = _exp()
    hist = History(rounds=[RoundRecord(round=1, train={"train-loss": 0.5})])
    ck.save_checkpoint(tmp_path, exp, ck.Checkpoint(round=1, arrays=ArrayRecord({"w": torch.zeros(3)}), history=hist))

    def dying_replace(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(OSError, match="power cut"):
        ck.save_checkpoint(
            tmp_path, exp, ck.Checkpoint(round=2, arrays=ArrayRecord({"w": torch.ones(3)}), history=hist)
        )
    monkeypatch.undo()
    loaded = ck.load_checkpoint(tmp_path, exp)
    assert loaded.round == 1 and np.all(loaded.arrays["w"].numpy() == 0)
    assert sorted(os.listdir(tmp_path)) == sorted([ck.CHECKPOINT_FILE, ck.DIGEST_FILE])  # no temp files left


def test_strategy_state_round_trips_through_the_checkpoint(tmp_path: Path) -> None:
    exp = _exp()
    state = {
        "format": 1,
        "m": np.arange(6, dtype=np.float32).reshape(2, 3),
        "t": (1, 2.5, "x"),
        "rec": MetricRecord({"a": 1.0}),
        "cfg": ConfigRecord({"b": "c"}),
        "nested": {"k": [np.ones(2), None]},
    }
    ck.save_checkpoint(
        tmp_path,
        exp,
        ck.Checkpoint(round=4, arrays=ArrayRecord({"w": torch.ones(1)}), history=History(), strategy_state=state),
    )
    got = ck.load_checkpoint(tmp_path, exp).strategy_state
    np.testing.assert_array_equal(got["m"], state["m"])
    assert got["m"].dtype == np.float32 and got["t"] == (1, 2.5, "x")
    assert dict(got["rec"]) == {"a": 1.0} and dict(got["cfg"]) == {"b": "c"}
    np.testing.assert_array_equal(got["nested"]["k"][0], np.ones(2))
    with pytest.raises(TypeError, match="strategy_state.bad"):
        ck.save_checkpoint(
            tmp_path,
            exp,
            ck.Checkpoint(
                round=5, arrays=ArrayRecord({"w": torch.ones(1)}), history=History(), strategy_state={"bad": object()}
            ),
        )


def test_a_silent_site_is_skipped_and_named_in_the_summary(tmp_path: Path, flower_identity) -> None:
    exp = _exp(rounds=2, min_sites=2, round_timeout=5.0)
    grid = InlineGrid(exp, silent_from={103: 2})
    run_server(grid, exp, tmp_path, checkpoint_dir=None)
    summary = json.loads((tmp_path / "summary.json").read_text())
    r1, r2 = summary["rounds"]
    assert sorted(r1["sites_train"]) == ["site-0", "site-1", "site-2"] and r1["failures"] == []
    assert sorted(r2["sites_train"]) == ["site-0", "site-1"] and r2["aggregated"]
    assert [(f["site"], f["node_id"]) for f in r2["failures"]] == [("site-2", 103)]
    assert "round_timeout" in r2["failures"][0]["reason"]


def test_too_few_sites_with_stop_ends_the_run_but_reports_it(tmp_path: Path, flower_identity) -> None:
    exp = _exp(rounds=3, min_sites=3, on_too_few="stop")
    with pytest.raises(RoundAborted, match="min_sites=3"):
        run_server(InlineGrid(exp, silent_from={102: 2}), exp, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["rounds"][1]["aggregated"] is False


class _CountingGrid:
    def __init__(self, counts):
        self.counts = list(counts)

    def get_node_ids(self):
        n = self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]
        return list(range(n))


def test_wait_for_sites_waits_for_everyone_then_gives_up_after_startup_timeout() -> None:
    policy = ParticipationConfig(startup_timeout=30.0)
    assert wait_for_sites(_CountingGrid([1, 2, 3]), expected=3, policy=policy, poll_s=0.0) == 3
    assert wait_for_sites(_CountingGrid([2]), expected=3, policy=ParticipationConfig(startup_timeout=0.0)) == 2


def test_relax_availability_reaches_a_wrapped_strategy() -> None:
    from flwr.serverapp.strategy import FedAvg

    inner = FedAvg(min_available_nodes=3)

    class Wrapper:
        def __init__(self, strategy):
            self.strategy = strategy

    relax_availability(Wrapper(inner), ParticipationConfig(min_sites=2))
    assert inner.min_available_nodes == 2
    relax_availability(inner, ParticipationConfig())
    assert inner.min_available_nodes == 1


def test_participation_keys_are_validated() -> None:
    from medflower.config import ExperimentConfig

    with pytest.raises(ConfigError, match="participation.startup_timeout"):
        ExperimentConfig.from_dict({"participation": {"startup_timeout": -1}})
    with pytest.raises(ConfigError, match="on_too_few"):
        ExperimentConfig.from_dict({"participation": {"on_too_few": "wait"}})
