"""Bit-reproducible runs: one YAML and seed give identical ``summary.json`` metrics, run after run.

The fast tests use the in-process grid (``medflower.simulation.inprocess``: the real ServerApp loop
and ClientApp, no Ray); the slow one checks that Flower's simulation engine (Ray) gives the very
same metrics as the in-process grid, whatever order its replies arrive in.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from medflower.config import ExperimentConfig, quickstart_experiment
from medflower.config.privacy import PrivacyConfig
from medflower.seeding import derive_seed, reproducibility
from medflower.simulation.inprocess import simulate_inprocess

VOLATILE = {"wall_seconds", "simulation_wall_seconds", "seconds"}  # clocks, not results


def tiny(**strategy: Any) -> ExperimentConfig:
    """Synthetic quick start, small: 3 sites, 300 images, 2 rounds."""
    exp = quickstart_experiment()
    return replace(
        exp,
        data=replace(exp.data, synthetic_samples=300),
        train=replace(exp.train, rounds=2),
        strategy=replace(exp.strategy, **strategy),
    )


def results(summary: Any) -> Any:
    """The summary without its wall-clock times."""
    if isinstance(summary, dict):
        return {k: results(v) for k, v in summary.items() if k not in VOLATILE}
    if isinstance(summary, list):
        return [results(v) for v in summary]
    return summary


@pytest.mark.parametrize("fraction_train", [1.0, 0.67])  # 0.67: two of three sites, sampled per round
def test_two_inprocess_runs_are_identical(tmp_path: Path, fraction_train: float) -> None:
    exp = tiny(fraction_train=fraction_train)
    a = simulate_inprocess(exp, tmp_path / "a")
    b = simulate_inprocess(exp, tmp_path / "b")
    assert a["reproducible"] is True
    assert results(a) == results(b)
    assert a["final_global_test"]["loss"] is not None  # metrics were really computed
    if fraction_train < 1:
        assert all(len(r["sites_train"]) == 2 for r in a["rounds"])


def test_another_seed_gives_another_run(tmp_path: Path) -> None:
    exp = tiny()
    a = simulate_inprocess(exp, tmp_path / "a")
    b = simulate_inprocess(replace(exp, seed=1), tmp_path / "b")
    assert a["final_global_test"]["loss"] != b["final_global_test"]["loss"]


def test_dp_runs_say_why_they_are_not_reproducible() -> None:
    exp = quickstart_experiment()
    assert reproducibility(exp) == {"reproducible": True}
    dp = reproducibility(replace(exp, privacy=PrivacyConfig(mode="sample", target_epsilon=8.0)))
    assert dp["reproducible"] is False and "privacy.mode is 'sample'" in dp["reproducible_reason"]


def test_derived_seeds_differ_by_stream_and_are_stable() -> None:
    seeds = {derive_seed(0, "train", site, rnd) for site in ("site-0", "site-1") for rnd in (1, 2)}
    assert len(seeds) == 4 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(0, "train", "site-0", 1) == derive_seed(0, "train", "site-0", 1)
    assert derive_seed(0, "train", "site-0", 1) != derive_seed(1, "train", "site-0", 1)


@pytest.mark.slow
def test_ray_engine_matches_the_inprocess_grid(tmp_path: Path) -> None:
    """Flower's simulation engine (Ray: random node ids, replies in arrival order) and the in-process
    grid give the same metrics: replies are aggregated by site, every stream is seeded by site."""
    from medflower.simulation.runner import simulate

    exp = tiny()
    ray = simulate(exp, tmp_path / "ray")
    local = simulate_inprocess(exp, tmp_path / "local")
    assert results(ray) == results(local)


def test_seed_everything_turns_on_deterministic_kernels_without_the_compiler() -> None:
    """The flag torch's public setter sets, set without importing torch._inductor (1.1 s per process)."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from medflower.seeding import seed_everything\n"
        "seed_everything(3)\n"
        "print(torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),"
        " 'torch._inductor.config' in sys.modules, torch.initial_seed())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["True", "True", "False", "3"]
