"""``medflower partition`` (preview) and ``medflower compare`` (pooled / local-only / federated, cross-site)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from medflower.cli import main
from medflower.config import ExperimentConfig
from medflower.simulation.compare import POOLED_TEST, derive, run_compare

TINY = """
name: tiny-shift
seed: 3
data: {kind: synthetic, synthetic_samples: 240}
partition: {kind: dirichlet, num_sites: 3, alpha: 5.0, min_site_size: 20}
shift:
  sites:
    site-1: strong
    site-2: {preset: bright-high-contrast, noise_std: 0.05}
model: {name: cnn, params: {width: 8}}
train: {rounds: 2, local_epochs: 1, batch_size: 32, lr: 0.003}
"""


def tiny(tmp_path: Path, text: str = TINY) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def test_partition_preview_prints_tables_and_writes_plots(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "preview"
    assert main(["partition", str(tiny(tmp_path)), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "site identifiability" in printed and "strong: bias_field=0.4" in printed
    assert "| site-2 " in printed and "(SYNTHETIC)" in printed
    for png in ("labels.png", "samples.png", "intensity.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    report = json.loads((out / "partition.json").read_text())
    assert set(report["sizes"]) == {"site-0", "site-1", "site-2"}
    assert report["dataset"]["placed"] == report["dataset"]["sizes"]  # every image placed
    assert sum(sum(h["train"]) for h in report["labels"].values()) == report["dataset"]["sizes"]["train"]
    assert report["sites"]["site-1"]["preset"] == "strong"
    ident = report["identifiability"]
    assert ident["chance"] == pytest.approx(1 / 3)
    # two of three sites have a strong, distinct scanner: clearly above chance
    assert ident["balanced_accuracy"] > 0.55, ident
    # the shifted sites' intensities moved; the unshifted site's did not
    inten = report["intensity"]
    assert abs(inten["site-2"]["mean"] - inten["site-0"]["mean"]) > 0.1


def test_identifiability_is_near_chance_without_shift(tmp_path: Path) -> None:
    from medflower.simulation.measure import site_identifiability
    from medflower.simulation.sites import build_sites

    exp = ExperimentConfig.from_dict(
        {
            "seed": 3,
            "data": {"kind": "synthetic", "synthetic_samples": 240},
            "partition": {"kind": "iid", "num_sites": 3},
        }
    )
    ident = site_identifiability(build_sites(exp), seed=0)
    assert ident["balanced_accuracy"] < 0.5, ident  # chance is 0.333


def test_derive_reads_the_matrix_correctly() -> None:
    names = ["site-0", "site-1"]
    cell = lambda a: {"accuracy": a}  # noqa: E731
    matrix = {
        "pooled": {"site-0": cell(0.9), "site-1": cell(0.7), POOLED_TEST: cell(0.8)},
        "federated": {"site-0": cell(0.85), "site-1": cell(0.75), POOLED_TEST: cell(0.78)},
        "local:site-0": {"site-0": cell(0.9), "site-1": cell(0.5), POOLED_TEST: cell(0.7)},
        "local:site-1": {"site-0": cell(0.4), "site-1": cell(0.8), POOLED_TEST: cell(0.6)},
    }
    d = derive(matrix, names, "accuracy")
    assert d["local_own_site"] == {"site-0": 0.9, "site-1": 0.8}
    assert d["local_other_sites"] == {"site-0": 0.5, "site-1": 0.4}
    assert d["local_pooled_test_mean"] == pytest.approx(0.65)
    assert d["federated_pooled_test"] == 0.78 and d["federated_site_worst"] == 0.75
    assert d["pooled_site_mean"] == pytest.approx(0.8)
    matrix["local:site-1"]["site-0"] = {"accuracy": math.nan}  # undefined cells are skipped, not zeros
    again = derive(matrix, names, "accuracy")
    assert math.isnan(again["local_other_sites"]["site-1"])
    assert again["local_other_sites_mean"] == pytest.approx(0.5)


def test_compare_baselines_fill_the_matrix(tmp_path: Path) -> None:
    from medflower.config import load_experiment

    exp = load_experiment(tiny(tmp_path))
    res = run_compare(exp, tmp_path / "cmp", federated=False, identifiability=False)
    names = ["site-0", "site-1", "site-2"]
    assert list(res["matrix"]) == ["pooled"] + [f"local:{n}" for n in names]
    for row in res["matrix"].values():
        assert set(row) == set(names) | {POOLED_TEST}
    assert res["test_sizes"][POOLED_TEST] == sum(res["test_sizes"][n] for n in names)
    assert res["budget_epochs"] == 2
    d = res["derived"]["accuracy"]
    for n in names:
        assert d["local_own_site"][n] == res["matrix"][f"local:{n}"][n]["accuracy"]
    written = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert written["matrix"]["pooled"][POOLED_TEST]["accuracy"] == pytest.approx(
        res["matrix"]["pooled"][POOLED_TEST]["accuracy"]
    )
    assert "| local:site-1" in (tmp_path / "cmp" / "compare.md").read_text()
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000


@pytest.mark.slow
def test_compare_through_flower_matches_the_clients_own_evaluation(tmp_path: Path) -> None:
    """The federated row comes from the real Flower run; its per-site numbers equal the clients' own
    test evaluation, which they computed on sites (and scanner shifts) rebuilt in other processes."""
    out = tmp_path / "cmp"
    assert main(["compare", str(tiny(tmp_path)), "-o", str(out), "--no-identifiability"]) == 0
    res = json.loads((out / "compare.json").read_text())
    summary = json.loads((out / "federated" / "summary.json").read_text())
    assert list(res["matrix"])[:2] == ["pooled", "federated"]
    for site, metrics in summary["sites_test"].items():
        assert res["matrix"]["federated"][site]["accuracy"] == pytest.approx(metrics["test-accuracy"], abs=1e-6)
        assert res["test_sizes"][site] == metrics["num-examples"]
    assert np.isfinite(res["derived"]["accuracy"]["federated_pooled_test"])
