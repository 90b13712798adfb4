"""``medflower explain``: the saliency of a model that learnt a known region peaks in that region."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medflower.data.base import ArraySplit
from medflower.explain import GRADCAM, OCCLUSION, explain_run, explain_split, method_for, saliency
from medflower.models import SmallCNN

SIZE = 32
ROWS, COLS = (6, 12), (18, 24)  # the SYNTHETIC class signal's square (rows, columns: right of centre, upper half)
REGION = (slice(*ROWS), slice(*COLS))
SLACK = 4  # Grad-CAM's map is the last stage's (8x8 here: 4 pixels a cell), upsampled


def synthetic_region_set(n: int, seed: int) -> ArraySplit:
    """SYNTHETIC: noise everywhere; class 1 alone has a bright square in REGION."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    images = rng.normal(0, 0.5, size=(n, 1, SIZE, SIZE)).astype(np.float32)
    images[labels == 1, 0, REGION[0], REGION[1]] += 1.5
    return ArraySplit(images, labels.astype(np.int64))


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    torch.manual_seed(0)
    data = synthetic_region_set(256, seed=1)
    model = SmallCNN(spatial_dims=2, in_channels=1, out_channels=2, width=8)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = torch.from_numpy(data.images), torch.from_numpy(data.targets)
    for _ in range(6):
        for i in range(0, len(x), 32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32]).backward()
            opt.step()
    return model.eval()


@pytest.mark.parametrize("method", [GRADCAM, OCCLUSION])
def test_saliency_peaks_in_the_signal_region(trained: torch.nn.Module, method: str) -> None:
    test = synthetic_region_set(64, seed=2)
    positives = test.subset(np.flatnonzero(test.targets == 1)[:8])
    sal = saliency(trained, positives.images, method=method)
    assert (sal.predicted == 1).mean() >= 0.9  # the model learnt the task
    inside = np.zeros((SIZE, SIZE), dtype=bool)
    inside[REGION] = True
    for m in sal.maps:
        assert m.shape == (SIZE, SIZE)
        assert m[inside].mean() > 2 * m[~inside].mean()
        peak = np.unravel_index(np.argmax(m), m.shape)
        assert ROWS[0] - SLACK <= peak[0] < ROWS[1] + SLACK, (method, peak)
        assert COLS[0] - SLACK <= peak[1] < COLS[1] + SLACK, (method, peak)


def test_method_is_gradcam_for_cnns_and_occlusion_for_the_vit(trained: torch.nn.Module) -> None:
    assert method_for("cnn", trained) == GRADCAM
    assert method_for("vit", trained) == OCCLUSION


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medflower.config import ExperimentConfig
    from medflower.simulation.inprocess import simulate_inprocess

    exp = ExperimentConfig.from_dict(
        {
            "name": "explain-synthetic",
            "data": {"kind": "synthetic", "synthetic_samples": 120},
            "partition": {"num_sites": 2, "alpha": 5.0},
            "model": {"name": "cnn", "params": {"width": 8}},
            "train": {"rounds": 1},
        }
    )
    out = tmp_path_factory.mktemp("run")
    simulate_inprocess(exp, out)
    return out


def test_explain_a_run_folder_and_its_report(run_dir: Path) -> None:
    from PIL import Image

    from medflower.report import build_report

    result = explain_run(run_dir, n=3)
    png, meta = result.paths
    assert png == run_dir / "explain" / "saliency.png"
    assert Image.open(png).size[0] > 100
    assert json.loads(meta.read_text())["method"] == GRADCAM
    assert "Grad-CAM" in result.note and "3 test images" in result.note
    assert "Saliency of the final global model" in build_report(run_dir)


def test_site_option_and_cli(run_dir: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medflower.cli",
            "explain",
            str(run_dir),
            "--site",
            "site-1",
            "-n",
            "2",
            "-o",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "site-1's test split" in proc.stdout and (tmp_path / "saliency.png").is_file()


def test_segmentation_shows_prediction_overlays_and_says_so(tmp_path: Path) -> None:
    from medflower.config import ExperimentConfig, ModelConfig
    from medflower.models import build_model

    exp = ExperimentConfig.from_dict({"name": "seg-synthetic", "task": "segmentation", "model": {"name": "unet"}})
    model = build_model(ModelConfig(name="unet"), in_channels=1, out_channels=2, img_size=(16, 16), task="segmentation")
    rng = np.random.default_rng(0)
    split = ArraySplit(
        rng.normal(size=(2, 1, 16, 16)).astype(np.float32), (rng.random((2, 16, 16)) > 0.7).astype(np.int64)
    )
    result = explain_split(model, exp, split, n=2, out_dir=tmp_path, title="seg")
    assert result.paths[0].name == "predictions.png" and result.paths[0].is_file()
    assert "prediction overlays are shown instead of saliency" in result.note


def test_folder_without_summary_is_an_error_naming_it(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "medflower.cli", "explain", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert f"{tmp_path}: no summary.json" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "medflower.cli", "explain", "--model", str(tmp_path / "model.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--model and --site-config go together" in proc.stderr


def test_a_hospital_explains_the_global_model_on_its_own_data(tmp_path: Path) -> None:
    import yaml
    from sitekit import experiment, write_site

    from medflower.modelspec import build_experiment_model

    exp = experiment()
    site_yaml = write_site(tmp_path / "hospital", "st-synthetic", n=16)
    torch.save(build_experiment_model(exp).state_dict(), tmp_path / "model.pt")
    exp_yaml = tmp_path / "experiment.yaml"
    exp_yaml.write_text(yaml.safe_dump({k: v for k, v in exp.to_dict().items() if k != "base_dir"}))
    cmd = [sys.executable, "-m", "medflower.cli", "explain", "--model", str(tmp_path / "model.pt")]
    cmd += ["--site-config", str(site_yaml), "-n", "2", "-o", str(tmp_path / "out")]
    proc = subprocess.run([*cmd, "--experiment", str(exp_yaml)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "site st-synthetic, its own test split: Grad-CAM" in proc.stdout
    assert (tmp_path / "out" / "saliency.png").is_file()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # no experiment, no summary.json
    assert proc.returncode == 2 and "pass --experiment EXPERIMENT.yaml" in proc.stderr


def test_3d_images_show_the_middle_slice_of_each_axis() -> None:
    from medflower.explain import Saliency, saliency_grid
    from medflower.report.predictions import display_planes

    vol = np.zeros((4, 6, 8), dtype=np.float32)
    vol[2, 3, 4] = 1.0  # the centre voxel lies on every middle slice
    planes = display_planes(vol)
    assert [p.shape for _, p in planes] == [(6, 8), (4, 8), (4, 6)]
    assert all(p.max() == 1.0 for _, p in planes)
    sal = Saliency(vol[None], np.array([1]), np.array([0.9]), GRADCAM)
    assert saliency_grid(vol[None, None], np.array([1]), sal, title="3d")[:8] == b"\x89PNG\r\n\x1a\n"
