"""``partition:`` — how a data set is split into simulated hospitals (see :mod:`simulation.partition`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medflower.schema import rng_field


@dataclass(frozen=True)
class PartitionConfig:
    kind: Literal["iid", "dirichlet"] = "dirichlet"
    num_sites: int = rng_field(3, min=1, max=1000)
    alpha: float = rng_field(0.5, min=0.0, exclusive_min=True)
    min_site_size: int = rng_field(10, min=0)
