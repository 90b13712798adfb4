"""``simulation:`` — how ``medflower simulate`` runs the simulated sites (not what they learn).

Example (experiment YAML)::

    simulation:
      engine: local   # sites in this process, data and models resident ("ray": Flower's Ray engine)

Both engines drive the same ServerApp and ClientApp through a Flower ``Grid``, so the same YAML and
seed give the same metrics on either (see docs/simulator.md "Engines"). ``local``
(:mod:`medflower.simulation.local`) is the default because Ray's start-up, worker imports and
per-worker data loading cost more than the training on short runs; ``ray``
(:mod:`medflower.simulation.runner`) runs sites in parallel worker processes and can join a Ray
cluster across machines (``medflower simulate --ray-address`` or ``RAY_ADDRESS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class SimulationConfig:
    # "local": every site in the simulate process, one after the other, data and model resident (no
    # process start per site); "ray": Flower's simulation engine (Ray), sites in parallel workers,
    # on this machine or on a Ray cluster (--ray-address / RAY_ADDRESS)
    engine: Literal["local", "ray"] = "local"
