"""The ``privacy:`` section: parsing, stricter-only site budgets, impossible budgets caught at load time."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from medflower.config import ExperimentConfig, load_experiment
from medflower.schema import ConfigError


def _exp(privacy: dict, **train) -> ExperimentConfig:
    return ExperimentConfig.from_dict(
        {
            "data": {"kind": "synthetic", "synthetic_samples": 200, "synthetic_size": 16},
            "partition": {"kind": "iid", "num_sites": 2},
            "train": {"rounds": 3, "batch_size": 16, **train},
            "privacy": privacy,
        }
    )


def test_defaults_and_example_yaml() -> None:
    exp = _exp({})
    assert exp.privacy.mode == "none" and exp.privacy.accountant == "rdp" and exp.privacy.poisson_sampling
    ex = load_experiment(Path(__file__).resolve().parents[1] / "examples" / "breastmnist_dp.yaml")
    assert ex.privacy.mode == "sample" and ex.privacy.target_epsilon == 3.0


def test_unknown_mode_lists_the_choices() -> None:
    with pytest.raises(
        ConfigError, match="privacy.mode: invalid value 'dp'; valid choices are 'none', 'sample', 'client'"
    ):
        _exp({"mode": "dp"})
    with pytest.raises(ConfigError, match="unknown key privacy.epsilon"):
        _exp({"mode": "sample", "epsilon": 3})


def test_a_site_may_only_be_stricter() -> None:
    exp = _exp({"mode": "sample", "target_epsilon": 8.0, "sites": {"site-1": {"target_epsilon": 2.0}}})
    assert exp.privacy.site_budget("site-1") == (2.0, 1e-5)
    assert exp.privacy.site_budget("site-0") == (8.0, 1e-5)
    # the hospital's node config: the smallest value wins, a larger one never applies
    assert exp.privacy.site_budget("site-1", node_epsilon=1.0)[0] == 1.0
    assert exp.privacy.site_budget("site-0", node_epsilon=20.0)[0] == 8.0
    with pytest.raises(
        ConfigError, match="privacy.sites.site-1.target_epsilon: 9.0 is larger than privacy.target_epsilon 8.0"
    ):
        _exp({"mode": "sample", "target_epsilon": 8.0, "sites": {"site-1": {"target_epsilon": 9.0}}})


def test_impossible_budget_is_an_error_at_load_time() -> None:
    # no noise multiplier certifies epsilon 0.05 at delta 1e-5 (the RDP floor is ~0.10)
    with pytest.raises(ConfigError, match="privacy.target_epsilon: epsilon 0.05 at delta 1e-05 is impossible"):
        _exp({"mode": "sample", "target_epsilon": 0.05})
    with pytest.raises(ConfigError, match="privacy.sites.site-0.target_epsilon: epsilon 0.01"):
        _exp({"mode": "sample", "target_epsilon": 3.0, "sites": {"site-0": {"target_epsilon": 0.01}}})
    _exp({"mode": "sample", "target_epsilon": 0.5})  # small but reachable


def test_client_mode_rejects_sample_only_settings() -> None:
    with pytest.raises(ConfigError, match="privacy.accountant: mode 'client' is accounted by Flower's RDP"):
        _exp({"mode": "client", "accountant": "prv"})
    with pytest.raises(ConfigError, match="privacy.sites: per-site budgets apply to mode 'sample'"):
        _exp({"mode": "client", "sites": {"site-0": {"target_epsilon": 1.0}}})


def test_site_plan_spans_the_whole_run_and_checks_delta() -> None:
    from medflower.client.privacy import site_plan

    exp = _exp({"mode": "sample", "target_epsilon": 3.0}, local_epochs=2)
    plan = site_plan(exp, site="site-0", num_train=100)
    assert plan.steps_per_epoch == 7 and plan.sample_rate == 1 / 7
    assert plan.steps_per_round == 14 and plan.planned_steps == 3 * 14
    one_round = site_plan(
        _exp({"mode": "sample", "target_epsilon": 3.0}, local_epochs=2, rounds=1), site="site-0", num_train=100
    )
    assert one_round.noise_multiplier < plan.noise_multiplier  # more rounds planned -> more noise per step
    with pytest.raises(ConfigError, match="privacy.target_delta: 0.01 is not below 1/n = 0.01 for site 'site-0'"):
        site_plan(_exp({"mode": "sample", "target_delta": 0.01}), site="site-0", num_train=100)


def test_node_config_budget_must_be_a_positive_number() -> None:
    from medflower.client.privacy import RoundPrivacy

    exp = _exp({"mode": "sample"})
    ctx = Context(run_id=1, node_id=1, node_config={"dp-target-epsilon": "strict"}, state=RecordDict(), run_config={})
    with pytest.raises(ConfigError, match="node config dp-target-epsilon: expected a number, got 'strict'"):
        RoundPrivacy.start(exp, ctx, site="site-0", num_train=100, server_round=1)


def test_sample_dp_rejects_strategies_that_edit_local_training() -> None:
    for name in ("fedprox", "scaffold", "ditto"):
        with pytest.raises(ConfigError, match=f"privacy.mode 'sample' cannot be combined with strategy.name '{name}'"):
            ExperimentConfig.from_dict(
                {"partition": {"num_sites": 2}, "strategy": {"name": name}, "privacy": {"mode": "sample"}}
            )


def _doc_defaults() -> dict[str, str]:
    """``key -> default`` from the key table of docs/privacy.md (one key per row)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "privacy.md").read_text(encoding="utf-8")
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`privacy.") and "," not in cells[0]:
            rows[cells[0].strip("`")] = cells[1].strip("`")
    return rows


def test_dp_sgd_recipe_defaults_are_what_the_docs_say() -> None:
    """The DP-SGD training defaults chosen by the validation search (docs/privacy.md) are the code's."""
    from medflower.config.privacy import PrivacyConfig

    docs = _doc_defaults()
    cfg = PrivacyConfig()
    for key in ("optimizer", "lr", "momentum", "accountant", "max_grad_norm"):
        documented = docs[f"privacy.{key}"]
        actual = getattr(cfg, key)
        assert (documented == actual) if isinstance(actual, str) else float(documented) == actual, key


def test_dp_sgd_trains_with_its_own_recipe_only_under_mode_sample() -> None:
    """Mode 'sample' swaps train.optimizer/lr for momentum SGD at privacy.lr; 'train' and other modes keep train.*."""
    exp = _exp({"mode": "sample"}, optimizer="adam", lr=0.003)
    local = exp.privacy.local_train(exp.train)
    assert (local.optimizer, local.lr, local.momentum) == ("sgd", exp.privacy.lr, 0.9)
    assert (local.batch_size, local.local_epochs, local.rounds) == (16, 1, 3)  # the plan's inputs are untouched
    kept = _exp({"mode": "sample", "optimizer": "train"}, optimizer="adam", lr=0.003)
    assert kept.privacy.local_train(kept.train) == kept.train
    plain = _exp({}, optimizer="adam", lr=0.003)
    assert plain.privacy.local_train(plain.train) == plain.train
    with pytest.raises(ConfigError, match="privacy.optimizer"):
        _exp({"mode": "sample", "optimizer": "adam"})
