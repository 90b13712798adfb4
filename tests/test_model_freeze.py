"""model.freeze: named parameters stay fixed on every site (linear probing, partial fine-tuning), DP too."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from medflower.config import ExperimentConfig, quickstart_experiment
from medflower.modelspec import build_experiment_model
from medflower.schema import ConfigError
from medflower.server.app import FINAL_MODEL_FILE
from medflower.simulation.inprocess import simulate_inprocess


def _tiny(*freeze: str, privacy: str = "none", init: str | None = None) -> ExperimentConfig:
    exp = quickstart_experiment()
    return replace(
        exp,
        data=replace(exp.data, synthetic_samples=120),
        model=replace(exp.model, freeze=tuple(freeze), init=init),
        train=replace(exp.train, rounds=2),
        privacy=replace(exp.privacy, mode=privacy),
    )


def test_prefixes_match_whole_name_components() -> None:
    model = build_experiment_model(_tiny("features.0", "head.bias"))
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == ["features.0.bias", "features.0.weight", "head.bias"]  # not features.0x, not head.weight


def test_a_prefix_matching_nothing_names_it_and_the_modules() -> None:
    with pytest.raises(ConfigError, match=r"model\.freeze: 'feature' matches no parameter.*features, head"):
        build_experiment_model(_tiny("feature"))


def test_freezing_everything_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"model\.freeze: \['features', 'head'\] freezes every parameter"):
        build_experiment_model(_tiny("features", "head"))


@pytest.mark.slow
@pytest.mark.parametrize("privacy", ["none", "sample"])
def test_a_federation_trains_only_what_is_not_frozen(tmp_path: Path, privacy: str) -> None:
    """Two rounds: the frozen trunk ends where it started (to float rounding of the weighted average), the
    head moves; under DP-SGD too (Opacus computes per-sample gradients for the head only)."""
    start = build_experiment_model(_tiny(privacy=privacy)).state_dict()
    torch.save(start, tmp_path / "start.pt")  # the initial model, given (the coordinator seeds its own init)
    simulate_inprocess(_tiny("features", privacy=privacy, init=str(tmp_path / "start.pt")), tmp_path / "run")
    final = torch.load(tmp_path / "run" / FINAL_MODEL_FILE, weights_only=True)
    for k, v in start.items():
        moved = (final[k] - v).abs().max().item()
        if k.startswith("features."):
            assert moved < 1e-6, k
        else:
            assert moved > 1e-4, k
