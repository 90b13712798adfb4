"""deploy/warmstart.py and deploy/bin/flwr-clientapp: Flower's ``flwr-clientapp`` forked from a warm
process when it answers, run cold when it does not. ``--help`` stands in for a real task (which
needs a SuperNode): its usage text shows which process ran Flower's entry point."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SHIM = DEPLOY / "bin" / "flwr-clientapp"


def _env(sock: Path) -> dict[str, str]:
    return {
        **os.environ,
        "MEDFLOWER_CLIENTAPP_SOCKET": str(sock),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }


def test_the_shim_hands_flowers_arguments_to_the_warm_process(tmp_path: Path) -> None:
    sock, log = tmp_path / "s.sock", tmp_path / "warm.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, str(DEPLOY / "warmstart.py"), "serve", "--socket", str(sock), "--preload", "json"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        for _ in range(600):
            if sock.exists() or server.poll() is not None:
                break
            time.sleep(0.1)
        assert sock.exists(), log.read_text()
        assert oct(sock.stat().st_mode & 0o777) == oct(0o600)
        res = subprocess.run([str(SHIM), "--help"], env=_env(sock), capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert "usage: flwr-clientapp" not in res.stdout  # not run here: the warm process's child ran it
        for _ in range(600):
            if "usage: flwr-clientapp" in log.read_text():
                break
            time.sleep(0.1)
        assert "usage: flwr-clientapp" in log.read_text()
        assert server.poll() is None  # the child exited; the warm process serves on
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("sock", ["missing.sock", ""])
def test_the_shim_runs_flowers_clientapp_itself_when_nothing_answers(tmp_path: Path, sock: str) -> None:
    env = _env(tmp_path / sock) if sock else {**_env(tmp_path), "MEDFLOWER_CLIENTAPP_SOCKET": ""}
    res = subprocess.run([str(SHIM), "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "usage: flwr-clientapp" in res.stdout
    assert ("did not answer" in res.stderr) == bool(sock)
