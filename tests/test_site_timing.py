"""client/app.py's opt-in site timing (bench/deploy_rounds.py): ``compute-seconds`` in every reply's
metrics with ``MEDFLOWER_SITE_TIMING=1``, and nothing added (no mod at all) without it."""

from __future__ import annotations

import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict

from medflower import keys
from medflower.client.app import timing_mod


def _reply(msg: Message, context: Context) -> Message:
    # the reply's shape is what matters here (reply_to needs Flower's task identity, set by its runtime)
    return Message(
        RecordDict({keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 3})}), dst_node_id=0, message_type="train"
    )


def _message() -> Message:
    msg = Message(RecordDict(), dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_message_id"] = "m1"  # what the SuperLink does
    return msg


@pytest.mark.usefixtures("flower_identity")
def test_timing_adds_compute_seconds_when_the_node_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(keys.SITE_TIMING_ENV, "1")
    mod = timing_mod()
    assert mod is not None
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = mod(_message(), ctx, _reply)
    metrics = reply.content[keys.METRICS]
    assert metrics[keys.NUM_EXAMPLES] == 3 and metrics[keys.COMPUTE_SECONDS] >= 0.0


@pytest.mark.parametrize("value", [None, "0", ""])
def test_no_timing_by_default(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv(keys.SITE_TIMING_ENV, raising=False)
    else:
        monkeypatch.setenv(keys.SITE_TIMING_ENV, value)
    assert timing_mod() is None
