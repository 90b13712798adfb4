"""bench/strategy_benchmark.py's paired comparison: differences on the same seed, by hand."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from scriptkit import load_script


def _bench() -> ModuleType:
    return load_script("bench/strategy_benchmark.py", "bench_strategy")


def _run(strategy: str, alpha: float, seed: int, auc: float) -> dict[str, Any]:
    keys = {"strategy.name": strategy, "partition.alpha": alpha, "seed": seed}
    return {"keys": keys, "final": {"auc": auc}}


def _row(table: str, strategy: str) -> list[str]:
    line = next(ln for ln in table.splitlines() if f"| {strategy} |" in ln)
    return [c.strip() for c in line.strip("|").split("|")]


def test_paired_differences_by_hand() -> None:
    runs = [_run("fedavg", 1.0, s, a) for s, a in ((0, 0.50), (1, 0.70), (2, 0.60))]
    # +0.10, +0.12, +0.08 on the same seeds: mean 0.10, sd 0.02, t(0.975, 2) = 4.3027 -> half width 0.0497
    runs += [_run("fedmedian", 1.0, s, a) for s, a in ((0, 0.60), (1, 0.82), (2, 0.68))]
    # -0.2, +0.1, 0.0 (seed 3 has no fedavg run: left out): mean -0.0333, CI contains 0
    runs += [_run("scaffold", 1.0, s, a) for s, a in ((0, 0.30), (1, 0.80), (2, 0.60), (3, 0.90))]
    table = _bench().paired(runs)
    median = _row(table, "fedmedian")
    assert median[:3] == ["partition.alpha 1.0", "fedmedian", "3"]
    assert median[3] == "+0.100 ± 0.020 [+0.050, +0.150]" and median[4] == "better"
    scaffold = _row(table, "scaffold")
    assert scaffold[2] == "3" and scaffold[3].startswith("-0.033 ± 0.153") and scaffold[4] == "no"


def test_paired_worse_and_too_few_seeds() -> None:
    runs = [_run("fedavg", 0.5, s, 0.8) for s in (0, 1)] + [_run("fedavg", 0.1, 0, 0.7)]
    runs += [_run("fedprox", 0.5, s, a) for s, a in ((0, 0.70), (1, 0.71))]
    runs += [_run("fedprox", 0.1, 0, 0.9)]
    table = _bench().paired(runs)
    lines = [ln for ln in table.splitlines() if "| fedprox |" in ln]
    assert lines[0].endswith("| worse |")  # -0.10, -0.09: both below 0, sd small
    assert lines[1] == "| partition.alpha 0.1 | fedprox | 1 | – | – |"
