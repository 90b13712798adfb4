"""The ClientApps called as Flower calls them: replies carry samples counts, arrays and scalars.

Three apps share one pipeline (:func:`medflower.client.app.build_client_app`): the hospital's
(``medflower.client.app:app``, site YAML), the simulation's (``medflower.simulation.clientapp:app``,
simulated partitions and attacks) and the ``flwr run`` component that picks one per node
(``medflower.cli.apps:clientapp``).
"""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tomli
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from medflower import keys
from medflower.cli import apps
from medflower.client.app import app as hospital_app
from medflower.client.app import build_client_app
from medflower.config import quickstart_experiment
from medflower.config.attack import AttackConfig
from medflower.config.strategy import StrategyConfig
from medflower.modelspec import build_experiment_model
from medflower.simulation.clientapp import app as simulation_app
from medflower.simulation.sites import build_sites, load_partition
from medflower.strategies.methods.fedbn import LOCAL_KEYS

REPO = Path(__file__).resolve().parents[1]


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
    reply = simulation_app(_message(exp, "train"), _context(1, exp))
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
    reply = simulation_app(_message(exp, "evaluate"), _context(0, exp))
    m = reply.content[keys.METRICS]
    assert m[keys.NUM_EXAMPLES] == len(build_sites(exp)[0].val)
    assert {"val-accuracy", "val-auc", "val-balanced-accuracy", keys.EVAL_LOSS} <= set(m.keys())
    assert keys.ARRAYS not in reply.content.array_records


def test_test_split_on_request(flower_identity) -> None:
    exp = _exp()
    reply = simulation_app(_message(exp, "evaluate", {keys.EVAL_SPLIT: "test"}), _context(2, exp))
    assert reply.content[keys.METRICS][keys.NUM_EXAMPLES] == len(build_sites(exp)[2].test)
    assert "test-accuracy" in reply.content[keys.METRICS]


def _node(**node_config) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def test_missing_site_is_a_clear_error(flower_identity, caplog: pytest.LogCaptureFixture) -> None:
    exp = _exp()
    # the hospital app contains its errors: the coordinator gets a code and a reference, the site's log the rest
    for ctx in (_node(), _context(0, exp)):  # no site YAML; a simulated node on the hospital app
        caplog.clear()
        reply = hospital_app(_message(exp, "train"), ctx)
        assert reply.has_error() and not reply.has_content()
        reason = reply.error.reason
        assert reason.startswith("config-error: ") and "(ref " in reason and "site-config" not in reason
        ref = reason.rsplit("(ref ", 1)[1].rstrip(")")
        site_log = [r for r in caplog.records if r.name == "medflower.site"]
        assert any(ref in r.getMessage() and "this is the hospital ClientApp" in r.getMessage() for r in site_log)
        assert any('--node-config "site-config=' in r.getMessage() for r in site_log)
    with pytest.raises(ValueError, match=r"this is the simulation's ClientApp .* no 'partition-id'"):
        simulation_app(_message(exp, "train"), _node())
    with pytest.raises(ValueError, match="partition-id 9 is out of range: the experiment has 3 sites"):
        simulation_app(_message(exp, "train"), _context(9, exp))


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_hospital_refuses_simulated_poisoning_before_any_work(kind: str, flower_identity, tmp_path: Path) -> None:
    exp = replace(_exp(), attack=AttackConfig(kind="sign_flip", sites=("site-0",)))
    # the site YAML names data that do not exist: a refusal that did any work (loading them) would fail instead
    site = tmp_path / "site.yaml"
    site.write_text("name: hospital-a\ntask: classification\ndata: {kind: folders, path: /nonexistent/export}\n")
    reply = hospital_app(_message(exp, kind), _node(**{keys.NODE_SITE_CONFIG: str(site)}))
    assert not reply.has_error() and not reply.content.array_records  # a refusal: an answer without weights
    assert reply.content[keys.METRICS][keys.NUM_EXAMPLES] == 0
    assert reply.content[keys.SITE][keys.SITE_NAME] == "hospital-a"
    reason = str(reply.content[keys.SITE][keys.REFUSAL])
    assert reason.startswith("simulation-only: a hospital node never runs simulation-only code")
    assert "attack.kind 'sign_flip'" in reason


def test_simulated_attack_is_applied_once_after_training(flower_identity) -> None:
    """sign_flip sends ``g - scale * (local - g)`` of the honest local update: applied exactly once."""
    clean_exp = replace(_exp(epochs=1), attack=AttackConfig(kind="none"))
    attacked_exp = replace(clean_exp, attack=AttackConfig(kind="sign_flip", sites=("site-0",), scale=3.0))
    g = ArrayRecord(build_experiment_model(clean_exp).state_dict())  # one global model for both runs

    def train(exp, pid: int) -> ArrayRecord:
        cfg = ConfigRecord({keys.EXPERIMENT: exp.to_json(), keys.SERVER_ROUND: 1})
        msg = Message(content=RecordDict({keys.ARRAYS: g, keys.CONFIG: cfg}), dst_node_id=1, message_type="train")
        return simulation_app(msg, _context(pid, exp)).content[keys.ARRAYS]

    clean, attacked = train(clean_exp, 0), train(attacked_exp, 0)
    for k, a in attacked.items():
        x, g_k = clean[k].numpy(), g[k].numpy()
        want = g_k - 3.0 * (x - g_k) if np.dtype(x.dtype).kind == "f" else x
        np.testing.assert_allclose(a.numpy(), want, rtol=1e-5, atol=1e-6, err_msg=k)
    other, other_clean = train(attacked_exp, 1), train(clean_exp, 1)
    for k, a in other.items():  # site-1 is not attacked
        np.testing.assert_allclose(a.numpy(), other_clean[k].numpy(), rtol=1e-6, err_msg=k)


def test_transform_update_sees_what_the_strategy_would_send(flower_identity) -> None:
    """``transform_update`` gets the strategy's outgoing arrays (FedBN's local keys already removed)."""
    seen = {}

    def transform(arrays, global_arrays, exp, site_name):
        seen.update(keys=set(arrays.keys()), global_keys=set(global_arrays.keys()), site=site_name)
        return ArrayRecord({k: a for k, a in arrays.items() if k != "never"})

    app = build_client_app(load_site=load_partition, transform_update=transform)
    exp = dataclasses.replace(_exp(epochs=1), strategy=StrategyConfig(name="fedbn"))  # the method sets the half
    local_keys = [k for k in build_experiment_model(exp).state_dict() if ".1." in k]
    reply = app(_message(exp, "train", {LOCAL_KEYS: local_keys}), _context(2, exp))
    assert seen["site"] == "site-2"
    assert seen["keys"] == set(reply.content[keys.ARRAYS].keys()) and seen["keys"].isdisjoint(local_keys)
    assert seen["global_keys"] >= set(local_keys)


def test_flwr_run_component_picks_the_app_by_node_config() -> None:
    assert apps.app_for(_node(**{keys.NODE_SITE_CONFIG: "/site.yaml"})) is hospital_app
    assert apps.app_for(_node(**{keys.NODE_PARTITION_ID: 0, keys.NODE_NUM_PARTITIONS: 2})) is simulation_app
    assert apps.app_for(_node()) is hospital_app  # whose error says how to start the SuperNode
    both = _node(**{keys.NODE_SITE_CONFIG: "/site.yaml", keys.NODE_PARTITION_ID: 0})
    assert apps.app_for(both) is hospital_app  # a hospital's own files win


def test_flwr_run_loads_the_dispatcher_through_a_top_level_module() -> None:
    """pyproject's component is a top-level name (see flwr_components.py) that is the dispatcher."""
    components = tomli.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    module, _, attr = components["clientapp"].partition(":")
    assert "." not in module, components["clientapp"]
    assert getattr(importlib.import_module(module), attr) is apps.clientapp
    assert components["serverapp"] == "medflower.server.app:app"


HOSPITAL_NODE = """
import sys
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from medflower import keys
from medflower.cli.apps import clientapp
from medflower.config import ExperimentConfig
from medflower.modelspec import build_experiment_model

def simulation_modules():
    return sorted(m for m in sys.modules if m.startswith("medflower.simulation"))

assert simulation_modules() == [], simulation_modules()
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
exp = ExperimentConfig.from_dict({"attack": {"kind": "nonfinite", "sites": ["site-0"]}})
cfg = ConfigRecord({keys.EXPERIMENT: exp.to_json(), keys.SERVER_ROUND: 1})
content = RecordDict({keys.ARRAYS: ArrayRecord(build_experiment_model(exp).state_dict()), keys.CONFIG: cfg})
ctx = Context(run_id=1, node_id=1, node_config={keys.NODE_SITE_CONFIG: sys.argv[1]}, state=RecordDict(),
              run_config={})
reply = clientapp(Message(content=content, dst_node_id=1, message_type="train"), ctx)
assert not reply.has_error(), reply.error
assert str(reply.content[keys.SITE][keys.REFUSAL]).startswith("simulation-only: "), reply.content
assert simulation_modules() == [], simulation_modules()
print("no simulation code loaded")
"""


def test_a_hospital_node_never_loads_simulation_code(tmp_path: Path) -> None:
    """The ``flwr run`` component on a hospital's node, in a fresh process: no ``medflower.simulation`` module."""
    site = tmp_path / "site.yaml"
    site.write_text("name: hospital-a\ntask: classification\ndata: {kind: folders, path: /nonexistent/export}\n")
    res = subprocess.run(
        [sys.executable, "-c", HOSPITAL_NODE, str(site)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "no simulation code loaded" in res.stdout
