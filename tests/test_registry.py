"""The method registry: every method declared once, and everything else reads it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
from flwr.serverapp import strategy as fl

from medflower import keys
from medflower.config import ConfigError, ExperimentConfig
from medflower.config.strategy import STRATEGY_NAMES
from medflower.schema import rng_field
from medflower.server.build import build_strategy
from medflower.strategies import registry
from medflower.strategies.registry import METHODS, PRIVACY_MODES, Method, NoParams, SiteHalf, get_method


def test_every_method_declares_everything():
    assert set(STRATEGY_NAMES) == set(METHODS)
    for name, m in METHODS.items():
        assert m.name == name
        assert m.summary and m.reference, name
        assert dataclasses.is_dataclass(m.params), name
        assert set(m.privacy) == set(PRIVACY_MODES), name
        assert m.privacy["none"] is None, f"{name}: every method runs without privacy"
        assert issubclass(m.site, SiteHalf), name
        assert m.source in ("Flower", "medflower"), name


def test_flower_methods_build_flowers_own_class():
    for name, m in METHODS.items():
        s = build_strategy(ExperimentConfig.from_dict({"strategy": {"name": name}}), num_sites=7)
        if m.source == "Flower":
            assert type(s).__module__.startswith("flwr.serverapp.strategy"), name
        else:
            assert isinstance(s, fl.FedAvg) and type(s).__module__.startswith("medflower.strategies.methods"), name


def test_message_keys_are_unique_and_not_core():
    seen: dict[str, str] = {}
    core = {v for k, v in vars(keys).items() if k.isupper() and isinstance(v, str)}
    for m in METHODS.values():
        for k in m.message_keys:
            assert k not in core and k not in seen, (m.name, k)
            seen[k] = m.name


def _fake(name: str, **kw) -> Method:
    return Method(
        name=name,
        summary="a made-up method",
        params=NoParams,
        build=lambda ctx: fl.FedAvg(**ctx.flower),
        privacy={"none": None, "sample": None, "client": None},
        secure_aggregation=None,
        **kw,
    )


def test_a_key_clash_is_refused():
    a = _fake("a", message_keys=("shared-key",))
    b = _fake("b", message_keys=("shared-key",))
    assert "declared by both 'a' and 'b'" in registry._key_clashes({"a": a, "b": b})
    core = _fake("c", message_keys=(keys.NUM_EXAMPLES,))
    assert "is a core key" in registry._key_clashes({"c": core})


def test_a_declaration_must_cover_every_privacy_mode():
    with pytest.raises(ValueError, match="privacy must declare every mode"):
        Method(
            name="x",
            summary="",
            params=NoParams,
            build=lambda ctx: fl.FedAvg(),
            privacy={"none": None},
            secure_aggregation=None,
        )


def test_a_new_method_is_validated_and_refused_from_its_declaration(monkeypatch):
    """Adding a method = one declaration: the YAML validation and compatibility errors follow it."""

    @dataclass(frozen=True)
    class Params:
        strength: float = rng_field(0.5, min=0.0, max=1.0)

    new = dataclasses.replace(
        _fake("fednew"), params=Params, privacy={"none": None, "sample": "it is made up", "client": None}
    )
    monkeypatch.setitem(METHODS, "fednew", new)
    exp = ExperimentConfig.from_dict({"strategy": {"name": "fednew", "params": {"strength": 0.2}}})
    assert exp.strategy.typed_params() == Params(strength=0.2)
    with pytest.raises(ConfigError, match=r"strategy\.params\.strength: must be <= 1"):
        ExperimentConfig.from_dict({"strategy": {"name": "fednew", "params": {"strength": 2}}})
    with pytest.raises(ConfigError, match="strategy.name 'fednew': it is made up"):
        ExperimentConfig.from_dict({"strategy": {"name": "fednew"}, "privacy": {"mode": "sample"}})
    assert type(build_strategy(exp, num_sites=2)) is fl.FedAvg


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"strategy\.name: invalid value 'fedsgd'; valid choices are 'bulyan', "):
        get_method("fedsgd")
