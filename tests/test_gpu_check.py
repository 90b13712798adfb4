"""bench/gpu_check.py on a machine without a GPU: its clear exit, and the parts it measures, run small on the CPU."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scriptkit import load_script

from medflower.config import ExperimentConfig
from medflower.models import SmallCNN, count_parameters

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    return load_script("bench/gpu_check.py", "gpu_check")


def test_without_cuda_it_says_so_and_exits_2(gpu_check, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert "gpu_check: no CUDA device here" in capsys.readouterr().err


def test_the_plain_loop_builds_medflowers_cnn(gpu_check) -> None:
    ours = SmallCNN(spatial_dims=2, in_channels=1, out_channels=2, width=32)
    plain = gpu_check.plain_cnn(1, 2)
    assert count_parameters(plain) == count_parameters(ours)
    assert plain(torch.zeros(3, 1, 28, 28)).shape == (3, 2)


def test_the_plain_partition_places_every_image_once(gpu_check) -> None:
    labels = np.random.default_rng(0).integers(0, 3, 500)
    parts = gpu_check.dirichlet_sites(labels, 5, 0.5, 0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(500))


def test_the_experiment_it_writes_is_valid(gpu_check) -> None:
    raw = gpu_check.experiment_yaml(Path("/x/breastmnist.npz"), sites=5, rounds=10, device="cuda")
    exp = ExperimentConfig.from_dict(raw)
    assert exp.train.device == "cuda" and exp.simulation.gpus_per_site == 0.2


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_3d_unet_epoch_runs_small_on_the_cpu(gpu_check, precision: str) -> None:
    out = gpu_check.unet_epoch("cpu", precision, volumes=2, side=16, batch=2)
    assert math.isfinite(out["loss"]) and out["seconds"] > 0
