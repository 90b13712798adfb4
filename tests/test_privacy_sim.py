"""A whole DP federation through Flower's simulation: a site out of budget stops, the others go on."""

from __future__ import annotations

from pathlib import Path

import pytest

from medflower import keys
from medflower.config import ExperimentConfig


@pytest.mark.slow
def test_site_out_of_budget_stops_and_the_run_completes(tmp_path: Path) -> None:
    from medflower.client.privacy import PrivacyLedger, site_plan
    from medflower.simulation.runner import simulate
    from medflower.simulation.sites import build_sites

    d = {
        "name": "dp-budget-synthetic",
        "seed": 0,
        "data": {"kind": "synthetic", "synthetic_samples": 300, "synthetic_size": 16},
        "partition": {"kind": "iid", "num_sites": 3},
        "model": {"name": "cnn"},
        "train": {"rounds": 3, "batch_size": 16, "lr": 0.003},
        "privacy": {"mode": "sample", "noise_multiplier": 1.0, "target_epsilon": 50.0},
    }
    exp = ExperimentConfig.from_dict(d)
    # site-0's own budget: enough for one round at sigma=1, not for two
    plan = site_plan(exp, site="site-0", num_train=len(build_sites(exp)[0].train))
    led = PrivacyLedger(site="site-0", mechanism="rdp")
    one, two = (
        led.projected_epsilon(1e-5, noise_multiplier=1.0, sample_rate=plan.sample_rate, steps=k * plan.steps_per_round)
        for k in (1, 2)
    )
    d["privacy"]["sites"] = {"site-0": {"target_epsilon": (one + two) / 2}}
    summary = simulate(ExperimentConfig.from_dict(d), tmp_path / "run")

    rounds = summary["rounds"]
    assert len(rounds) == 3 and all(r["aggregated"] and not r["failures"] for r in rounds)
    s0 = [r["sites_train"]["site-0"] for r in rounds]
    assert s0[0][keys.DP_EXHAUSTED] == 0 and s0[0][keys.DP_EPSILON] == pytest.approx(one)
    for later in s0[1:]:  # refused, said so, spent nothing more
        assert later[keys.DP_EXHAUSTED] == 1 and later[keys.NUM_EXAMPLES] == 0
        assert (
            later[keys.DP_EPSILON] == pytest.approx(one) and later[keys.DP_EPSILON_NEXT] > later[keys.DP_TARGET_EPSILON]
        )
    for site in ("site-1", "site-2"):  # the others trained every round; their ledgers grew
        eps = [r["sites_train"][site][keys.DP_EPSILON] for r in rounds]
        assert all(r["sites_train"][site][keys.DP_EXHAUSTED] == 0 for r in rounds)
        assert eps[0] < eps[1] < eps[2]
    assert [r["train"]["dp-sites-refused"] for r in rounds] == [0, 1, 1]
    assert rounds[-1]["train"][keys.DP_EPSILON] == max(
        r["sites_train"][s][keys.DP_EPSILON] for r in rounds[-1:] for s in r["sites_train"]
    )
