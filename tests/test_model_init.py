"""model.init: the coordinator (and compare's baselines) start from given weights; bad files are named."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from medflower.config import ExperimentConfig, load_experiment, quickstart_experiment
from medflower.modelspec import build_experiment_model, initial_model
from medflower.schema import ConfigError
from medflower.server.app import FINAL_MODEL_FILE
from medflower.simulation.inprocess import simulate_inprocess


def _tiny(init: str | None = None, **train: float) -> ExperimentConfig:
    exp = quickstart_experiment()
    return replace(
        exp,
        data=replace(exp.data, synthetic_samples=120),
        model=replace(exp.model, init=init),
        train=replace(exp.train, rounds=1, **train),
    )


def _pretrained(path: Path, exp: ExperimentConfig) -> dict[str, torch.Tensor]:
    """A state dict unlike any seeded initialisation: every tensor filled with a value of its own."""
    state = {
        k: torch.full_like(v, 0.01 * (i + 1))
        for i, (k, v) in enumerate(build_experiment_model(exp).state_dict().items())
    }
    torch.save(state, path)
    return state


def test_initial_model_loads_every_tensor(tmp_path: Path) -> None:
    state = _pretrained(tmp_path / "w.pt", _tiny())
    model = initial_model(_tiny(str(tmp_path / "w.pt")))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_relative_path_is_read_from_the_yaml_folder(tmp_path: Path) -> None:
    state = _pretrained(tmp_path / "w.pt", _tiny())
    cfg = {"data": {"kind": "synthetic", "synthetic_samples": 120}, "model": {"name": "cnn", "init": "w.pt"}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg))
    model = initial_model(load_experiment(tmp_path / "exp.yaml"))
    first = next(iter(state))
    assert torch.equal(model.state_dict()[first], state[first])


def test_the_federation_starts_from_it(tmp_path: Path) -> None:
    """One round at a vanishing learning rate: the final global model is the given weights, not a seeded init."""
    state = _pretrained(tmp_path / "w.pt", _tiny())
    simulate_inprocess(_tiny(str(tmp_path / "w.pt"), lr=1e-9), tmp_path / "run")
    final = torch.load(tmp_path / "run" / FINAL_MODEL_FILE, weights_only=True)
    for k, v in state.items():
        torch.testing.assert_close(final[k], v, atol=1e-6, rtol=0.0)


def test_bad_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.init: .*nowhere\.pt is not a file"):
        initial_model(_tiny(str(tmp_path / "nowhere.pt")))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match=r"model\.init: cannot read .*junk\.pt"):
        initial_model(_tiny(str(tmp_path / "junk.pt")))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ConfigError, match=r"list\.pt holds no state dict"):
        initial_model(_tiny(str(tmp_path / "list.pt")))
    narrow = replace(_tiny(), model=replace(_tiny().model, params={"width": 8}))
    _pretrained(tmp_path / "narrow.pt", narrow)
    with pytest.raises(
        ConfigError, match=r"narrow\.pt does not fit model 'cnn' as configured: shapes \['features\.0\.weight"
    ):
        initial_model(_tiny(str(tmp_path / "narrow.pt")))
    own = build_experiment_model(_tiny()).state_dict()
    torch.save({**own, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(ConfigError, match=r"unexpected \['extra\.weight'\]"):
        initial_model(_tiny(str(tmp_path / "extra.pt")))
    del own["head.bias"]
    torch.save(own, tmp_path / "short.pt")
    with pytest.raises(ConfigError, match=r"missing \['head\.bias'\]"):
        initial_model(_tiny(str(tmp_path / "short.pt")))
