"""Segmentation federations through the real Flower simulation runtime (tiny sizes: a smoke of the
whole path; the learning curves of the full examples are in bench/RESULTS.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medflower.config import load_experiment

ISBI = "segmentation/isbi2012_em_membrane"
BRAIN = "segmentation/brain_mr_tumour"


def _simulate(exp_yaml: Path, out: Path) -> dict:
    from medflower.simulation.runner import simulate

    return simulate(load_experiment(exp_yaml), out)


@pytest.mark.slow
def test_2d_unet_federation_reports_dice_per_round_and_site(shared_data: Path, tmp_path: Path) -> None:
    root = tmp_path / "isbi"
    for sub in ("image", "label"):
        (root / sub).mkdir(parents=True)
        for i in range(16):
            (root / sub / f"{i}.png").symlink_to(shared_data / ISBI / sub / f"{i}.png")
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        yaml.safe_dump(
            {
                "name": "tiny-seg2d",
                "task": "segmentation",
                "data": {
                    "kind": "folders",
                    "path": "isbi",
                    "image_dir": "image",
                    "label_dir": "label",
                    "size": [32, 32],
                    "intensity": "window",
                    "window": [0, 255],
                    "mask_values": [255, 0],
                    "val_fraction": 0.125,
                    "test_fraction": 0.25,
                },
                "partition": {"kind": "iid", "num_sites": 2, "min_site_size": 2},
                "model": {"name": "unet", "params": {"channels": [8, 16, 32], "strides": [2, 2]}},
                "train": {"rounds": 3, "local_epochs": 3, "batch_size": 2, "lr": 0.01},
            }
        )
    )
    summary = _simulate(exp, tmp_path / "out")
    rounds = summary["rounds"]
    assert len(rounds) == 3
    assert all(0.0 <= r["global_test"]["dice"] <= 1.0 and r["global_test"]["hd95"] >= 0.0 for r in rounds)
    assert set(rounds[-1]["sites_evaluate"]) == {"site-0", "site-1"}
    assert all("val-dice" in m for m in rounds[-1]["sites_evaluate"].values())
    assert {"test-dice", "test-hd95"} <= set(summary["sites_test"]["site-0"])
    # learning happens: the trained model beats the untrained one on the held-out images
    assert summary["final_global_test"]["dice"] > summary["initial_global_test"]["dice"] + 0.05


@pytest.mark.slow
def test_3d_federation_one_patient_per_site_with_sliding_window(shared_data: Path, tmp_path: Path) -> None:
    brain = shared_data / BRAIN
    rows = ["image,label,patient_id"] + [
        f"{brain}/brain{i}_image.nii.gz,{brain}/brain{i}_label.nii.gz,b{i}" for i in (1, 2)
    ]
    (tmp_path / "brain.csv").write_text("\n".join(rows) + "\n")
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        yaml.safe_dump(
            {
                "name": "tiny-seg3d",
                "task": "segmentation",
                "data": {
                    "kind": "manifest",
                    "path": "brain.csv",
                    "size": [32, 32, 16],
                    "slabs": 2,
                    "split_by": "sample",
                    "val_fraction": 0.0,
                    "test_fraction": 0.5,
                    "intensity": "zscore",
                    "patch_size": [16, 16, 8],
                },
                "partition": {"kind": "natural", "group": "patient", "num_sites": 2, "min_site_size": 1},
                "model": {"name": "unet", "spatial_dims": 3, "params": {"channels": [8, 16, 32], "strides": [2, 2]}},
                "train": {"rounds": 1, "local_epochs": 1, "batch_size": 4},
            }
        )
    )
    summary = _simulate(exp, tmp_path / "out")
    (rnd,) = summary["rounds"]
    assert rnd["aggregated"] and set(rnd["sites_train"]) == {"site-0", "site-1"}
    # the server evaluated whole 32x32x8 slabs with 16x16x8 windows (the model's training patch size)
    assert 0.0 <= rnd["global_test"]["dice"] <= 1.0
    assert all(m["num-examples"] == 1 for m in summary["sites_test"].values())  # one test slab per patient
