"""The ClientApp called as Flower calls it: replies carry samples counts, arrays and scalars."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from medflower import keys
from medflower.client import app as client_app
from medflower.config import quickstart_experiment
from medflower.modelspec import build_experiment_model
from medflower.simulation.sites import build_sites


def _exp(batch_size: int = 16, epochs: int = 2):
    exp = quickstart_experiment()
    return replace(
        exp,
        data=replace(exp.data, synthetic_samples=200),
        train=replace(exp.train, batch_size=batch_size, local_epochs=epochs),
    )


def _message(exp, kind: str, extra: dict | None = None) -> Message:
    model = build_experiment_model(exp)
    cfg = ConfigRecord({keys.EXPERIMENT: exp.to_json(), keys.SERVER_ROUND: 1, **(extra or {})})
    content = RecordDict({keys.ARRAYS: ArrayRecord(model.state_dict()), keys.CONFIG: cfg})
    return Message(content=content, dst_node_id=1, message_type=kind)


def _context(pid: int, exp) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config={keys.NODE_PARTITION_ID: pid, keys.NODE_NUM_PARTITIONS: exp.partition.num_sites},
        state=RecordDict(),
        run_config={},
    )


@pytest.mark.parametrize("batch_size", [7, 64])
def test_num_examples_counts_samples_not_batches(batch_size: int, flower_identity) -> None:
    exp = _exp(batch_size=batch_size)
    reply = client_app.train(_message(exp, "train"), _context(1, exp))
    site = build_sites(exp)[1]
    metrics = reply.content[keys.METRICS]
    assert metrics[keys.NUM_EXAMPLES] == len(site.train)  # samples in one epoch, whatever the batch size
    assert np.isfinite(metrics[keys.TRAIN_LOSS])
    assert reply.content[keys.SITE][keys.SITE_NAME] == "site-1"
    # the weights changed: local training happened
    before = _message(exp, "train").content[keys.ARRAYS].to_torch_state_dict()
    after = reply.content[keys.ARRAYS].to_torch_state_dict()
    assert any(not np.allclose(before[k].numpy(), after[k].numpy()) for k in before)


def test_evaluate_reports_val_split_size_and_metrics(flower_identity) -> None:
    exp = _exp()
    reply = client_app.evaluate_(_message(exp, "evaluate"), _context(0, exp))
    m = reply.content[keys.METRICS]
    assert m[keys.NUM_EXAMPLES] == len(build_sites(exp)[0].val)
    assert {"val-accuracy", "val-auc", "val-balanced-accuracy", keys.EVAL_LOSS} <= set(m.keys())
    assert keys.ARRAYS not in reply.content.array_records


def test_test_split_on_request(flower_identity) -> None:
    exp = _exp()
    reply = client_app.evaluate_(_message(exp, "evaluate", {keys.EVAL_SPLIT: "test"}), _context(2, exp))
    assert reply.content[keys.METRICS][keys.NUM_EXAMPLES] == len(build_sites(exp)[2].test)
    assert "test-accuracy" in reply.content[keys.METRICS]


def test_missing_site_is_a_clear_error(flower_identity) -> None:
    exp = _exp()
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="site-config"):
        client_app.train(_message(exp, "train"), ctx)
    with pytest.raises(ValueError, match="partition-id 9 is out of range: the experiment has 3 sites"):
        client_app.train(_message(exp, "train"), _context(9, exp))
