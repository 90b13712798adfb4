"""The simulation's ClientApp (``medflower.simulation.clientapp:app``): a simulated hospital.

The same train/evaluate pipeline as the hospital's (:func:`medflower.client.app.build_client_app`),
with a simulated site's data (``node_config["partition-id"]``, :func:`medflower.simulation.sites.load_partition`)
and the SIMULATION-ONLY poisoned updates of the experiment's ``attack:`` section
(:func:`medflower.simulation.attack.attacked_update`). ``medflower simulate``, ``medflower compare``,
the in-process grid and the benchmarks run it; ``flwr run .`` reaches it through
:mod:`medflower.cli.apps` on a simulated node only.
"""

from __future__ import annotations

from medflower.client.app import build_client_app
from medflower.simulation.attack import attacked_update
from medflower.simulation.sites import load_partition

app = build_client_app(load_site=load_partition, transform_update=attacked_update)
