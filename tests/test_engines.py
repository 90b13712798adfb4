"""``simulation.engine``: the local engine and Flower's Ray engine drive the same apps to the same metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from medflower.config import ConfigError, ExperimentConfig

TINY = {
    "name": "engines",
    "seed": 3,
    "data": {"kind": "synthetic", "synthetic_samples": 160},
    "partition": {"num_sites": 3, "alpha": 5.0},
    "model": {"name": "cnn", "params": {"width": 8}},
    "train": {"rounds": 2, "batch_size": 32},
}


def _metrics(summary: dict[str, Any]) -> list[tuple[str, float]]:
    """Every number a run reports about learning (not its timings), in a fixed order."""
    out: list[tuple[str, float]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k in sorted(value):
                walk(f"{prefix}.{k}", value[k])
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(f"{prefix}[{i}]", v)
        elif isinstance(value, int | float) and not isinstance(value, bool) and "seconds" not in prefix:
            out.append((prefix, float(value)))

    for key in ("initial_global_test", "rounds", "final_global_test", "sites_test"):
        walk(key, summary[key])
    return out


def test_unknown_engine_gets_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"simulation.engine: .*'local', 'ray'"):
        ExperimentConfig.from_dict({"simulation": {"engine": "spark"}})


def test_default_engine_is_local() -> None:
    assert ExperimentConfig().simulation.engine == "local"


def test_ray_address_needs_the_ray_engine(tmp_path: Path) -> None:
    from medflower.simulation.runner import simulate

    with pytest.raises(ValueError, match="only engine 'ray'"):
        simulate(ExperimentConfig.from_dict(TINY), tmp_path, engine="local", ray_address="127.0.0.1:1")


@pytest.mark.slow
def test_local_and_ray_engines_give_the_same_metrics(tmp_path: Path) -> None:
    from medflower.simulation.runner import simulate

    exp = ExperimentConfig.from_dict(TINY)
    local = simulate(exp, tmp_path / "local", engine="local")
    ray = simulate(exp, tmp_path / "ray", engine="ray")
    a, b = _metrics(local), _metrics(ray)
    assert [k for k, _ in a] == [k for k, _ in b]
    assert len(a) > 50  # the comparison covers every round's train, evaluate and global test metrics
    # Bit-equal: replies are aggregated in a canonical order, by site, whatever order Ray returns
    # them in (medflower.server.canonical), and every random stream derives from the seed.
    diffs = [(k, x, y) for (k, x), (_, y) in zip(a, b, strict=True) if x != y]
    assert not diffs, diffs[:10]


def test_ray_joins_a_cluster_from_the_flag_or_ray_address(monkeypatch: pytest.MonkeyPatch) -> None:
    from medflower.simulation.runner import ray_init_args

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert "address" not in ray_init_args(None) and ray_init_args(None)["num_cpus"] >= 1  # a new local Ray
    # joining a cluster: its nodes declare their CPUs (ray.init refuses num_cpus with an address)
    assert ray_init_args("10.0.0.5:6379")["address"] == "10.0.0.5:6379"
    assert "num_cpus" not in ray_init_args("10.0.0.5:6379")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.7:6379")
    assert ray_init_args(None)["address"] == "10.0.0.7:6379" and "num_cpus" not in ray_init_args(None)
    assert ray_init_args("10.0.0.5:6379")["address"] == "10.0.0.5:6379"  # the flag wins


def test_simulate_cli_takes_an_engine_and_a_ray_address() -> None:
    import argparse

    from medflower.cli.simulation import add_parsers

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers())
    args = parser.parse_args(["simulate", "--ray-address", "10.0.0.5:6379"])
    assert args.ray_address == "10.0.0.5:6379" and args.engine is None
    with pytest.raises(SystemExit):
        parser.parse_args(["simulate", "--engine", "spark"])
