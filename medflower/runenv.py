"""What every medflower process that starts a run sets up the same way, in one place.

* :data:`FLOWER_ENV`: Flower's and Ray's telemetry and update checks off, and no runtime
  installation of app dependencies (Flower's ``uv sync`` would download another torch). Set them
  before Flower or Ray start (:func:`quiet_flower_env`); child processes inherit them.
* :func:`default_output_dir`: ``runs/<name>-<time>``, the output folder of a run, a partition
  preview or a comparison when none is given.

Only the standard library: every layer (server, client, simulation, deploy, the CLI, tests and
benchmarks) may import this module.
"""

from __future__ import annotations

import os
import time
from collections.abc import MutableMapping
from pathlib import Path

FLOWER_ENV: dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}

RUNS_DIR = Path("runs")


def quiet_flower_env(environ: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Set :data:`FLOWER_ENV` in ``environ`` (default ``os.environ``) where not set yet; returns it."""
    env = os.environ if environ is None else environ
    for key, value in FLOWER_ENV.items():
        env.setdefault(key, value)
    return env


def default_output_dir(name: str, *what: str) -> Path:
    """``runs/<name>[-<what>...]-<YYYYmmdd-HHMMSS>``, relative to the working directory."""
    return RUNS_DIR / "-".join([name, *what, time.strftime("%Y%m%d-%H%M%S")])
