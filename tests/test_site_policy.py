"""A hospital's site policy: validated at load, every rule accepted and refused, refused before any work,
never loosened by the coordinator, and recorded by the coordinator as a refusal while the run carries on."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from flwr.app import ConfigRecord
from sitekit import experiment, message, node, refusal_of, write_site

from medflower import keys
from medflower.client.app import app as hospital_app
from medflower.client.app import build_client_app
from medflower.client.hospital import hospital_guard, hospital_ledger_place, load_hospital_site
from medflower.client.policy import PERSONAL_MODEL_METHODS, NodeFacts, Request, SitePolicy, refusal_for
from medflower.client.site import load_site_config
from medflower.config import ExperimentConfig
from medflower.schema import ConfigError, from_dict

SITE = "hospital-a"


# ------------------------------------------------------------------------------------------ loading
def _site_yaml(tmp_path: Path, policy: Any) -> Path:
    path = tmp_path / "site.yaml"
    body = {"name": SITE, "task": "classification", "data": {"kind": "manifest", "path": "m.csv"}, "policy": policy}
    path.write_text(yaml.safe_dump(body))
    return path


def test_a_policy_loads_into_a_frozen_typed_dataclass(tmp_path: Path) -> None:
    policy = {
        "models": ["cnn", "unet"],
        "strategies": ["fedavg", "fedprox"],
        "require_privacy": "sample",
        "max_epsilon": 3,
        "max_delta": 1e-5,
        "max_rounds": 20,
        "allow_test_evaluation": False,
        "allow_personal_models": False,
    }
    site = load_site_config(_site_yaml(tmp_path, policy))
    assert site.policy == SitePolicy(
        models=("cnn", "unet"),
        strategies=("fedavg", "fedprox"),
        require_privacy="sample",
        max_epsilon=3.0,
        max_delta=1e-5,
        max_rounds=20,
        allow_test_evaluation=False,
        allow_personal_models=False,
    )
    with pytest.raises(AttributeError):
        site.policy.max_rounds = 100  # type: ignore[misc]  # frozen: nothing rewrites it at run time
    with pytest.raises(TypeError):
        SitePolicy(("cnn",))  # type: ignore[misc]  # keyword-only
    assert load_site_config(_site_yaml(tmp_path, None)).policy == SitePolicy()  # absent: anything goes


@pytest.mark.parametrize(
    "policy, message",
    [
        ({"max_round": 5}, r"unknown key policy.max_round; valid keys here are allow_personal_models"),
        ({"max_rounds": "five"}, r"policy.max_rounds: expected an integer, got 'five'"),
        ({"max_rounds": 0}, r"policy.max_rounds: must be >= 1, got 0"),
        ({"models": ["cnnn"]}, r"policy.models\[0\]: invalid value 'cnnn'; valid choices are 'cnn'"),
        ({"models": "cnn"}, r"policy.models: expected a list"),
        ({"strategies": ["fedavgg"]}, r"policy.strategies: 'fedavgg' is not an aggregation method; valid choices"),
        ({"require_privacy": "client"}, r"policy.require_privacy: invalid value 'client'; valid choices are 'none'"),
        ({"max_epsilon": 3.0}, r"policy.max_epsilon: applies to sample-level DP; set policy.require_privacy"),
        ({"require_privacy": "sample", "max_epsilon": -1}, r"policy.max_epsilon: must be > 0"),
        ({"require_privacy": "sample", "max_delta": 0.5}, r"policy.max_delta: must be <= 0.1"),
        ({"allow_test_evaluation": "no"}, r"policy.allow_test_evaluation: expected true/false, got 'no'"),
        ([1, 2], r"policy: expected a mapping"),
    ],
)
def test_a_malformed_policy_is_an_error_naming_the_file_and_key(tmp_path: Path, policy: Any, message: str) -> None:
    path = _site_yaml(tmp_path, policy)
    with pytest.raises(ConfigError, match=message) as err:
        load_site_config(path)
    assert str(err.value).startswith(f"{path}: ")


def test_personal_model_methods_come_from_the_registry() -> None:
    assert PERSONAL_MODEL_METHODS == ("ditto",)  # declared by strategies/methods/ditto.py


# ------------------------------------------------------------------------------------------ every rule
def _policy(**kw: Any) -> SitePolicy:
    return from_dict(SitePolicy, kw, "policy")


def _facts(**kw: Any) -> NodeFacts:
    return NodeFacts(**{"site_name": SITE, "site_task": "classification", "has_state_dir": True, **kw})


DP = {"mode": "sample", "target_epsilon": 8.0, "target_delta": 1e-5}

# (id, policy, experiment sections, request, node facts, expected refusal: its rule, or a full text)
CASES: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any], str | None]] = [
    ("models ok", {"models": ["cnn", "unet"]}, {}, {}, {}, None),
    ("models no", {"models": ["unet"]}, {}, {}, {}, "policy.models"),
    ("strategies ok", {"strategies": ["fedavg"]}, {}, {}, {}, None),
    ("strategies no", {"strategies": ["fedavg"]}, {"strategy": {"name": "fedprox"}}, {}, {}, "policy.strategies"),
    ("personal ok", {"allow_personal_models": True}, {"strategy": {"name": "ditto"}}, {}, {}, None),
    (
        "personal no",
        {"allow_personal_models": False},
        {"strategy": {"name": "ditto"}},
        {},
        {},
        "policy.allow_personal_models",
    ),
    ("personal other", {"allow_personal_models": False}, {"strategy": {"name": "fedbn"}}, {}, {}, None),
    ("privacy ok", {"require_privacy": "sample"}, {"privacy": DP}, {}, {}, None),
    ("privacy none", {"require_privacy": "sample"}, {}, {}, {}, "policy.require_privacy"),
    (
        "privacy client",
        {"require_privacy": "sample"},
        {"privacy": {"mode": "client"}},
        {},
        {},
        "policy.require_privacy",
    ),
    ("epsilon no", {"require_privacy": "sample", "max_epsilon": 3}, {"privacy": DP}, {}, {}, "policy.max_epsilon"),
    (
        "epsilon ok",
        {"require_privacy": "sample", "max_epsilon": 3},
        {"privacy": {**DP, "target_epsilon": 2.5}},
        {},
        {},
        None,
    ),
    (
        "epsilon site entry",  # the experiment's stricter entry for this site satisfies the policy
        {"require_privacy": "sample", "max_epsilon": 3},
        {"privacy": {**DP, "sites": {SITE: {"target_epsilon": 2.0}}}},
        {},
        {},
        None,
    ),
    ("epsilon node", {"require_privacy": "sample", "max_epsilon": 3}, {"privacy": DP}, {}, {"node_epsilon": 2.0}, None),
    ("delta no", {"require_privacy": "sample", "max_delta": 1e-6}, {"privacy": DP}, {}, {}, "policy.max_delta"),
    ("delta ok", {"require_privacy": "sample", "max_delta": 1e-5}, {"privacy": DP}, {}, {}, None),
    ("rounds ok", {"max_rounds": 5}, {}, {"server_round": 5}, {"rounds_trained": 4}, None),
    (
        "rounds no",
        {"max_rounds": 5},
        {},
        {"server_round": 6},
        {},
        "policy.max_rounds: round 6 exceeds this site's limit of 5",
    ),
    (
        "rounds counted",  # a coordinator that repeats round numbers gets no more rounds
        {"max_rounds": 5},
        {},
        {"server_round": 2, "run_id": 9},
        {"rounds_trained": 5},
        "policy.max_rounds: this site has already trained 5 round(s) in run 9, its limit of 5",
    ),
    ("rounds evaluate", {"max_rounds": 5}, {}, {"kind": "evaluate", "server_round": 9}, {}, None),
    ("test ok", {"allow_test_evaluation": True}, {}, {"kind": "evaluate", "eval_split": "test"}, {}, None),
    (
        "test no",
        {"allow_test_evaluation": False},
        {},
        {"kind": "evaluate", "eval_split": "test"},
        {},
        "policy.allow_test_evaluation",
    ),
    ("test no, val", {"allow_test_evaluation": False}, {}, {"kind": "evaluate", "eval_split": "val"}, {}, None),
    ("state_dir no", {}, {"privacy": DP}, {}, {"has_state_dir": False}, "state_dir"),
    ("state_dir none needed", {}, {}, {}, {"has_state_dir": False}, None),
    ("task", {}, {"task": "segmentation", "model": {"name": "unet"}}, {}, {}, "task"),
    ("attack", {}, {"attack": {"kind": "sign_flip", "sites": ["site-0"]}}, {}, {}, "simulation-only"),
    ("train split", {}, {}, {"kind": "evaluate", "eval_split": "train"}, {}, "message"),
    ("query", {}, {}, {"kind": "query"}, {}, "message"),
    ("other kind", {}, {}, {"kind": "push"}, {}, "message"),
    (
        "query, feature statistics",
        {},
        {"privacy": {**DP, "feature_stats_noise": 4.0}, "model": {"name": "cnn", "whiten_features": True}},
        {"kind": "query", "server_round": 0},
        {},
        None,
    ),
]


@pytest.mark.parametrize(
    "policy, sections, request_, facts, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_every_rule_accepts_and_refuses(
    policy: dict[str, Any],
    sections: dict[str, Any],
    request_: dict[str, Any],
    facts: dict[str, Any],
    expected: str | None,
) -> None:
    exp = experiment(**sections)
    req = Request(**{"kind": "train", "server_round": 1, "run_id": 1, **request_})
    refusal = refusal_for(_policy(**policy), exp, req, _facts(**facts))
    if expected is None:
        assert refusal is None, refusal
    else:
        assert refusal is not None
        assert refusal.text == expected if ":" in expected else refusal.rule == expected, refusal.text
        assert "/" not in refusal.text  # names no path


# ------------------------------------------------------------------------------------------ the hospital app
@pytest.mark.parametrize(
    "policy, state, sections, kind, split, server_round, rule",
    [
        ({"models": ["unet"]}, True, {}, "train", None, 1, "policy.models"),
        ({"strategies": ["fedprox"]}, True, {}, "evaluate", None, 1, "policy.strategies"),
        (
            {"allow_personal_models": False},
            True,
            {"strategy": {"name": "ditto"}},
            "train",
            None,
            1,
            "policy.allow_personal_models",
        ),
        ({"require_privacy": "sample"}, True, {}, "train", None, 1, "policy.require_privacy"),
        (
            {"require_privacy": "sample", "max_epsilon": 1.0},
            True,
            {"privacy": DP},
            "train",
            None,
            1,
            "policy.max_epsilon",
        ),
        ({"require_privacy": "sample", "max_delta": 1e-7}, True, {"privacy": DP}, "train", None, 1, "policy.max_delta"),
        ({"max_rounds": 5}, True, {}, "train", None, 6, "policy.max_rounds"),
        ({"allow_test_evaluation": False}, True, {}, "evaluate", "test", 3, "policy.allow_test_evaluation"),
        ({}, False, {"privacy": DP}, "train", None, 1, "state_dir"),
    ],
)
def test_the_hospital_refuses_before_any_work(
    tmp_path: Path,
    flower_identity,
    policy: dict[str, Any],
    state: bool,
    sections: dict[str, Any],
    kind: str,
    split: str | None,
    server_round: int,
    rule: str,
) -> None:
    site = write_site(tmp_path / "export", SITE, n=4, policy=policy, state_dir="state" if state else None)
    (tmp_path / "export" / "manifest.csv").unlink()  # had the node read its data, it would fail instead
    exp = experiment(**sections)
    reply = hospital_app(message(exp, kind, server_round=server_round, split=split), node(site))
    assert not reply.has_error(), reply.error
    assert not reply.content.array_records  # no weights
    assert dict(reply.content[keys.METRICS]) == {keys.NUM_EXAMPLES: 0}
    assert dict(reply.content[keys.SITE]) == {keys.SITE_NAME: SITE, keys.REFUSAL: refusal_of(reply)}
    assert str(refusal_of(reply)).startswith(rule + ": ")


def test_nothing_the_coordinator_sends_loosens_the_policy(tmp_path: Path, flower_identity) -> None:
    site = write_site(tmp_path / "export", SITE, n=8, policy={"max_rounds": 1}, state_dir="state")
    exp = experiment()
    ctx = node(site)
    first = hospital_app(message(exp, "train", server_round=1), ctx)
    assert not first.has_error() and refusal_of(first) is None and first.content.array_records
    # the coordinator repeats round 1, and adds keys that look like a policy: the site counts its rounds
    again = message(exp, "train", server_round=1)
    again.content[keys.CONFIG]["policy.max_rounds"] = 100
    again.content["policy"] = ConfigRecord({"max_rounds": 100, "allow_test_evaluation": True})
    reply = hospital_app(again, ctx)
    assert refusal_of(reply) == "policy.max_rounds: this site has already trained 1 round(s) in run 1, its limit of 1"
    # a restarted node (new context) still counts: the count is in the state folder
    assert refusal_of(hospital_app(message(exp, "train", server_round=1), node(site))) is not None
    # another run is another count
    assert refusal_of(hospital_app(message(exp, "train", server_round=1), node(site, run_id=2))) is None


def test_a_coordinator_cannot_loosen_a_privacy_limit_through_the_experiment(tmp_path: Path, flower_identity) -> None:
    site = write_site(
        tmp_path / "export", SITE, n=4, policy={"require_privacy": "sample", "max_epsilon": 2.0}, state_dir="state"
    )
    # an experiment whose per-site entry names another site, or a fixed noise, changes nothing
    exp = experiment(privacy={**DP, "noise_multiplier": 5.0, "sites": {"hospital-b": {"target_epsilon": 1.0}}})
    reply = hospital_app(message(exp), node(site))
    assert str(refusal_of(reply)).startswith("policy.max_epsilon: the experiment's budget for this site is epsilon 8")


# ------------------------------------------------------------------------------------------ the federation
@pytest.mark.slow
def test_the_coordinator_records_a_refusal_and_carries_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from medflower.simulation.inprocess import InProcessGrid, simulate_inprocess

    exp: ExperimentConfig = experiment()
    exp = replace(exp, train=replace(exp.train, rounds=2))
    a = write_site(tmp_path / "a", "hospital-a", n=12, seed=1)
    b = write_site(
        tmp_path / "b",
        "hospital-b",
        n=12,
        seed=2,
        policy={"max_rounds": 1, "allow_test_evaluation": False},
        state_dir="state",
    )
    app = build_client_app(load_site=load_hospital_site, guard=hospital_guard, locate_ledger=hospital_ledger_place)
    grid = InProcessGrid(
        app, num_sites=2, node_configs=[{keys.NODE_SITE_CONFIG: str(a)}, {keys.NODE_SITE_CONFIG: str(b)}]
    )
    summary = simulate_inprocess(exp, tmp_path / "out", grid=grid)
    r1, r2 = summary["rounds"]
    assert r1["refusals"] == [] and set(r1["sites_train"]) == {"hospital-a", "hospital-b"} and r1["aggregated"]
    assert r2["failures"] == [] and r2["aggregated"]  # a refusal is an answer, not a failure
    assert r2["refusals"] == [
        {
            "site": "hospital-b",
            "node_id": 1002,
            "what": "training",
            "reason": "refused: policy.max_rounds: round 2 exceeds this site's limit of 1",
        }
    ]
    assert r2["sites_train"]["hospital-a"][keys.NUM_EXAMPLES] > 0  # the other site trained and was aggregated
    assert set(summary["sites_test"]) == {"hospital-a"}
    assert [(r["site"], r["what"]) for r in summary["sites_test_refusals"]] == [("hospital-b", "test")]
    assert "policy.allow_test_evaluation" in summary["sites_test_refusals"][0]["reason"]


def test_the_example_site_yaml_with_a_policy_loads() -> None:
    path = Path(__file__).resolve().parents[1] / "examples" / "sites" / "hospital_dp_policy.yaml"
    site = load_site_config(path)
    assert site.policy.require_privacy == "sample" and site.policy.max_epsilon == 3.0
    assert site.state_path() == Path("/var/lib/medflower/state")
