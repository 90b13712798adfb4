"""`flwr run .` (Flower's own CLI and local SuperLink) runs the same app as `medflower simulate`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from medflower.runenv import FLOWER_ENV

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_superlinks(port: int) -> None:
    out = subprocess.run(["pgrep", "-f", f"flower-superlink.*--port {port}"], capture_output=True, text=True)
    for pid in out.stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGTERM)


@pytest.mark.slow
def test_flwr_run_local_simulation(tmp_path: Path) -> None:
    if shutil.which("flwr") is None:
        pytest.skip("the flwr CLI is not on PATH (install medflower first)")
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        "name: flwr-run\ndata: {kind: synthetic, synthetic_samples: 300}\n"
        "partition: {num_sites: 2, alpha: 5.0}\ntrain: {rounds: 2}\n"
    )
    http_port, control_port = _free_port(), _free_port()
    env = {
        **os.environ,
        **FLOWER_ENV,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
    }
    out = tmp_path / "out"
    try:
        proc = subprocess.run(
            [
                "flwr",
                "run",
                ".",
                "local",
                "--stream",
                "--federation-config",
                "num-supernodes=2",
                "--run-config",
                f'experiment="{exp}" output-dir="{out}"',
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
    finally:
        _kill_superlinks(http_port)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert all(len(r["sites_train"]) == 2 for r in summary["rounds"])
    assert summary["experiment"]["name"] == "flwr-run"
