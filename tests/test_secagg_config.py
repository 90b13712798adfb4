"""``secure_aggregation:``: its ranges and relations, and which settings it refuses, at load time.

Every error must name the key(s) at fault; nothing here trains.
"""

from __future__ import annotations

from typing import Any

import pytest

from medflower.config import ConfigError, ExperimentConfig
from medflower.config.secagg import SecureAggregationConfig, quantization_error_bound
from medflower.strategies.registry import METHODS


def exp(sa: dict[str, Any] | None = None, *, sites: int = 3, **sections: Any) -> ExperimentConfig:
    data: dict[str, Any] = {
        "partition": {"num_sites": sites},
        "secure_aggregation": {"mode": "secagg+", **(sa or {})},
        **sections,
    }
    return ExperimentConfig.from_dict(data)


def test_defaults_are_off_and_valid_for_3_to_10_sites():
    assert not ExperimentConfig().secure_aggregation.enabled
    for sites in (3, 5, 10):
        assert exp(sites=sites).secure_aggregation.enabled


@pytest.mark.parametrize(
    "sa, sites, key",
    [
        ({"reconstruction_threshold": 4, "num_shares": 3}, 5, "secure_aggregation.reconstruction_threshold"),
        ({"reconstruction_threshold": 2, "num_shares": 5}, 5, "secure_aggregation.reconstruction_threshold"),
        ({"reconstruction_threshold": 1}, 3, "secure_aggregation.reconstruction_threshold"),
        ({"num_shares": 5, "reconstruction_threshold": 3}, 3, "secure_aggregation.num_shares"),
        ({"quantization_range": 2**31}, 3, "secure_aggregation.quantization_range"),
        ({"quantization_range": 2**30}, 5, "secure_aggregation.modulus_range"),
        ({"modulus_range": 2**61}, 10, "secure_aggregation.modulus_range"),
        ({"clipping_range": 0.0}, 3, "secure_aggregation.clipping_range"),
        ({"max_weight": -1}, 3, "secure_aggregation.max_weight"),
        ({}, 1, "partition.num_sites"),
    ],
)
def test_impossible_parameters_name_the_key(sa, sites, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        exp(sa, sites=sites)


def test_modulus_overflow_error_gives_the_product():
    with pytest.raises(ConfigError) as err:
        exp({"quantization_range": 2**30}, sites=5)
    assert "5 sites" in str(err.value) and "quantization_range" in str(err.value)


def test_bad_mode_lists_the_choices():
    with pytest.raises(ConfigError, match="secagg\\+"):
        exp({"mode": "secagg"})


def test_threshold_above_the_sampled_sites_names_fraction_train():
    with pytest.raises(ConfigError, match="strategy.fraction_train"):
        exp({"num_shares": 3, "reconstruction_threshold": 2}, sites=4, strategy={"fraction_train": 0.25})


@pytest.mark.parametrize("name", sorted(n for n, m in METHODS.items() if m.secure_aggregation is not None))
def test_methods_that_see_each_update_are_refused(name):
    with pytest.raises(ConfigError) as err:
        exp(strategy={"name": name})
    text = str(err.value)
    assert "secure_aggregation.mode" in text and f"strategy.name {name!r}" in text


def test_the_robust_aggregators_are_among_the_refused():
    refused = {n for n, m in METHODS.items() if m.secure_aggregation is not None}
    assert {"fedmedian", "fedtrimmedavg", "krum", "bulyan"} <= refused


@pytest.mark.parametrize(
    "name", ["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "scaffold", "fedbn", "ditto"]
)
def test_methods_whose_server_needs_only_the_mean_are_accepted(name):
    assert exp(strategy={"name": name}).secure_aggregation.enabled


@pytest.mark.parametrize(
    "sections, keys",
    [
        ({"strategy": {"max_update_norm": 5.0}}, ("strategy.max_update_norm",)),
        ({"strategy": {"weighting": "capped"}}, ("strategy.weighting",)),
        (
            {"privacy": {"mode": "client", "clipping_side": "server"}},
            ("privacy.mode", "privacy.clipping_side"),
        ),
    ],
)
def test_settings_that_need_each_update_are_refused_naming_both(sections, keys):
    with pytest.raises(ConfigError) as err:
        exp(**sections)
    assert "secure_aggregation.mode" in str(err.value)
    for key in keys:
        assert key in str(err.value)


def test_client_side_clipping_and_sample_level_dp_combine():
    assert exp(privacy={"mode": "client", "clipping_side": "client"}).secure_aggregation.enabled
    assert exp(privacy={"mode": "sample"}).secure_aggregation.enabled
    assert exp(strategy={"weighting": "uniform"}).secure_aggregation.enabled


def test_off_mode_checks_nothing_else():
    e = ExperimentConfig.from_dict({"partition": {"num_sites": 1}, "strategy": {"name": "krum"}})
    assert not e.secure_aggregation.enabled


def test_quantization_error_bound():
    cfg = SecureAggregationConfig(mode="secagg+")
    step = 2 * cfg.clipping_range / cfg.quantization_range
    assert quantization_error_bound(cfg, num_sites=3, total_ratio=1.5) == pytest.approx(3 * step / 1.5)
    assert quantization_error_bound(cfg, num_sites=3, total_ratio=0.0) == float("inf")
