"""``report.html``: built from a real (tiny, synthetic) run, rendered in headless Chromium, offline."""

from __future__ import annotations

import copy
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from medflower.report import RunFolderError, build_report, write_report
from medflower.report.html import fmt

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
NO_CHROMIUM = "Debian's chromium is not installed (apt-get install chromium; .ci/run installs it when run as root)"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run: 2 synthetic sites, 2 rounds, in-process grid (summary.json and model.pt)."""
    from medflower.config import ExperimentConfig
    from medflower.simulation.inprocess import simulate_inprocess

    exp = ExperimentConfig.from_dict(
        {
            "name": "report-synthetic",
            "data": {"kind": "synthetic", "synthetic_samples": 160, "synthetic_classes": 3},
            "partition": {"num_sites": 2, "alpha": 5.0},
            "model": {"name": "cnn", "params": {"width": 8}},
            "train": {"rounds": 2},
        }
    )
    out = tmp_path_factory.mktemp("run")
    simulate_inprocess(exp, out)
    return out


def final_metric_texts(summary: dict[str, Any]) -> list[str]:
    return [fmt(v) for v in summary["final_global_test"].values() if isinstance(v, float)]


def test_report_is_self_contained_and_holds_the_final_metrics(run_dir: Path) -> None:
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    text = path.read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    for value in final_metric_texts(summary):
        assert value in text
    assert "Confusion matrix" in text  # computed from model.pt on the test split
    assert text.count("data:image/png;base64,") >= 2  # learning curves and the confusion matrix
    # nothing to fetch: no external script, stylesheet, image or font
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)
    assert "<script" not in text


def test_confusion_matrix_counts_the_test_split(run_dir: Path) -> None:
    from medflower.data import load_dataset
    from medflower.report.predictions import confusion_matrix, load_run

    run = load_run(run_dir)
    matrix, labels = confusion_matrix(run)
    test = load_dataset(run.exp).test
    assert matrix.shape == (3, 3) and labels == ["0", "1", "2"]
    assert matrix.sum() == len(test)
    assert list(matrix.sum(axis=1)) == [int((test.targets == k).sum()) for k in range(3)]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert np.trace(matrix) / matrix.sum() == pytest.approx(summary["final_global_test"]["accuracy"], abs=1e-6)


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_chromium_renders_the_report(run_dir: Path, tmp_path: Path) -> None:
    path = write_report(run_dir, tmp_path / "page.html")
    shot = tmp_path / "shot.png"
    base = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    url = path.resolve().as_uri()
    subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1280,2000", url], check=True, timeout=120, capture_output=True
    )
    img = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("L"), dtype=float)
    assert img.shape == (2000, 1280)
    dark = (img < 200).mean()
    assert dark > 0.02, f"the screenshot is (nearly) blank: {dark:.2%} non-white pixels"
    assert img.std() > 10
    dom = subprocess.run([*base, "--dump-dom", url], check=True, timeout=120, capture_output=True, text=True).stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    for value in final_metric_texts(summary):
        assert value in dom
    assert "Learning curves" in dom and "Sites: final test metrics" in dom


def synthetic_dp_summary(run_dir: Path) -> dict[str, Any]:
    """The real run's summary with a (synthetic) sample-level DP ledger, a failure and a refusal added."""
    s = json.loads((run_dir / "summary.json").read_text())
    s = copy.deepcopy(s)
    for r in s["rounds"]:
        for i, (_name, m) in enumerate(sorted(r["sites_train"].items())):
            m.update({"dp-epsilon": 0.7 * r["round"] * (i + 1), "dp-target-epsilon": 3.0 - i, "dp-delta": 1e-5})
    last = s["rounds"][-1]
    last["sites_train"]["site-1"]["dp-budget-exhausted"] = 1.0
    last["failures"] = [{"site": "site-9", "node_id": 9, "reason": "no reply within round_timeout=60s"}]
    last["refusals"] = [{"site": "site-1", "node_id": 2, "what": "training", "reason": "privacy budget spent"}]
    return s


def test_ledger_failures_and_refusals_are_shown(run_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "dp"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps(synthetic_dp_summary(run_dir)))
    text = build_report(folder)
    assert "Privacy ledger" in text
    assert "round 2: site-9 failed in training: no reply within round_timeout=60s" in text
    assert "round 2: site-1 refused training: privacy budget spent" in text
    ledger = text[text.index("Privacy ledger") :]
    assert fmt(0.7 * 2 * 2) in ledger and fmt(2.0) in ledger  # site-1's last epsilon and its budget


def test_compare_and_sweep_files_are_included(tmp_path: Path) -> None:
    (tmp_path / "compare.json").write_text("{}")
    (tmp_path / "compare.md").write_text(
        "## Synthetic comparison\n\n| model | site-0 |\n|---|---|\n| pooled | 0.91 |\n"
    )
    (tmp_path / "table.csv").write_text("method,auc,ci_low,ci_high\nfedavg,0.812,0.79,0.83\n")
    (tmp_path / "runs.jsonl").write_text('{"run": 1}\n{"run": 2}\n')
    text = build_report(tmp_path)
    assert "Synthetic comparison" in text and '<td class="l">pooled</td>' in text
    assert "fedavg" in text and "0.8120" in text and "2 runs recorded" in text


def test_folder_without_summary_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(RunFolderError, match=re.escape(f"{tmp_path}: no summary.json")):
        write_report(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "medflower.cli", "report", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert f"{tmp_path}: no summary.json" in proc.stderr
