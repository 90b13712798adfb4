"""``simulation:`` — how ``medflower simulate`` runs the simulated sites (not what they learn).

Example (experiment YAML)::

    simulation:
      engine: ray           # "local" (default): sites in this process, data and models resident
      cpus_per_site: 2      # ray: CPU cores Flower's engine reserves for each site's run
      gpus_per_site: 0.25   # ray: a quarter of a GPU, so four sites train side by side on each GPU

Both engines drive the same ServerApp and ClientApp through a Flower ``Grid``, so the same YAML and
seed give the same metrics on either (see docs/simulator.md "Engines"). ``local``
(:mod:`medflower.simulation.local`) is the default because Ray's start-up, worker imports and
per-worker data loading cost more than the training on short runs; ``ray``
(:mod:`medflower.simulation.runner`) runs sites in parallel worker processes and can join a Ray
cluster across machines (``medflower simulate --ray-address`` or ``RAY_ADDRESS``).

``cpus_per_site``/``gpus_per_site`` are mapped to Flower's ``backend_config["client_resources"]``
(``num_cpus``, ``num_gpus``) by the ``ray`` engine: sites run in parallel as far as these
reservations allow. They are scheduling counts, not limits: GPU memory in particular is not capped by
``gpus_per_site`` (docs/simulator.md says what to do when it runs out). The GPU count is checked
against this machine when a simulation starts, not here. The ``local`` engine runs one site at a time
on ``train.device``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medflower.schema import ConfigError, rng_field

ENGINES = ("local", "ray")


def _whole_above_one(value: float, key: str) -> None:
    if value > 1 and value != int(value):
        raise ConfigError(f"{key}: {value} — above 1 it must be a whole number (Flower's engine, Ray, requires it)")


@dataclass(frozen=True)
class SimulationConfig:
    # "local": every site in the simulate process, one after the other, data and model resident (no
    # process start per site); "ray": Flower's simulation engine (Ray), sites in parallel workers,
    # on this machine or on a Ray cluster (--ray-address / RAY_ADDRESS)
    engine: Literal["local", "ray"] = "local"
    # ray: CPU cores reserved for each site's run (fractions up to 1: sites share a core)
    cpus_per_site: float = rng_field(1.0, min=0.0, exclusive_min=True)
    # ray: GPUs reserved for each site's run: 0 (none reserved) or above 0 and at most this machine's GPUs
    gpus_per_site: float = rng_field(0.0, min=0.0)

    def __post_init__(self) -> None:
        _whole_above_one(self.cpus_per_site, "simulation.cpus_per_site")
        _whole_above_one(self.gpus_per_site, "simulation.gpus_per_site")
