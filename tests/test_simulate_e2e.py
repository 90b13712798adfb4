"""End to end through `medflower simulate` (default engine; test_engines.py covers both): the quick start learns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medflower.runenv import FLOWER_ENV

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_learns_through_flower(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, **FLOWER_ENV, "PYTHONPATH": str(REPO)}  # this checkout's medflower, run elsewhere
    proc = subprocess.run(
        [sys.executable, "-m", "medflower.cli", "simulate", "-o", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rounds = summary["rounds"]
    assert len(rounds) == summary["experiment"]["train"]["rounds"]
    assert all(len(r["sites_train"]) == 3 and r["aggregated"] for r in rounds)
    first, last = summary["initial_global_test"], summary["final_global_test"]
    # learning works: the global model beats both its initial self and chance by a wide margin
    assert last["accuracy"] >= 0.8 and last["auc"] >= 0.9, last
    assert last["accuracy"] > first["accuracy"] + 0.2
    assert set(summary["sites_test"]) == {"site-0", "site-1", "site-2"}
    assert sum(s["num-examples"] for s in summary["sites_test"].values()) > 0
    assert "round" in proc.stdout and "site-0" in proc.stdout  # the readable table
    # no terminal: one plain progress line per round (no control characters), and the HTML report
    progress = [line for line in proc.stderr.splitlines() if line.startswith("quickstart-synthetic: round ")]
    assert len(progress) == len(rounds) and progress[-1].startswith("quickstart-synthetic: round 10/10 | 3/3 sites")
    assert not any(c in line for line in progress for c in "\x1b\r")
    assert (out / "report.html").is_file() and f"report: {out / 'report.html'}" in proc.stdout


def test_bad_experiment_exits_with_a_named_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {rounds: -1}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "medflower.cli", "simulate", str(bad)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "bad.yaml: train.rounds: must be >= 1, got -1" in proc.stderr


@pytest.mark.slow
def test_batchnorm_model_federates(tmp_path: Path) -> None:
    """BatchNorm's 0-d int64 `num_batches_tracked` survives aggregation, screening and reloading."""
    from medflower.config import ExperimentConfig
    from medflower.simulation.runner import simulate

    exp = ExperimentConfig.from_dict(
        {
            "name": "bn",
            "data": {"kind": "synthetic", "synthetic_samples": 200},
            "partition": {"num_sites": 2, "alpha": 5.0},
            "model": {"name": "cnn", "norm": "batch"},
            "train": {"rounds": 2},
        }
    )
    summary = simulate(exp, tmp_path / "bn")
    assert [r["aggregated"] for r in summary["rounds"]] == [True, True], summary["rounds"][-1]["failures"]
    assert all(not r["failures"] for r in summary["rounds"])
