"""bench/engine.py's pfl-research yardstick: finding an interpreter with pfl, the row it prints, and
bench/pfl_fedavg.py run small on SYNTHETIC sites (skipped where pfl is not installed, as in CI)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from scriptkit import load_script

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def engine() -> ModuleType:
    return load_script("bench/engine.py", "bench_engine")


@pytest.fixture
def python_without_pfl(tmp_path: Path) -> str:
    """This interpreter with site-packages off (``-S``): it cannot find pfl, whether or not it is installed."""
    script = tmp_path / "python-no-site"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    script.chmod(0o755)
    return str(script)


def test_an_interpreter_without_pfl_skips_and_says_how_to_enable_it(engine: ModuleType, python_without_pfl: str):
    python, line = engine.find_pfl(python_without_pfl)
    assert python is None
    assert f"not installed for {python_without_pfl}" in line and "skipped" in line
    assert "--pfl-python" in line and "MEDFLOWER_PFL_PYTHON" in line and "bench-pfl" in line


def test_the_environment_variable_names_the_interpreter(
    engine: ModuleType, python_without_pfl: str, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("MEDFLOWER_PFL_PYTHON", python_without_pfl)
    python, line = engine.find_pfl(None)
    assert python is None and python_without_pfl in line


def test_a_missing_interpreter_is_named(engine: ModuleType, tmp_path: Path):
    missing = str(tmp_path / "no-such-python")
    python, line = engine.find_pfl(missing)
    assert python is None and f"cannot run {missing}" in line and "--pfl-python" in line


def test_without_an_interpreter_given_it_takes_its_own_if_that_has_pfl(
    engine: ModuleType, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("MEDFLOWER_PFL_PYTHON", raising=False)
    python, _ = engine.find_pfl(None)
    has_pfl = importlib.util.find_spec("pfl") is not None
    assert python == (sys.executable if has_pfl else None)


def test_the_row_gives_medflowers_ratios_to_pfl_and_pfls_to_plain(
    engine: ModuleType, capsys: pytest.CaptureFixture[str]
):
    row = {
        "workload": "synthetic",
        "sites": 5,
        "rounds": 20,
        "plain": {"seconds": 40.0, "cpu": 80.0, "accuracy": 0.9, "balanced": 0.9},
        "pfl": {"seconds": 50.0, "cpu": 100.0, "accuracy": 0.9, "balanced": 0.9},
        "local": {"seconds": 45.0, "cpu": 90.0, "accuracy": 0.9, "balanced": 0.9},
    }
    engine.print_row(row, ["local"])
    out = capsys.readouterr().out
    assert "pfl   50.0s (1.25x) cpu  100.0s (1.25x)" in out
    assert "local   45.0s (1.12x) cpu   90.0s (1.12x) acc 0.900 [vs pfl: wall 0.90x cpu 0.90x]" in out
    del row["pfl"]
    engine.print_row(row, ["local"])
    assert "pfl" not in capsys.readouterr().out


def _synthetic_work(folder: Path, rounds: int) -> tuple[Path, Path]:
    """Two SYNTHETIC sites of 16 training, 4 validation and 4 test images (16x16 noise, one half brighter:
    the left for class 0, the right for class 1), a held-out test split of 8, and a recipe that learns
    them in one round, in engine.py's file format."""
    rng = np.random.default_rng(0)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % 2
        x = rng.normal(0, 1, (n, 1, 16, 16)).astype(np.float32)
        for j, c in enumerate(y):
            x[j, 0, :, 8 * c : 8 * c + 8] += 1.0
        return x, y.astype(np.int64)

    arrays: dict[str, np.ndarray] = {}
    arrays["test_x"], arrays["test_y"] = split(8)
    for i in range(2):
        for name, n in (("train", 16), ("val", 4), ("test", 4)):
            arrays[f"{i}_{name}_x"], arrays[f"{i}_{name}_y"] = split(n)
    np.savez(folder / "sites.npz", **arrays)
    model = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "width": 8, "norm": "group"}
    recipe = {"seed": 0, "num_sites": 2, "rounds": rounds, "model": model, "local_epochs": 1, "lr": 1e-2}
    recipe |= {"batch_size": 4, "eval_batch_size": 16, "num_threads": 1}
    (folder / "spec.json").write_text(json.dumps(recipe))
    return folder / "sites.npz", folder / "spec.json"


@pytest.mark.parametrize("rounds", [1, 2])
def test_pfl_does_the_plain_loops_work_on_synthetic_sites(
    rounds: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    pytest.importorskip("pfl", reason="pfl (pfl-research) is not installed: the bench-pfl extra, in a venv of its own")
    monkeypatch.setenv("PFL_PYTORCH_DEVICE", "cpu")
    monkeypatch.syspath_prepend(str(REPO))
    npz, spec = _synthetic_work(tmp_path, rounds)
    finals = {}
    for name in ("plain_fedavg", "pfl_fedavg"):
        importlib.import_module(f"bench.{name}").main(str(npz), str(spec))
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        finals[name] = line["final_global_test"]
        assert math.isfinite(line["loop_seconds"])
    pfl, plain = finals["pfl_fedavg"], finals["plain_fedavg"]
    # The trained model's numbers (the untrained one is at chance here), and the plain loop's: same sites,
    # initial weights, shuffles and recipe give the same model but for float rounding in the average.
    assert pfl["accuracy"] > 0.5 and pfl["balanced-accuracy"] > 0.5
    assert pfl == pytest.approx(plain, abs=1 / 8 + 1e-9)
