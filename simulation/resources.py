"""What each simulated site reserves on this machine: ``simulation.cpus_per_site`` / ``gpus_per_site``.

Flower's simulation engine (Ray) runs a site's message when the site's reservation fits in what is
free, so these two numbers decide how many sites train side by side: ``cores / cpus_per_site`` on
the CPUs, ``GPUs / gpus_per_site`` on the GPUs (0.25: four sites per GPU), whichever is fewer.
They are scheduling counts, not limits: nothing caps a site's GPU memory (docs/simulator.md).

The checks against this machine's hardware live here, and run before Ray starts: a reservation no
site can ever get would otherwise leave the simulation waiting forever.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from medflower.config import ExperimentConfig
from medflower.device import cuda_devices, resolve_amp
from medflower.schema import ConfigError

GPUS_KEY = "simulation.gpus_per_site"
CPUS_KEY = "simulation.cpus_per_site"


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def client_resources(exp: ExperimentConfig, *, cpus: int | None = None, gpus: int | None = None) -> dict[str, float]:
    """Flower's ``backend_config["client_resources"]`` for ``exp`` on a machine with ``cpus`` cores and
    ``gpus`` GPUs (default: this machine's); a reservation it cannot meet is a ConfigError naming the key."""
    cpus = os.cpu_count() or 1 if cpus is None else cpus
    gpus = gpu_count() if gpus is None else gpus
    sim = exp.simulation
    if sim.cpus_per_site > cpus:
        raise ConfigError(
            f"{CPUS_KEY}: {sim.cpus_per_site:g} is more than the {cpus} CPU core(s) of this machine; "
            "no site could ever be scheduled"
        )
    per_gpu = sim.gpus_per_site
    if per_gpu > 0:
        if gpus == 0:
            raise ConfigError(
                f"{GPUS_KEY}: {per_gpu:g}, but this machine has no CUDA GPU; set it to 0 (the default), "
                "and the sites train on the CPU"
            )
        if per_gpu > gpus:
            found = ", ".join(cuda_devices()) or f"{gpus} GPU(s)"
            raise ConfigError(
                f"{GPUS_KEY}: {per_gpu:g} is more than the {gpus} GPU(s) of this machine ({found}); "
                "it must be above 0 and at most that"
            )
        if exp.train.device == "cpu":
            raise ConfigError(
                f"{GPUS_KEY}: {per_gpu:g} reserves GPUs, but train.device is 'cpu'; set one of them differently"
            )
        if exp.train.device.startswith("cuda:") and exp.train.device != "cuda:0":
            raise ConfigError(
                f"train.device: {exp.train.device!r} cannot be combined with {GPUS_KEY} > 0: Flower's engine shows "
                "each site only the GPU it reserved, as cuda:0; use 'cuda' or 'auto'"
            )
    return {"num_cpus": sim.cpus_per_site, "num_gpus": per_gpu}


def check_simulation_hardware(exp: ExperimentConfig) -> dict[str, Any]:
    """Everything a simulation needs of this machine, checked before it starts.

    Returns the client resources. ``train.device`` and ``train.precision`` are resolved here too:
    every model of a simulation runs on this machine, so ``cuda`` without CUDA fails now, naming
    ``train.device`` (and ``fp16`` on a CPU, naming ``train.precision``).
    """
    resolve_amp(exp.train.device, exp.train.precision)
    return client_resources(exp)
