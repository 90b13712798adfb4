"""``medflower sweep``: validation before any run, resumption, and the CI tables (hand-computed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from medflower.cli.commands import main
from medflower.schema import ConfigError
from medflower.simulation.sweep import _t_quantile_formula, load_sweep, mean_ci, run_sweep, set_dotted

# synthetic quick start, small: 3 sites, 200 images, 1 round
BASE = {
    "name": "sweep-synthetic",
    "data": {"kind": "synthetic", "synthetic_samples": 200},
    "partition": {"num_sites": 3, "alpha": 5.0},
    "model": {"name": "cnn"},
    "train": {"rounds": 1},
}


def write(tmp_path: Path, grid: dict, base: object = None) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": BASE if base is None else base, "grid": grid}))
    return path


def test_mean_and_t_interval_by_hand() -> None:
    # [1, 2, 3]: mean 2, sd 1; t(0.975, 2) = 0.95 / sqrt(2 * 0.975 * 0.025) = 4.302653; half width 4.302653 / sqrt 3
    s = mean_ci([1.0, 2.0, 3.0])
    assert (s["n"], s["mean"], s["sd"]) == (3, 2.0, 1.0)
    assert s["ci_low"] == pytest.approx(2 - 2.484138, abs=1e-6) and s["ci_high"] == pytest.approx(
        2 + 2.484138, abs=1e-6
    )
    assert mean_ci([0.5]) == {"n": 1, "mean": 0.5, "sd": None, "ci_low": None, "ci_high": None}
    # the formula without SciPy: exact for 1 and 2 degrees of freedom, Cornish-Fisher from 3
    assert _t_quantile_formula(0.975, 1) == pytest.approx(12.706205, abs=1e-6)
    assert _t_quantile_formula(0.975, 2) == pytest.approx(4.302653, abs=1e-6)
    assert _t_quantile_formula(0.975, 10) == pytest.approx(2.228139, abs=1e-4)


def test_dotted_keys_set_nested_values() -> None:
    assert set_dotted({"train": {"rounds": 1}}, "train.lr", 0.1) == {"train": {"rounds": 1, "lr": 0.1}}
    with pytest.raises(ConfigError, match="seed is 0, not a mapping"):
        set_dotted({"seed": 0}, "seed.x", 1)


def test_unknown_key_is_named_before_any_run(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"grid combination seed = 0, train\.rounds_x = 2: unknown key train\.rounds_x"
    ):
        load_sweep(write(tmp_path, {"seed": [0], "train.rounds_x": [2]}))


def test_bad_value_is_named_with_its_key_before_any_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"strategy\.name = 'fedavgx'.*valid choices"):
        load_sweep(write(tmp_path, {"strategy.name": ["fedavg", "fedavgx"]}))
    with pytest.raises(ConfigError, match=r"train\.lr = -1.*train\.lr"):
        load_sweep(write(tmp_path, {"train.lr": [0.01, -1]}))


def test_more_than_1000_runs_needs_yes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, {"seed": list(range(1001))})
    assert main(["sweep", str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "1001 runs" in err and "--yes" in err
    assert len(load_sweep(path, allow_many=True).runs) == 1001  # with --yes: planned (and validated)


def test_base_path_resolves_from_the_sweep_file(tmp_path: Path) -> None:
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(BASE))
    sweep = load_sweep(write(tmp_path, {"seed": [0, 1]}, base="exp.yaml"))
    assert [r.name for r in sweep.runs] == ["seed=0", "seed=1"]
    assert [r.exp.seed for r in sweep.runs] == [0, 1] and sweep.runs[0].exp.base_dir == str(tmp_path.resolve())


@pytest.mark.slow
def test_sweep_runs_resumes_and_writes_tables(tmp_path: Path) -> None:
    sweep = load_sweep(write(tmp_path, {"seed": [0, 1], "strategy.name": ["fedavg", "fedmedian"]}))
    out = tmp_path / "out"
    recs = run_sweep(sweep, out)
    assert [r["run"] for r in recs] == [
        "seed=0__strategy.name=fedavg",
        "seed=0__strategy.name=fedmedian",
        "seed=1__strategy.name=fedavg",
        "seed=1__strategy.name=fedmedian",
    ]
    lines = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert lines == recs and lines[0]["keys"] == {"seed": 0, "strategy.name": "fedavg"}
    assert lines[0]["final"]["auc"] is not None and lines[0]["wall_seconds"] > 0
    table = (out / "table.md").read_text()
    assert "| strategy.name | runs |" in table and "| fedavg | 2 |" in table and "[" in table  # CI over 2 seeds
    csv_rows = (out / "table.csv").read_text().splitlines()
    assert csv_rows[0].startswith("strategy.name,runs,final auc n,final auc mean") and len(csv_rows) == 3
    # a killed sweep: one run lost its summary; only that one runs again, and gives the same numbers
    done = out / "seed=0__strategy.name=fedavg" / "summary.json"
    kept = out / "seed=1__strategy.name=fedmedian" / "summary.json"
    done.unlink()
    stamp = kept.stat().st_mtime_ns
    again = run_sweep(sweep, out)
    assert kept.stat().st_mtime_ns == stamp
    assert again[0]["final"] == recs[0]["final"] and not math.isnan(again[0]["final"]["loss"])


def test_cases_vary_together_and_name_the_runs(tmp_path: Path) -> None:
    path = tmp_path / "sweep.yaml"
    cases = [{"strategy.name": "fedavg"}, {"strategy.name": "scaffold", "train.optimizer": "sgd", "train.lr": 0.05}]
    path.write_text(yaml.safe_dump({"base": BASE, "grid": {"seed": [0, 1]}, "cases": cases}, sort_keys=False))
    sweep = load_sweep(path)
    assert sweep.varying == ["strategy.name", "train.optimizer", "train.lr", "seed"]
    assert [r.name for r in sweep.runs][:2] == [
        "strategy.name=fedavg__seed=0",
        "strategy.name=fedavg__seed=1",
    ]
    assert [(r.exp.strategy.name, r.exp.train.optimizer) for r in sweep.runs[2:]] == [("scaffold", "sgd")] * 2
    path.write_text(yaml.safe_dump({"base": BASE, "grid": {"seed": [0]}, "cases": [{"seed": 1}]}))
    with pytest.raises(ConfigError, match=r"cases\[0\] sets seed, which grid varies too"):
        load_sweep(path)


def test_sweep_command_writes_a_report_with_its_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, {"seed": [0, 1]})
    out = tmp_path / "out"
    assert main(["sweep", str(path), "-o", str(out)]) == 0
    page = (out / "report.html").read_text()
    header, row = (out / "table.csv").read_text().splitlines()[:2]
    mean_auc = float(row.split(",")[header.split(",").index("final auc mean")])
    assert "Sweep" in page and "final auc mean" in page and f"{mean_auc:.3f}" in page  # the table, with its numbers
    assert "report:" in capsys.readouterr().out


@pytest.mark.parametrize("sweep_file", sorted((Path(__file__).parents[1] / "bench" / "sweeps").glob("*.yaml")))
def test_the_benchmark_sweeps_validate(sweep_file: Path, shared_data: Path) -> None:
    """Every sweep bench/ runs builds every one of its experiments (they name ../shared beside the checkout)."""
    if shared_data.resolve() != (sweep_file.parents[3] / "shared" / "data").resolve():
        pytest.skip(f"the sweeps name ../shared/data beside the checkout; the data is at {shared_data}")
    sweep = load_sweep(sweep_file, allow_many=True)
    assert sweep.runs and all(run.exp.train.rounds >= 1 for run in sweep.runs)
