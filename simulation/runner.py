"""Run a whole federation: ``simulation.engine`` picks the engine (``local`` or Flower's Ray engine).

The ServerApp is the one ``flwr run`` deploys and the ClientApp the simulation's
(:mod:`medflower.simulation.clientapp`, the hospital's pipeline on simulated sites); only the
transport differs. ``local`` is :mod:`medflower.simulation.local`; ``ray`` is Flower's
``run_simulation``, on this machine or joining a Ray cluster (``ray_address``, else ``RAY_ADDRESS``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medflower.config import ExperimentConfig
from medflower.config.simulation import ENGINES
from medflower.modelspec import build_experiment_model
from medflower.runenv import quiet_flower_env
from medflower.server.app import build_server_app
from medflower.server.tracking import require_extra
from medflower.simulation.clientapp import app as client_app
from medflower.simulation.local import run_and_collect, simulate_local
from medflower.simulation.resources import check_simulation_hardware, gpu_count
from medflower.simulation.sites import build_sites

# Ray's own settings for the simulation engine (the telemetry ones are medflower.runenv.FLOWER_ENV)
RAY_ENV = {
    "RAY_DEDUP_LOGS": "0",  # every site's log lines, not "repeated 3x"
    # Ray leaves CUDA_VISIBLE_DEVICES alone for sites that reserve no GPU (gpus_per_site 0): they see every GPU
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def simulate(
    exp: ExperimentConfig,
    out_dir: str | Path,
    *,
    verbose: bool = False,
    engine: str | None = None,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Simulate ``exp`` with one virtual SuperNode per site; returns the written summary.

    ``engine`` overrides ``exp.simulation.engine``; ``ray_address`` (else the ``RAY_ADDRESS``
    environment variable) makes the Ray engine join that cluster instead of starting Ray here.
    """
    engine = engine or exp.simulation.engine
    if engine not in ENGINES:
        raise ValueError(f"engine: unknown engine {engine!r}; valid choices are {', '.join(map(repr, ENGINES))}")
    if ray_address and engine != "ray":
        raise ValueError(f"--ray-address joins a Ray cluster, which only engine 'ray' uses (engine is {engine!r})")
    quiet_flower_env()
    # Fail fast, before any engine starts, on hardware this machine lacks (train.device,
    # simulation.*_per_site) and on a missing tracking extra.
    resources = check_simulation_hardware(exp)
    require_extra(exp.tracking)
    if engine == "local":
        return simulate_local(exp, out_dir)
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    # here, not at the top: it starts Ray's machinery, which only a simulation that really runs needs
    from flwr.simulation import run_simulation

    # Fail fast, before Ray starts, on bad data or an impossible partition (and warm the caches
    # the in-process ServerApp reuses).
    build_sites(exp)
    build_experiment_model(exp)
    backend_config: dict[str, Any] = {
        "client_resources": resources,
        "init_args": ray_init_args(ray_address, verbose=verbose),
    }
    return run_and_collect(
        out_dir,
        lambda: run_simulation(
            server_app=build_server_app(exp, out_dir),
            client_app=client_app,
            num_supernodes=exp.partition.num_sites,
            backend_config=backend_config,
            verbose_logging=verbose,
        ),
    )


def ray_init_args(ray_address: str | None, *, verbose: bool = False) -> dict[str, Any]:
    """``ray.init`` arguments: a new local Ray with every core, or (address given, or ``RAY_ADDRESS``
    set) a connection to that cluster, whose size its own nodes declare (``ray.init`` refuses
    ``num_cpus`` when it joins a cluster)."""
    args: dict[str, Any] = {"include_dashboard": False, "logging_level": "error", "log_to_driver": verbose}
    address = ray_address or os.environ.get("RAY_ADDRESS", "")
    if address:
        args["address"] = address
    else:  # the GPUs torch sees: the count simulation.gpus_per_site was checked against
        args["num_cpus"] = os.cpu_count() or 1
        args["num_gpus"] = gpu_count()
    return args
