"""The ``medflower`` script's quick exit (``medflower.cli.console``) loses nothing: exit code, both
streams (also when they are pipes, hence block-buffered) and every ``atexit`` handler."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CONSOLE = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('atexit handler ran', flush=True))\n"
    "sys.argv = ['medflower', *sys.argv[1:]]\n"
    "from medflower.cli import console\n"
    "console()\n"
)


def _console(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CONSOLE, *args], capture_output=True, text=True, timeout=120)


def test_error_exit_code_message_and_atexit_survive(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-run"
    out = _console("report", str(missing))
    assert out.returncode == 2, out.stderr
    assert "medflower: error:" in out.stderr and str(missing) in out.stderr
    assert out.stdout.strip().endswith("atexit handler ran")


def test_normal_exit_is_kept_on_request(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "MEDFLOWER_NORMAL_EXIT": "1"}
    code = CONSOLE.replace("console()", "console()  # never returns")
    out = subprocess.run(
        [sys.executable, "-c", code, "report", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 2 and "atexit handler ran" in out.stdout
