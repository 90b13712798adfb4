"""Sites are named by the node that sent a reply (its registered name), never by what a reply claims."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from medflower import keys
from medflower.config import quickstart_experiment
from medflower.server.build import build_round
from medflower.server.identity import read_directory
from medflower.server.loop import run_rounds
from medflower.simulation.inprocess import InProcessGrid
from medflower.strategies.testing import arrays_of


def _app(claims: dict[int, str], crash: int | None = None) -> ClientApp:
    """Sites that 'train' instantly (+1) and name themselves as ``claims[partition id]``; ``crash`` fails."""
    app = ClientApp()

    def reply(msg: Message, context: Context, arrays: bool) -> Message:
        pid = int(context.node_config[keys.NODE_PARTITION_ID])
        if pid == crash:
            raise RuntimeError("synthetic crash")
        content = RecordDict(
            {
                keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 10, keys.TRAIN_LOSS: 0.1}),
                keys.SITE: ConfigRecord({keys.SITE_NAME: claims[pid]}),
            }
        )
        if arrays:
            content[keys.ARRAYS] = arrays_of({"w": msg.content[keys.ARRAYS]["w"].numpy() + 1.0})
        return Message(content=content, reply_to=msg)

    app.train()(lambda msg, ctx: reply(msg, ctx, True))
    app.evaluate()(lambda msg, ctx: reply(msg, ctx, False))
    return app


def _directory(tmp_path: Path, sites: dict[int, dict]) -> Path:
    path = tmp_path / "sites.json"
    path.write_text(json.dumps({"format": 1, "sites": {str(k): v for k, v in sites.items()}}))
    return path


def _run(tmp_path: Path, claims: dict[int, str], directory: dict[int, dict], crash: int | None = None):
    grid = InProcessGrid(_app(claims, crash), num_sites=3)  # node ids 1001, 1002, 1003
    parts = build_round(quickstart_experiment(), num_sites=3, site_directory=_directory(tmp_path, directory))
    return run_rounds(
        grid,
        parts,
        initial_arrays=arrays_of({"w": np.zeros(2, np.float32)}),
        num_rounds=1,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        timeout=10,
        min_sites=1,
    )


def test_a_site_posing_as_another_is_rejected_and_rows_use_registered_names(tmp_path, flower_identity):
    registered = {1001: {"name": "hospital-a"}, 1002: {"name": "hospital-b"}, 1003: {"name": "hospital-c"}}
    hist = _run(tmp_path, {0: "hospital-a", 1: "hospital-a", 2: "hospital-c"}, registered)
    rec = hist.rounds[0]
    assert set(rec.sites_train) == {"hospital-a", "hospital-c"}
    assert [f["site"] for f in rec.failures] == ["hospital-b"]
    assert (
        "node 1002 is registered as 'hospital-b' but its reply claims to be 'hospital-a'" in rec.failures[0]["reason"]
    )
    assert set(rec.sites_evaluate) == {"hospital-a", "hospital-c"}
    assert [f["site"] for f in rec.evaluate_failures] == ["hospital-b"]
    np.testing.assert_allclose(hist.arrays["w"].numpy(), [1.0, 1.0])


def test_an_unregistered_node_is_refused(tmp_path, flower_identity):
    hist = _run(tmp_path, {0: "a", 1: "b", 2: "c"}, {1001: {"name": "a"}, 1002: {"name": "b"}})
    assert "node 1003 is not registered" in hist.rounds[0].failures[0]["reason"]
    assert set(hist.rounds[0].sites_train) == {"a", "b"}


def test_a_site_that_never_replied_is_named_by_its_registered_name(tmp_path, flower_identity):
    """summary.json's failures name the hospital, not node-<id>, even when it never sent a valid reply."""
    registered = {1001: {"name": "hospital-a"}, 1002: {"name": "hospital-b"}, 1003: {"name": "hospital-c"}}
    hist = _run(tmp_path, {0: "hospital-a", 1: "hospital-b", 2: "hospital-c"}, registered, crash=1)
    assert [f["site"] for f in hist.rounds[0].failures] == ["hospital-b"]
    assert [f["site"] for f in hist.rounds[0].evaluate_failures] == ["hospital-b"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{", "not valid JSON"),
        ('{"format": 1, "sites": []}', "expected {'format': 1"),
        ('{"format": 1, "sites": {"x": {"name": "a"}}}', "sites.x: expected a numeric node id"),
        ('{"format": 1, "sites": {"1": {"name": "a", "declared_examples": 0}}}', "sites.1.declared_examples"),
        ('{"format": 1, "sites": {"1": {"name": "a"}, "2": {"name": "a"}}}', "site name(s) a registered for more"),
    ],
)
def test_a_malformed_directory_names_the_file_and_entry(tmp_path, content, message):
    path = tmp_path / "sites.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + re.escape(message)):
        read_directory(path)
