"""``simulation:`` — how ``medflower simulate`` runs the sites on this machine.

Example (experiment YAML)::

    simulation:
      cpus_per_site: 2      # CPU cores Flower's engine reserves for each site's run
      gpus_per_site: 0.25   # a quarter of a GPU: four sites train side by side on each GPU

Mapped to Flower's ``backend_config["client_resources"]`` (``num_cpus``, ``num_gpus``) by
:mod:`medflower.simulation.runner`: sites run in parallel as far as these reservations allow.
They are scheduling counts, not limits: GPU memory in particular is not capped by
``gpus_per_site`` (docs/simulator.md says what to do when it runs out). The GPU count is checked
against this machine when a simulation starts, not here.
"""

from __future__ import annotations

from dataclasses import dataclass

from medflower.schema import ConfigError, rng_field


def _whole_above_one(value: float, key: str) -> None:
    if value > 1 and value != int(value):
        raise ConfigError(f"{key}: {value} — above 1 it must be a whole number (Flower's engine, Ray, requires it)")


@dataclass(frozen=True)
class SimulationConfig:
    # CPU cores reserved for each site's run (fractions up to 1: sites share a core)
    cpus_per_site: float = rng_field(1.0, min=0.0, exclusive_min=True)
    # GPUs reserved for each site's run: 0 (none reserved) or above 0 and at most this machine's GPUs
    gpus_per_site: float = rng_field(0.0, min=0.0)

    def __post_init__(self) -> None:
        _whole_above_one(self.cpus_per_site, "simulation.cpus_per_site")
        _whole_above_one(self.gpus_per_site, "simulation.gpus_per_site")
