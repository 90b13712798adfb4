"""Whole federations with the strategies Flower lacks and with poisoned sites.

The in-process runs use ``medflower.simulation.inprocess`` (the real ServerApp loop and ClientApp, no Ray);
one run goes through Flower's simulation engine (``medflower.simulation.runner.simulate``) as users run it.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from medflower.config import quickstart_experiment
from medflower.config.attack import AttackConfig
from medflower.config.strategy import StrategyConfig
from medflower.simulation.clientapp import app as simulation_app
from medflower.simulation.inprocess import InProcessGrid, simulate_inprocess
from medflower.strategies.methods.ditto import STATE_PERSONAL
from medflower.strategies.methods.fedbn import STATE_LOCAL
from medflower.strategies.methods.scaffold import STATE_CI


def small(name: str, rounds: int = 2, **params):
    exp = quickstart_experiment()
    train = replace(
        exp.train,
        rounds=rounds,
        optimizer="sgd" if name == "scaffold" else exp.train.optimizer,
        lr=0.05 if name == "scaffold" else exp.train.lr,
    )
    return replace(
        exp,
        data=replace(exp.data, synthetic_samples=300),
        train=train,
        strategy=StrategyConfig(name=name, params=params),
    )


def _finite(d: dict) -> bool:
    return all(v is None or isinstance(v, list) or math.isfinite(v) for v in d.values())  # lists: confusion matrix


@pytest.mark.parametrize("name, state_key", [("scaffold", STATE_CI), ("fedbn", STATE_LOCAL), ("ditto", STATE_PERSONAL)])
def test_strategies_flower_lacks_run_end_to_end(name, state_key, tmp_path, flower_identity):
    exp = small(name)
    grid = InProcessGrid(simulation_app, num_sites=exp.partition.num_sites)
    summary = simulate_inprocess(exp, tmp_path, grid=grid)
    assert len(summary["rounds"]) == 2 and all(r["aggregated"] and not r["failures"] for r in summary["rounds"])
    assert _finite(summary["final_global_test"]) and summary["final_global_test"]["accuracy"] is not None
    for ctx in grid.contexts.values():  # every site kept its own state across rounds
        assert state_key in ctx.state
    if name == "fedbn":
        a, b = [{k: v.numpy() for k, v in c.state[STATE_LOCAL].items()} for c in list(grid.contexts.values())[:2]]
        assert any(not np.array_equal(a[k], b[k]) for k in a)  # each site has its own norm layers
    if name == "ditto":  # global and personal metrics per site
        for site, m in summary["sites_test"].items():
            assert {"test-accuracy", "personal-test-accuracy"} <= set(m), site
        assert "personal-val-accuracy" in summary["rounds"][-1]["evaluate"]


def test_wrong_shape_site_is_left_out_in_a_whole_run(tmp_path, flower_identity):
    exp = replace(small("fedmedian"), attack=AttackConfig(kind="wrong_shape", sites=("site-2",)))
    exp = replace(exp, participation=replace(exp.participation, min_sites=2))  # default: all sites needed
    summary = simulate_inprocess(exp, tmp_path)
    for r in summary["rounds"]:
        assert r["aggregated"] and sorted(r["sites_train"]) == ["site-0", "site-1"]
        assert r["failures"][0]["site"] == "site-2" and "has shape" in r["failures"][0]["reason"]
    assert _finite(summary["final_global_test"])


@pytest.mark.slow
def test_nonfinite_site_through_flowers_simulation_engine(tmp_path):
    from medflower.simulation.runner import simulate

    exp = replace(small("fedavg", rounds=1), attack=AttackConfig(kind="nonfinite", sites=("site-0",)))
    exp = replace(exp, participation=replace(exp.participation, min_sites=2))
    summary = simulate(exp, tmp_path)
    for r in summary["rounds"]:
        assert r["aggregated"] and sorted(r["sites_train"]) == ["site-1", "site-2"]
        assert [f["site"] for f in r["failures"]] == ["site-0"]
        assert "is not finite" in r["failures"][0]["reason"]
    assert _finite(summary["final_global_test"]) and summary["final_global_test"]["loss"] is not None
