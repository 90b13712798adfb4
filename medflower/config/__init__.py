"""The experiment config: one YAML file an administrator or researcher writes.

Loaded with ``yaml.safe_load`` and validated once at the boundary into frozen dataclasses; the
apps exchange it as JSON (``ExperimentConfig.to_json``) and convert to Flower records only at the
edge. Every key is documented in docs/reference.md, generated from these classes by medflower.docgen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from medflower.config.attack import AttackConfig
from medflower.config.data import DataConfig
from medflower.config.model import ModelConfig
from medflower.config.participation import ParticipationConfig
from medflower.config.partition import PartitionConfig
from medflower.config.privacy import PrivacyConfig
from medflower.config.secagg import SecureAggregationConfig, secagg_refusal
from medflower.config.shift import ShiftConfig
from medflower.config.simulation import SimulationConfig
from medflower.config.strategy import StrategyConfig
from medflower.config.tracking import TrackingConfig
from medflower.config.train import TrainConfig
from medflower.schema import ConfigError, from_dict, read_yaml_mapping, rng_field, to_dict
from medflower.strategies.registry import get_method

__all__ = [
    "AttackConfig",
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "ModelConfig",
    "ParticipationConfig",
    "PartitionConfig",
    "PrivacyConfig",
    "SecureAggregationConfig",
    "ShiftConfig",
    "SimulationConfig",
    "StrategyConfig",
    "TrackingConfig",
    "TrainConfig",
    "load_experiment",
    "quickstart_experiment",
]


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    seed: int = rng_field(0, min=0)
    task: Literal["classification", "segmentation"] = "classification"
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    participation: ParticipationConfig = field(default_factory=ParticipationConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)  # SIMULATION-ONLY poisoning (research)
    shift: ShiftConfig = field(default_factory=ShiftConfig)  # per-site scanner shift (simulation)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)  # how `medflower simulate` runs sites
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)  # SecAgg+
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # TensorBoard / MLflow (optional extra)
    # where relative data paths are resolved from (the YAML's folder); not a YAML key
    base_dir: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        self.shift.check_sites(self.partition.num_sites)  # a typo'd site name must not go unshifted
        refusal = get_method(self.strategy.name).refusal(self.privacy.mode)
        if refusal is not None:  # declared by the method's module (medflower.strategies.methods)
            raise ConfigError(
                f"privacy.mode {self.privacy.mode!r} cannot be combined with strategy.name "
                f"{self.strategy.name!r}: {refusal}"
            )
        if self.privacy.mode == "sample" and self.train.precision != "fp32":
            raise ConfigError(
                f"train.precision {self.train.precision!r} cannot be combined with privacy.mode 'sample': Opacus "
                "would compute and clip per-sample gradients in 16 bits, whose rounding can leave a clipped "
                "gradient above privacy.max_grad_norm and weaken the guarantee; use train.precision 'fp32'"
            )
        if self.model.whiten_features and self.privacy.mode == "client":
            raise ConfigError(
                "model.whiten_features cannot be combined with privacy.mode 'client': client-level DP noises every "
                "array of the global model, the head's fixed whitening included; use privacy.mode 'sample' "
                "(DP-SGD noises the trained parameters only) or model.whiten_features: false"
            )
        if self.privacy.feature_stats_noise is not None and (
            self.privacy.mode != "sample" or not self.model.whiten_features
        ):
            raise ConfigError(
                "privacy.feature_stats_noise standardises the head's input (model.whiten_features) with statistics "
                "the sites release under DP-SGD's ledger: it needs privacy.mode 'sample' and model.whiten_features: "
                f"true (got privacy.mode {self.privacy.mode!r}, model.whiten_features {self.model.whiten_features})"
            )
        if self.privacy.feature_stats_noise is not None and self.secure_aggregation.enabled:
            raise ConfigError(
                "privacy.feature_stats_noise cannot be combined with secure_aggregation.mode 'secagg+': each site's "
                "noised feature sums reach the coordinator unmasked, and secure aggregation promises it sees sums "
                "over sites only; remove privacy.feature_stats_noise (the synthetic whitening alone) or the masking"
            )
        self.check_secure_aggregation()

    def check_secure_aggregation(self) -> None:
        """``secure_aggregation`` against the federation's size and the other sections (errors name both keys)."""
        sa = self.secure_aggregation
        sa.check_sites(self.partition.num_sites)
        why = secagg_refusal(
            sa,
            method_refusal=get_method(self.strategy.name).secure_aggregation,
            strategy_name=self.strategy.name,
            max_update_norm=self.strategy.max_update_norm,
            weighting=self.strategy.weighting,
            privacy_mode=self.privacy.mode,
            clipping_side=self.privacy.clipping_side,
        )
        if why is not None:
            raise ConfigError(why)
        sampled = max(int(self.partition.num_sites * self.strategy.fraction_train), 1)
        if sa.enabled and sa.reconstruction_threshold > sampled:
            raise ConfigError(
                f"secure_aggregation.reconstruction_threshold: {sa.reconstruction_threshold} is larger than the "
                f"{sampled} site(s) a round samples (partition.num_sites {self.partition.num_sites} x "
                f"strategy.fraction_train {self.strategy.fraction_train}); no round could be unmasked"
            )

    @classmethod
    def from_dict(cls, data: Any, *, base_dir: str | Path = "") -> ExperimentConfig:
        if isinstance(data, dict) and "base_dir" in data and base_dir == "":
            base_dir = data["base_dir"]
            data = {k: v for k, v in data.items() if k != "base_dir"}
        elif isinstance(data, dict) and "base_dir" in data:
            raise ConfigError("unknown key base_dir; it is set from the YAML file's location")
        exp = from_dict(cls, data)
        return replace(exp, base_dir=str(base_dir))

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ExperimentConfig:
        return cls.from_dict(json.loads(text))

    def resolve_path(self, path: str | None) -> Path | None:
        """Resolve a data path relative to the YAML file that named it."""
        if path is None:
            return None
        p = Path(path).expanduser()
        if not p.is_absolute() and self.base_dir:
            p = Path(self.base_dir) / p
        return p


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment YAML; errors name the file and the key."""
    path = Path(path)
    data = read_yaml_mapping(path, what="experiment")
    try:
        return ExperimentConfig.from_dict(data, base_dir=path.resolve().parent)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def quickstart_experiment() -> ExperimentConfig:
    """The embedded quick start: synthetic data, 3 sites, a small CNN (runs in well under 2 min)."""
    text = resources.files("medflower").joinpath("quickstart.yaml").read_text(encoding="utf-8")
    return ExperimentConfig.from_dict(yaml.safe_load(text))
