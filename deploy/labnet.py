"""The plumbing under :mod:`medflower.deploy.lab`: network namespaces, their processes, polling.

Split from the lab itself so that the lab module reads as the README's steps. Everything here
acts only on namespaces the lab created (named ``mf<pid>x<n>-...``): it never touches the host's
own network namespace, and it stops only processes that live inside the lab's namespaces.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

TAG_RE = re.compile(r"^mf(\d+)x\d+-")
T = TypeVar("T")


class LabError(RuntimeError):
    """A lab step failed; the message names the step and where its log is."""


def netns_unavailable_reason() -> str | None:
    """Why this machine cannot host the lab (None if it can)."""
    if sys.platform != "linux":
        return f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"mfprobe{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return f"`ip netns add` failed: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def proxy_unavailable_reason() -> str | None:
    """Why the lab cannot put the reverse proxy in front of Flower (None if it can)."""
    if shutil.which("nginx") is None:
        return "nginx is not installed (Debian: apt-get install nginx; .ci/run installs it when run as root)"
    return None


def remove_stale_namespaces() -> list[str]:
    """Delete lab namespaces left by a lab process that no longer exists (e.g. killed by a timeout)."""
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    removed = []
    for line in res.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = TAG_RE.match(name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            kill_ns_processes(name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            removed.append(name)
    return removed


def ns_pids(ns: str) -> list[int]:
    res = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in res.stdout.split() if p.isdigit()]


def kill_ns_processes(*namespaces: str, grace_s: float = 3.0) -> None:
    """Every process inside a lab namespace was started by the lab: stop them, then force."""

    def alive() -> list[int]:
        return [pid for ns in namespaces for pid in ns_pids(ns)]

    pids = alive()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (pids := alive()):
            time.sleep(0.1)
        if not pids:
            return


@contextlib.contextmanager
def loopback_namespace(prefix: str) -> Iterator[str]:
    """A fresh network namespace with only its loopback up, named ``<prefix><pid>``; on exit every
    process left in it is stopped and the namespace deleted (a walkthrough or benchmark's sandbox)."""
    name = f"{prefix}{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        kill_ns_processes(name)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def environ(pid: int) -> dict[str, str]:
    """A process's environment (what it inherited), from /proc."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw if "=" in item)


def pids_running(ns: str, program: str) -> list[int]:
    """Processes in ``ns`` whose command (first two words: the interpreter and the script) is ``program``."""
    return [p for p in ns_pids(ns) if any(Path(a).name == program for a in cmdline(p)[:2])]


@dataclass
class Proc:
    name: str
    ns: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class _HasLogs(Protocol):
    def logs(self) -> str: ...


def wait_for(
    predicate: Callable[[], T],
    *,
    timeout: float,
    interval: float = 0.5,
    what: str = "condition",
    lab: _HasLogs | None = None,
) -> T:
    """Poll ``predicate`` until it returns a truthy value; LabError (with the lab's logs) on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise LabError(f"timed out after {timeout:.0f}s waiting for {what}" + (f"\n{lab.logs()}" if lab else ""))


# An HTTPS request from inside a namespace, with only the standard library (the lab's probes of
# the proxies): prints "<status> <first 300 characters of the body>", or "error <reason>".
PROBE = """
import http.client, ssl, sys
host, port, method, path, ca, cert, key = sys.argv[1:8]
ctx = ssl.create_default_context(cafile=ca)
ctx.check_hostname = False  # the probe tests the proxy's rules, not the name
if cert:
    ctx.load_cert_chain(cert, key)
try:
    c = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
    c.request(method, path, body=b"" if method == "POST" else None)
    r = c.getresponse()
    print(r.status, r.read(300).decode(errors="replace").replace("\\n", " "))
except Exception as err:
    print("error", type(err).__name__, err)
"""
