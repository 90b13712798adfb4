"""``data:`` — which data set the experiment uses and how it is split before partitioning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medflower.schema import ConfigError, rng_field

DataKind = Literal["synthetic", "medmnist", "manifest", "decathlon"]


@dataclass(frozen=True)
class DataConfig:
    """Data set for a simulated federation (or the server's held-out test set).

    ``synthetic`` is medflower's embedded, deterministic synthetic set (no files needed).
    ``medmnist`` reads an official MedMNIST ``.npz`` (``path``), or downloads it by ``name``.
    """

    kind: DataKind = "synthetic"
    path: str | None = None
    name: str | None = None  # medmnist flag, e.g. "breastmnist" (download when path is unset)
    root: str | None = None  # download/cache folder for named data sets
    val_fraction: float = rng_field(0.1, min=0.0, max=0.5)
    test_fraction: float = rng_field(0.2, min=0.0, max=0.5)
    # synthetic set only
    synthetic_samples: int = rng_field(1200, min=50)
    synthetic_classes: int = rng_field(2, min=2, max=10)
    synthetic_size: int = rng_field(28, min=8, max=256)
    synthetic_channels: int = rng_field(1, min=1, max=3)

    def __post_init__(self) -> None:
        if self.kind in ("manifest", "decathlon") and not self.path:
            raise ConfigError(f"data.path: required when data.kind is {self.kind!r}")
        if self.kind == "medmnist" and not (self.path or self.name):
            raise ConfigError("data.path: required when data.kind is 'medmnist' (or set data.name to download)")
