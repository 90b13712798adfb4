"""``tracking:``: TensorBoard event files and an MLflow store receive the run, read back with their own tools."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from medflower.config import ConfigError, ExperimentConfig
from medflower.simulation.inprocess import simulate_inprocess


def tiny(tracking: dict[str, Any]) -> ExperimentConfig:
    return ExperimentConfig.from_dict(
        {
            "name": "tracking-synthetic",
            "data": {"kind": "synthetic", "synthetic_samples": 120},
            "partition": {"num_sites": 2, "alpha": 5.0},
            "model": {"name": "cnn", "params": {"width": 8}},
            "train": {"rounds": 2, "lr": 0.01},
            "tracking": tracking,
        }
    )


def test_tensorboard_and_mlflow_receive_every_round(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason='the tracking extra: pip install -e ".[tracking]"')
    pytest.importorskip("mlflow", reason='the tracking extra: pip install -e ".[tracking]"')
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = simulate_inprocess(tiny({"tensorboard": "tb", "mlflow": "local"}), tmp_path)
    rounds = summary["rounds"]

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"global_test/accuracy", "train/train-loss", "round/seconds", "site/site-0/val-accuracy"} <= tags
    got = [(e.step, e.value) for e in acc.Scalars("global_test/accuracy")]
    want = [(r["round"], r["global_test"]["accuracy"]) for r in rounds]
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)  # float32 in the event file

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tracking-synthetic")
    assert exp is not None
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.rounds"] == "2" and run.data.params["model.name"] == "cnn"
    history = client.get_metric_history(run.info.run_id, "global_test/accuracy")
    assert sorted((m.step, m.value) for m in history) == pytest.approx(want)
    losses = client.get_metric_history(run.info.run_id, "site/site-1/train-loss")
    assert [m.step for m in sorted(losses, key=lambda m: m.step)] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "report.html", "model.pt"} <= artifacts
    logged = Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path / "dl")))
    assert json.loads(logged.read_text())["final_global_test"] == summary["final_global_test"]


def test_missing_extra_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medflower.server.tracking import require_extra

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the package were not installed
    with pytest.raises(
        ConfigError, match=r'tracking\.mlflow: the mlflow package is not installed.*pip install -e "\.\[tracking\]"'
    ):
        require_extra(tiny({"mlflow": "local"}).tracking)
    with pytest.raises(ConfigError, match=r"tracking\.mlflow: .*not installed"):
        simulate_inprocess(tiny({"mlflow": "local"}), tmp_path)


@pytest.mark.parametrize(
    ("tracking", "message"),
    [
        ({"wandb": "x"}, "unknown key tracking.wandb; valid keys here are mlflow, mlflow_experiment, tensorboard"),
        (
            {"mlflow": "wandb://x"},
            "tracking.mlflow: 'wandb://x' is not an MLflow tracking URI; valid: 'local' or a URI",
        ),
        ({"tensorboard": " "}, "tracking.tensorboard: an empty folder name"),
    ],
)
def test_bad_tracking_config_names_the_choices(tracking: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        tiny(tracking)


def test_no_tracking_section_tracks_nothing(tmp_path: Path) -> None:
    simulate_inprocess(tiny({}), tmp_path)
    assert not (tmp_path / "mlflow").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "summary.json"]
