"""A federation rehearsal on one Linux machine: a coordinator and N hospitals, each in its own
network namespace, wired by veth pairs to a bridge inside the coordinator's namespace.

It runs exactly the steps of deploy/README.md (the same ``medflower deploy``/``flwr`` commands and
the same launch scripts the container images run), so that tests/test_deploy_netns.py (or an
administrator rehearsing from Python) exercises a real deployment: TLS and node authentication on,
real IP addresses, links that can be cut. Nothing is attached to the host's own network namespace,
so no traffic leaves the lab. Needs root and ``ip netns`` (iproute2). Every command it runs is
recorded in ``Lab.commands``.

Flower has a local SuperLink for simulations but nothing that exercises its deployment transport
with several addresses, TLS and node authentication on one machine; hence this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medflower.runenv import FLOWER_ENV

REPO = Path(__file__).resolve().parents[1]
DEPLOY = Path(__file__).resolve().parent
LAB_ENV = {**FLOWER_ENV, "PYTHONUNBUFFERED": "1"}  # every lab process; unbuffered: logs are read live
CONNECTION = "medflower"
TAG_RE = re.compile(r"^mf(\d+)x\d+-")


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


def remove_stale_namespaces() -> list[str]:
    """Delete lab namespaces left by a lab process that no longer exists (e.g. killed by a timeout)."""
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    removed = []
    for line in res.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = TAG_RE.match(name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            _kill_ns_processes(name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            removed.append(name)
    return removed


def _ns_pids(ns: str) -> list[int]:
    res = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in res.stdout.split() if p.isdigit()]


def _kill_ns_processes(*namespaces: str, grace_s: float = 3.0) -> None:
    """Every process inside a lab namespace was started by the lab: stop them, then force."""

    def alive() -> list[int]:
        return [pid for ns in namespaces for pid in _ns_pids(ns)]

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


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


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


@dataclass
class Site:
    name: str
    ns: str
    ip: str
    dir: Path
    key: Path
    pub: Path
    ca: Path
    proc: Proc | None = None


@dataclass
class Lab:
    """``with Lab(root) as lab: ...``; see :meth:`setup` for the README's steps."""

    root: Path
    num_sites: int = 3
    port: int = 9093
    subnet: str = "10.77.0"
    tag: str = ""
    commands: list[list[str]] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.tag = self.tag or f"mf{os.getpid()}x{int(time.time() * 1000) % 100000}"
        self.coord_ns = f"{self.tag}-c"
        self.coord_ip = f"{self.subnet}.1"
        self.address = f"{self.coord_ip}:{self.port}"
        self.admin = self.root / "admin"
        self.certs = self.admin / "certs"
        self.admin_home = self.admin / "flwr-home"
        self.coord_state = self.root / "coordinator"
        self.sites: list[Site] = []
        self._namespaces: list[str] = []
        self.coordinator: Proc | None = None

    # ---- network ----
    def __enter__(self) -> Lab:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def _ip(self, *args: str) -> None:
        res = subprocess.run(["ip", *args], capture_output=True, text=True)
        if res.returncode != 0:
            raise LabError(f"`ip {' '.join(args)}` failed: {res.stderr.strip()}")

    def up(self) -> None:
        """Namespaces, a bridge in the coordinator's namespace and one veth pair per hospital."""
        remove_stale_namespaces()
        self.root.mkdir(parents=True, exist_ok=True)
        c = self.coord_ns
        self._ip("netns", "add", c)
        self._namespaces.append(c)
        self._ip("-n", c, "link", "set", "lo", "up")
        self._ip("-n", c, "link", "add", "br0", "type", "bridge")
        self._ip("-n", c, "addr", "add", f"{self.coord_ip}/24", "dev", "br0")
        self._ip("-n", c, "link", "set", "br0", "up")
        for i in range(self.num_sites):
            name = f"hospital-{i + 1}"
            ns = f"{self.tag}-h{i + 1}"
            ip = f"{self.subnet}.{11 + i}"
            self._ip("netns", "add", ns)
            self._namespaces.append(ns)
            self._ip("-n", ns, "link", "set", "lo", "up")
            self._ip("-n", c, "link", "add", f"vh{i + 1}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._ip("-n", c, "link", "set", f"vh{i + 1}", "master", "br0", "up")
            self._ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            self._ip("-n", ns, "link", "set", "eth0", "up")
            d = self.root / "sites" / name
            self.sites.append(Site(name, ns, ip, d, d / f"{name}.key", d / f"{name}.pub", d / "ca.crt"))

    def add_site_namespace(self, name: str) -> Site:
        """One more hospital namespace on the bridge (e.g. an unregistered node)."""
        i = len(self._namespaces)
        ns, ip = f"{self.tag}-x{i}", f"{self.subnet}.{100 + i}"
        self._ip("netns", "add", ns)
        self._namespaces.append(ns)
        self._ip("-n", ns, "link", "set", "lo", "up")
        self._ip("-n", self.coord_ns, "link", "add", f"vx{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        self._ip("-n", self.coord_ns, "link", "set", f"vx{i}", "master", "br0", "up")
        self._ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        self._ip("-n", ns, "link", "set", "eth0", "up")
        d = self.root / "sites" / name
        return Site(name, ns, ip, d, d / f"{name}.key", d / f"{name}.pub", d / "ca.crt")

    def cut_link(self, site: Site) -> None:
        """Take the hospital's only interface down: its packets stop, its processes keep running."""
        self.commands.append(["ip", "-n", site.ns, "link", "set", "eth0", "down"])
        self._ip("-n", site.ns, "link", "set", "eth0", "down")

    def down(self) -> None:
        """Stop every process in the lab's namespaces and delete them (idempotent)."""
        _kill_ns_processes(*self._namespaces)
        for p in self.procs:
            if p.alive():
                p.popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=5)
        for ns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._namespaces.clear()

    # ---- processes ----
    def env(self, flwr_home: Path | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "FLWR_HOME"}
        env.update(LAB_ENV)
        if flwr_home is not None:
            flwr_home.mkdir(parents=True, exist_ok=True)
            env["FLWR_HOME"] = str(flwr_home)
        return env

    def run(
        self,
        ns: str,
        argv: list[str],
        *,
        home: Path | None = None,
        timeout: float = 120,
        check: bool = True,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess:
        self.commands.append(list(argv))
        res = subprocess.run(
            ["ip", "netns", "exec", ns, *argv],
            capture_output=True,
            text=True,
            env=self.env(home),
            timeout=timeout,
            cwd=cwd or self.root,
        )
        if check and res.returncode != 0:
            raise LabError(f"`{' '.join(argv)}` exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        return res

    def spawn(self, ns: str, argv: list[str], *, name: str, home: Path | None = None) -> Proc:
        self.commands.append(list(argv))
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as f:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=self.env(home),
                cwd=self.root,
                start_new_session=True,
            )
        proc = Proc(name, ns, popen, log)
        self.procs.append(proc)
        return proc

    def wait_listening(self, ns: str, host: str, port: int, *, timeout: float = 60, proc: Proc | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            res = subprocess.run(
                ["ip", "netns", "exec", ns, "bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}"], capture_output=True
            )
            if res.returncode == 0:
                return
            if proc is not None and not proc.alive():
                raise LabError(f"{proc.name} exited ({proc.popen.returncode}) before listening:\n{proc.tail()}")
            time.sleep(0.5)
        raise LabError(f"nothing listens on {host}:{port} after {timeout:.0f}s" + (f":\n{proc.tail()}" if proc else ""))

    # ---- the README's steps ----
    def make_certs(self) -> None:
        """Administrator: CA and the coordinator's certificate (name and IP the hospitals dial)."""
        self.run(
            self.coord_ns,
            ["medflower", "deploy", "certs", "--out", str(self.certs), "--name", "coordinator", "--ip", self.coord_ip],
        )

    def coordinator_argv(self) -> list[str]:
        return [
            str(DEPLOY / "start-coordinator.sh"),
            "--certs",
            str(self.certs),
            "--state",
            str(self.coord_state),
            "--port",
            str(self.port),
        ]

    def start_coordinator(self) -> Proc:
        self.coordinator = self.spawn(self.coord_ns, self.coordinator_argv(), name="coordinator")
        self.wait_listening(self.coord_ns, self.coord_ip, self.port, proc=self.coordinator)
        return self.coordinator

    def add_connection(self) -> None:
        self.run(
            self.coord_ns,
            [
                "medflower",
                "deploy",
                "connection",
                "--name",
                CONNECTION,
                "--address",
                self.address,
                "--ca",
                str(self.certs / "ca.crt"),
            ],
            home=self.admin_home,
        )

    def node_key(self, site: Site) -> None:
        """Hospital IT: create the node key; the administrator hands over ca.crt."""
        self.run(site.ns, ["medflower", "deploy", "node-key", "--site", site.name, "--out", str(site.dir)])
        shutil.copy(self.certs / "ca.crt", site.ca)

    def register(self, site: Site) -> None:
        """Administrator: register the hospital's public key with the coordinator."""
        self.run(
            self.coord_ns,
            ["flwr", "supernode", "register", str(site.pub), CONNECTION, "--name", site.name],
            home=self.admin_home,
            timeout=60,
        )

    @staticmethod
    def data_args(data: str | Path) -> list[str]:
        """A site YAML (a Path: the hospital's files) or a raw node config (a str: e.g. a simulated partition)."""
        return ["--site-config", str(data)] if isinstance(data, Path) else ["--node-config", data]

    def node_check(self, site: Site, data: str | Path) -> subprocess.CompletedProcess:
        return self.run(
            site.ns,
            [
                "medflower",
                "node",
                "check",
                "--coordinator",
                self.address,
                "--ca",
                str(site.ca),
                "--key",
                str(site.key),
                "--pub",
                str(site.pub),
                *self.data_args(data),
            ],
            check=False,
            timeout=60,
        )

    def hospital_argv(
        self, site: Site, data: str | Path, *, check: bool = False, trusted_entities: Path | None = None
    ) -> list[str]:
        """The launch script's command line; ``trusted_entities`` None: run the bundle the coordinator sends."""
        argv = [
            str(DEPLOY / "start-hospital.sh"),
            "--coordinator",
            self.address,
            "--ca",
            str(site.ca),
            "--key",
            str(site.key),
            *self.data_args(data),
            "--state",
            str(site.dir / "flwr-home"),
            "--trusted-entities",  # always given, as in compose.yaml: the hospital's choice is on the command line
            str(trusted_entities) if trusted_entities is not None else "",
        ]
        return argv if check else [*argv, "--no-check"]  # setup() has just run `medflower node check`

    def start_hospital(
        self, site: Site, node_config: str | Path, *, check: bool = False, trusted_entities: Path | None = None
    ) -> Proc:
        argv = self.hospital_argv(site, node_config, check=check, trusted_entities=trusted_entities)
        site.proc = self.spawn(site.ns, argv, name=site.name)
        return site.proc

    def flwr_run(self, run_config: dict[str, str], *, app: Path = REPO) -> int:
        """Administrator: submit the app to the federation; returns the run id."""
        rc = " ".join(f"{k}='{v}'" for k, v in run_config.items())
        res = self.run(
            self.coord_ns,
            ["flwr", "run", str(app), CONNECTION, "--run-config", rc, "--format", "json"],
            home=self.admin_home,
            timeout=180,
        )
        try:
            out = json.loads(res.stdout[res.stdout.index("{") :])
        except ValueError as err:
            raise LabError(f"`flwr run` printed no JSON:\n{res.stdout}\n{res.stderr}") from err
        if not out.get("success") or "run-id" not in out:
            raise LabError(f"`flwr run` failed: {out}")
        return int(out["run-id"])

    def runs(self) -> list[dict[str, Any]]:
        res = self.run(self.coord_ns, ["flwr", "ls", CONNECTION, "--format", "json"], home=self.admin_home, timeout=60)
        out = json.loads(res.stdout[res.stdout.index("{") :])
        return list(out.get("runs", []))

    def run_status(self, run_id: int) -> str:
        for r in self.runs():
            if int(r.get("run-id", -1)) == run_id:
                return str(r.get("status", ""))
        return ""

    def stop_run(self, run_id: int) -> None:
        # check=False: the coordinator may already have marked a run whose ServerApp died as finished
        self.run(
            self.coord_ns, ["flwr", "stop", str(run_id), CONNECTION], home=self.admin_home, timeout=60, check=False
        )

    def serverapp_pids(self) -> list[int]:
        """ServerApp processes Flower started in the coordinator's namespace."""
        return [p for p in _ns_pids(self.coord_ns) if any("flwr-serverapp" in a for a in cmdline(p)[:2])]

    def setup(self, node_configs: list[str | Path], *, check_nodes: bool = True) -> None:
        """Steps 1-6 of deploy/README.md for every hospital, then start the hospitals' nodes."""
        self.make_certs()
        self.start_coordinator()
        self.add_connection()

        def onboard(site: Site, cfg: str | Path) -> None:  # hospitals onboard independently: in parallel
            self.node_key(site)
            self.register(site)
            if isinstance(cfg, Path):  # a hospital with its own files reads every one of them once
                self.run(site.ns, ["medflower", "site", "check", str(cfg)], timeout=300)
            if check_nodes:
                res = self.node_check(site, cfg)
                if res.returncode != 0:
                    raise LabError(f"node check failed for {site.name}:\n{res.stdout}\n{res.stderr}")
            self.start_hospital(site, cfg)

        with ThreadPoolExecutor(max_workers=len(self.sites)) as pool:
            for fut in [pool.submit(onboard, site, cfg) for site, cfg in zip(self.sites, node_configs, strict=True)]:
                fut.result()

    def logs(self) -> str:
        return "\n".join(
            f"---- {p.name} ({'running' if p.alive() else f'exit {p.popen.returncode}'}) ----\n{p.tail()}"
            for p in self.procs
        )


def wait_for(predicate, *, timeout: float, interval: float = 0.5, what: str = "condition", lab: Lab | None = None):
    """Poll ``predicate`` until it returns a truthy value; LabError with the lab's logs on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise LabError(f"timed out after {timeout:.0f}s waiting for {what}" + (f"\n{lab.logs()}" if lab else ""))
