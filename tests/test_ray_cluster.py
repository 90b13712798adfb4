"""The ``ray`` engine joins an existing Ray cluster: a 2-node cluster on loopback runs a federation.

Two ``ray start`` nodes on this machine (a head and a second node, each with its own temp folder and
one CPU) stand in for two lab machines; ``medflower simulate --ray-address`` connects to the head and
Flower's actor pool takes one site worker per CPU, so sites train on both nodes. Teardown ends exactly
the processes of these two nodes (found by their temp folder, plus their children), never ``ray stop``,
which would end every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = """\
name: cluster
data: {kind: synthetic, synthetic_samples: 120}
partition: {num_sites: 3, alpha: 5.0}
model: {name: cnn, params: {width: 8}}
train: {rounds: 1}
simulation: {engine: ray}
"""


def _ray_cli() -> str | None:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.is_file() else shutil.which("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process (Linux /proc)."""
    out: dict[int, tuple[int, str]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out[int(d.name)] = (ppid, cmd)
    return out


def _end_nodes(tag: str) -> None:
    """End the processes whose command line names ``tag`` (the nodes' temp folder), and their children."""
    ps = _processes()
    mine = {p for p, (_, cmd) in ps.items() if tag in cmd and p != os.getpid()}
    while new := {p for p, (pp, _) in ps.items() if pp in mine} - mine:
        mine |= new
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in mine:
            with contextlib.suppress(ProcessLookupError):  # ended with its parent
                os.kill(pid, sig)
        if sig == signal.SIGTERM:
            time.sleep(3)


@pytest.fixture
def two_node_cluster() -> Iterator[str]:
    ray = _ray_cli()
    if ray is None or not Path("/proc").is_dir():
        pytest.skip("needs the `ray` command line and Linux /proc")
    tmp = tempfile.mkdtemp(prefix="mfray-")  # short: Ray's socket paths live under it (108-byte limit)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    head = [ray, "start", "--head", "--port", str(port), "--include-dashboard", "false", "--temp-dir", f"{tmp}/head"]
    second = [ray, "start", "--address", address, "--temp-dir", f"{tmp}/node2"]
    try:
        for cmd in (head + common, second + common):
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
            if proc.returncode != 0:
                pytest.skip(f"ray cannot start a 2-node cluster here: {' '.join(cmd[:3])}: {proc.stderr[-500:]}")
        yield address
    finally:
        _end_nodes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_federation_runs_across_a_two_node_ray_cluster(two_node_cluster: str, tmp_path: Path) -> None:
    ray = _ray_cli()
    assert ray is not None
    for _ in range(30):  # a node that `ray start` reported may take a few seconds to show in the status
        status = subprocess.run(
            [ray, "status", "--address", two_node_cluster], capture_output=True, text=True, timeout=60
        )
        if "/2.0 CPU" in status.stdout:
            break
        time.sleep(2)
    active = status.stdout.split("Active:")[-1].split("Pending:")[0]
    assert active.count("node_") == 2, status.stdout + status.stderr  # two nodes, one CPU each
    exp = tmp_path / "tiny.yaml"
    exp.write_text(TINY)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "medflower.cli", "simulate", str(exp), "-o", str(out)]
    proc = subprocess.run(
        [*cmd, "--ray-address", two_node_cluster], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "engine ray" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    (round1,) = summary["rounds"]
    assert round1["aggregated"] and sorted(round1["sites_train"]) == ["site-0", "site-1", "site-2"]
    assert not round1["failures"]
