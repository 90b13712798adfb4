"""Run a whole federation on one machine with Flower's simulation engine (Ray backend).

The ServerApp is the one ``flwr run`` deploys and the ClientApp the simulation's
(:mod:`medflower.simulation.clientapp`, the hospital's pipeline on simulated sites); only the
transport differs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from medflower.config import ExperimentConfig
from medflower.modelspec import build_experiment_model
from medflower.runenv import quiet_flower_env
from medflower.server.app import build_server_app
from medflower.server.tracking import require_extra
from medflower.simulation.clientapp import app as client_app
from medflower.simulation.resources import check_simulation_hardware, gpu_count
from medflower.simulation.sites import build_sites

# Ray's own settings for the simulation engine (the telemetry ones are medflower.runenv.FLOWER_ENV)
RAY_ENV = {
    "RAY_DEDUP_LOGS": "0",  # every site's log lines, not "repeated 3x"
    # Ray leaves CUDA_VISIBLE_DEVICES alone for sites that reserve no GPU (gpus_per_site 0): they see every GPU
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def simulate(exp: ExperimentConfig, out_dir: str | Path, *, verbose: bool = False) -> dict[str, Any]:
    """Simulate ``exp`` with one virtual SuperNode per site; returns the written summary."""
    quiet_flower_env()
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    # here, not at the top: it starts Ray's machinery, which only a simulation that really runs needs
    from flwr.simulation import run_simulation

    # Fail fast, before Ray starts, on hardware this machine lacks (train.device, simulation.*_per_site),
    # on bad data or an impossible partition (and warm the caches the in-process ServerApp reuses).
    resources = check_simulation_hardware(exp)
    build_sites(exp)
    build_experiment_model(exp)
    require_extra(exp.tracking)  # the tracking extra, before Ray starts
    out_dir = Path(out_dir)
    summary_path = out_dir / "summary.json"
    if summary_path.exists():
        summary_path.unlink()  # never report a previous run's results as this one's
    cpus = os.cpu_count() or 1
    backend_config: dict[str, Any] = {
        "client_resources": resources,
        "init_args": {
            "num_cpus": cpus,
            "num_gpus": gpu_count(),  # the GPUs torch sees: the count simulation.gpus_per_site was checked against
            "include_dashboard": False,
            "logging_level": "error",
            "log_to_driver": verbose,
        },
    }
    t0 = time.time()
    run_simulation(
        server_app=build_server_app(exp, out_dir),
        client_app=client_app,
        num_supernodes=exp.partition.num_sites,
        backend_config=backend_config,
        verbose_logging=verbose,
    )
    if not summary_path.is_file():
        raise RuntimeError(f"the simulation ended without writing {summary_path}; see the log above")
    summary = json.loads(summary_path.read_text())
    summary["simulation_wall_seconds"] = time.time() - t0
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary
