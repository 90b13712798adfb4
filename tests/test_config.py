"""Experiment YAML validation: every error names the key (and the file, and valid choices)."""

from __future__ import annotations

from pathlib import Path

import pytest

from medflower.config import ConfigError, ExperimentConfig, load_experiment, quickstart_experiment

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def test_quickstart_and_examples_load() -> None:
    qs = quickstart_experiment()
    assert qs.data.kind == "synthetic" and qs.partition.num_sites == 3
    for path in sorted((REPO / "examples").glob("*.yaml")):
        exp = load_experiment(path)
        assert exp.name, path


def test_unknown_key_names_key_and_valid_keys(tmp_path: Path) -> None:
    p = write(tmp_path, "train:\n  roundz: 3\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml: unknown key train\.roundz; valid keys here are .*rounds"):
        load_experiment(p)


def test_unknown_top_level_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key modle"):
        load_experiment(write(tmp_path, "modle: {name: cnn}\n"))


def test_wrong_type_names_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.rounds: expected an integer, got 'five'"):
        load_experiment(write(tmp_path, "train: {rounds: five}\n"))
    with pytest.raises(ConfigError, match=r"train\.lr: expected a number"):
        load_experiment(write(tmp_path, "train: {lr: fast}\n"))
    with pytest.raises(ConfigError, match=r"train\.rounds: expected an integer, got True"):
        load_experiment(write(tmp_path, "train: {rounds: true}\n"))


def test_bad_choice_lists_valid_values(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"train\.optimizer: invalid value 'rmsprop'; valid choices are 'sgd', 'adam', 'adamw'"
    ):
        load_experiment(write(tmp_path, "train: {optimizer: rmsprop}\n"))
    with pytest.raises(ConfigError, match=r"model\.name: invalid value 'resnet1000'.*'resnet18'"):
        load_experiment(write(tmp_path, "model: {name: resnet1000}\n"))


def test_out_of_range(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"partition\.alpha: must be > 0"):
        load_experiment(write(tmp_path, "partition: {alpha: 0}\n"))
    with pytest.raises(ConfigError, match=r"train\.rounds: must be >= 1, got 0"):
        load_experiment(write(tmp_path, "train: {rounds: 0}\n"))
    with pytest.raises(ConfigError, match=r"data\.val_fraction: must be <= 0\.5"):
        load_experiment(write(tmp_path, "data: {val_fraction: 0.9}\n"))


def test_malformed_yaml_names_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"exp\.yaml: not valid YAML"):
        load_experiment(write(tmp_path, "train: {rounds: 3\n"))
    with pytest.raises(ConfigError, match=r"exp\.yaml: the top level must be a mapping"):
        load_experiment(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="experiment file not found"):
        load_experiment(tmp_path / "missing.yaml")


def test_yaml_is_safe_loaded(tmp_path: Path) -> None:
    """A Python tag must not be executed (yaml.safe_load), it is a YAML error."""
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(write(tmp_path, "name: !!python/object/apply:os.system ['echo pwned']\n"))


def test_medmnist_requires_path_or_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.path: required when data\.kind is 'medmnist'"):
        load_experiment(write(tmp_path, "data: {kind: medmnist}\n"))


def test_json_round_trip_keeps_everything(tmp_path: Path) -> None:
    p = write(tmp_path, "name: x\nseed: 3\ndata: {kind: medmnist, path: d/b.npz}\ntrain: {rounds: 2, lr: 0.01}\n")
    exp = load_experiment(p)
    again = ExperimentConfig.from_json(exp.to_json())
    assert again == exp
    assert again.base_dir == str(tmp_path.resolve())
    assert again.resolve_path(again.data.path) == tmp_path.resolve() / "d" / "b.npz"


def test_config_is_frozen() -> None:
    exp = quickstart_experiment()
    with pytest.raises(AttributeError):
        exp.seed = 3  # type: ignore[misc]


def test_fixed_length_tuples_convert_each_item() -> None:
    from dataclasses import dataclass

    from medflower.schema import from_dict

    @dataclass(frozen=True)
    class Pair:
        window: tuple[float, int] = (0.0, 1)

    assert from_dict(Pair, {"window": [1, 2]}).window == (1.0, 2)
    with pytest.raises(ConfigError, match=r"window\[1\]: expected an integer"):
        from_dict(Pair, {"window": [1.5, 2.5]})
