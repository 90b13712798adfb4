"""The ``local`` simulation engine: every site in the ``medflower simulate`` process, one after the other.

Why: Flower's Ray engine (:mod:`medflower.simulation.runner`) starts Ray, spawns worker processes that
import torch, Flower and MONAI again, and has each worker build its sites' data; on short runs that
fixed cost exceeds the training (issue 11 measured 1.67x a plain PyTorch loop on 5 sites x 10 rounds).
This engine has none of it: the sites' data are built once (:func:`medflower.simulation.sites.build_sites`,
one array per split that every later message reuses), messages are handed over as Python objects
(:class:`medflower.simulation.inprocess.InProcessGrid`, no serialization) and the sites run
sequentially, so its cost is the training itself plus one process start.

It still drives the *same* ServerApp object (:func:`medflower.server.app.build_server_app`) and the same
ClientApp object (``medflower.simulation.clientapp:app``) through a Flower ``Grid``, with a per-site
``Context`` whose state persists across rounds as on a SuperNode: the same YAML and seed give the same
metrics as ``engine: ray`` (tests/test_engines.py).

Parallelism: sites do not run side by side here; a site's torch uses ``train.num_threads`` threads
(raise it to the core count for a larger model), and ``engine: ray`` runs sites in parallel workers or
across machines. A pool of pre-started worker processes (one per core, each keeping its sites) was
weighed and left out: profiled, this engine's own work (messages, aggregation, summaries) does not show
next to training and evaluation, and what remains between it and a plain PyTorch loop is import time
(MONAI's above all, bench/RESULTS.md), which every pool worker would pay again; parallel sites on the
2 shared cores this was written on could not have been measured.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID

from medflower.config import ExperimentConfig
from medflower.server.app import build_server_app
from medflower.simulation.clientapp import app as client_app
from medflower.simulation.inprocess import InProcessGrid
from medflower.simulation.sites import build_sites

RUN_ID = 1


def simulate_local(exp: ExperimentConfig, out_dir: str | Path) -> dict[str, Any]:
    """Simulate ``exp`` with one in-process site per partition; returns the written summary."""
    build_sites(exp)  # fail fast on bad data or an impossible partition, before any round starts
    grid = InProcessGrid(client_app, num_sites=exp.partition.num_sites, run_id=RUN_ID)
    server_context = Context(
        run_id=RUN_ID, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config={}
    )
    server_app = build_server_app(exp, out_dir)
    return run_and_collect(out_dir, lambda: server_app(grid, server_context))


def run_and_collect(out_dir: str | Path, run: Callable[[], None]) -> dict[str, Any]:
    """Run an engine's whole federation (``run``) and return the ``summary.json`` it wrote to ``out_dir``,
    with the engine's wall time added; a previous run's summary is removed first, so that it is never
    reported as this one's. Shared by both engines."""
    summary_path = Path(out_dir) / "summary.json"
    if summary_path.exists():
        summary_path.unlink()
    t0 = time.time()
    run()
    if not summary_path.is_file():
        raise RuntimeError(f"the simulation ended without writing {summary_path}; see the log above")
    summary = json.loads(summary_path.read_text())
    summary["simulation_wall_seconds"] = time.time() - t0
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary
