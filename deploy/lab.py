"""A federation rehearsal on one Linux machine: a coordinator, an administrator's workstation and N
hospitals, each in its own network namespace, wired by veth pairs to a bridge inside the
coordinator's namespace.

It runs exactly the steps of deploy/README.md (the same ``medflower deploy``/``flwr`` commands and
the same launch scripts the container images run), so that tests/test_deploy_netns.py (or an
administrator rehearsing from Python) exercises a real deployment: the reverse proxy in front of a
SuperLink bound to loopback, client certificates, TLS and node authentication on, real IP
addresses, links that can be cut and restored, a SuperLink that can be killed and restarted.
Nothing is attached to the host's own network namespace, so no traffic leaves the lab. Needs root,
``ip netns`` (iproute2) and nginx. Every command it runs is recorded in ``Lab.commands``.

Lab processes run this checkout's medflower (its root first on ``PYTHONPATH``), whatever copy is
installed. Flower has a local SuperLink for simulations but nothing that exercises its deployment
transport with several addresses, TLS and node authentication on one machine; hence this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medflower.deploy.labnet import (
    PROBE,
    LabError,
    Proc,
    cmdline,
    kill_ns_processes,
    netns_unavailable_reason,
    ns_pids,
    pids_running,
    proxy_unavailable_reason,
    remove_stale_namespaces,
    wait_for,
)
from medflower.runenv import FLOWER_ENV

__all__ = ["REPO", "Lab", "LabError", "Site", "netns_unavailable_reason", "proxy_unavailable_reason", "wait_for"]

REPO = Path(__file__).resolve().parents[1]
DEPLOY = Path(__file__).resolve().parent
LAB_ENV = {**FLOWER_ENV, "PYTHONUNBUFFERED": "1"}  # every lab process; unbuffered: logs are read live
CONNECTION = "medflower"
# `medflower node check` waits 5 s for the TCP connection by default (a hospital's firewall question);
# the lab shares a CI machine's cores with ClientApps importing torch, and there one connection once
# took longer: the lab's checks wait 30 s, so only a real block fails them
NODE_CHECK_TIMEOUT = "30"
COORDINATOR_NAME = "coordinator"  # the DNS name in the coordinator's certificate (nginx checks names only)


class SiteFile:
    """A path in a site's folder, named after the site (a read-only attribute of :class:`Site`)."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern

    def __get__(self, site: Site, owner: type | None = None) -> Path:
        return site.dir / self.pattern.format(name=site.name)


@dataclass
class Site:
    """A hospital's machine: its namespace, address and files (as deploy/README.md names them)."""

    name: str
    ns: str
    ip: str
    dir: Path
    proc: Proc | None = None

    # the site's files, named as deploy/README.md names them
    key = SiteFile("{name}.key")
    pub = SiteFile("{name}.pub")
    tls_key = SiteFile("{name}.tls.key")
    csr = SiteFile("{name}.csr")
    cert = SiteFile("{name}.crt")
    ca = SiteFile("ca.crt")
    state = SiteFile("state")


@dataclass
class Lab:
    """``with Lab(root) as lab: ...``; see :meth:`setup` for the README's steps.

    ``names`` are the sites' names (default ``hospital-1``...): each is registered under its name,
    which must be the name its replies carry (a site YAML's ``name``; ``site-<partition-id>`` for a
    simulated partition).
    """

    root: Path
    num_sites: int = 3
    names: list[str] | None = None
    port: int = 9093
    admin_port: int = 9094
    superlink_port: int = 9095
    subnet: str = "10.77.0"
    tag: str = ""
    commands: list[list[str]] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.tag = self.tag or f"mf{os.getpid()}x{int(time.time() * 1000) % 100000}"
        self.names = list(self.names or [f"hospital-{i + 1}" for i in range(self.num_sites)])
        if len(self.names) != self.num_sites:
            raise ValueError(f"names: {len(self.names)} given for num_sites={self.num_sites}")
        self.coord_ns = f"{self.tag}-c"
        self.admin_ns = f"{self.tag}-a"  # an administrator's workstation on the admin network
        self.coord_ip = f"{self.subnet}.1"
        # locally administered (02:...), unicast, and the coordinator's address in its last four bytes
        self.bridge_mac = "02:00:" + ":".join(f"{int(b):02x}" for b in self.coord_ip.split("."))
        self.admin_ip = f"{self.subnet}.5"
        self.address = f"{self.coord_ip}:{self.port}"  # what hospitals dial
        self.admin_address = f"127.0.0.1:{self.admin_port}"  # the administrator, on the coordinator host
        self.admin = self.root / "admin"
        self.certs = self.admin / "certs"
        self.admin_home = self.admin / "flwr-home"
        self.coord_state = self.root / "coordinator"
        self.directory = self.coord_state / "sites.json"  # start-coordinator.sh's default site directory
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

    def _attach(self, ns: str, veth: str, ip: str) -> None:
        """A new namespace ``ns`` with ``ip`` on its eth0, the other end ``veth`` on the bridge."""
        self._ip("netns", "add", ns)
        self._namespaces.append(ns)
        self._ip("-n", ns, "link", "set", "lo", "up")
        self._ip("-n", self.coord_ns, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self._ip("-n", self.coord_ns, "link", "set", veth, "master", "br0", "up")
        self._ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        self._ip("-n", ns, "link", "set", "eth0", "up")

    def up(self) -> None:
        """Namespaces, a bridge in the coordinator's namespace, one veth pair per other machine."""
        remove_stale_namespaces()
        self.root.mkdir(parents=True, exist_ok=True)
        c = self.coord_ns
        self._ip("netns", "add", c)
        self._namespaces.append(c)
        self._ip("-n", c, "link", "set", "lo", "up")
        self._ip("-n", c, "link", "add", "br0", "type", "bridge")
        # A bridge takes the lowest MAC of its ports unless given one: a machine added later
        # (add_site_namespace) could then change the coordinator's MAC under the hospitals' ARP
        # caches, and their packets to the old one are dropped until the cache expires (up to a
        # minute of SYNs to the proxy going unanswered). So the bridge's address is fixed here.
        self._ip("-n", c, "link", "set", "br0", "address", self.bridge_mac)
        self._ip("-n", c, "addr", "add", f"{self.coord_ip}/24", "dev", "br0")
        self._ip("-n", c, "link", "set", "br0", "up")
        self._attach(self.admin_ns, "vadm", self.admin_ip)
        for i, name in enumerate(self.names or []):
            ns, ip = f"{self.tag}-h{i + 1}", f"{self.subnet}.{11 + i}"
            self._attach(ns, f"vh{i + 1}", ip)
            self.sites.append(Site(name, ns, ip, self.root / "sites" / name))

    def add_site_namespace(self, name: str) -> Site:
        """One more hospital machine on the bridge (e.g. an unregistered node)."""
        i = len(self._namespaces)
        ns, ip = f"{self.tag}-x{i}", f"{self.subnet}.{100 + i}"
        self._attach(ns, f"vx{i}", ip)
        return Site(name, ns, ip, self.root / "sites" / name)

    def cut_link(self, site: Site) -> None:
        """Take the hospital's only interface down: its packets stop, its processes keep running."""
        self.commands.append(["ip", "-n", site.ns, "link", "set", "eth0", "down"])
        self._ip("-n", site.ns, "link", "set", "eth0", "down")

    def restore_link(self, site: Site) -> None:
        self.commands.append(["ip", "-n", site.ns, "link", "set", "eth0", "up"])
        self._ip("-n", site.ns, "link", "set", "eth0", "up")

    def down(self) -> None:
        """Stop every process in the lab's namespaces and delete them (idempotent)."""
        kill_ns_processes(*self._namespaces)
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
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
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

    def probe(
        self, ns: str, port: int, path: str, *, method: str = "POST", cert: Path | None = None, key: Path | None = None
    ) -> str:
        """An HTTPS request to the coordinator from ``ns`` (optionally with a client certificate):
        ``"<status> <body start>"`` or ``"error ..."`` (see :data:`medflower.deploy.labnet.PROBE`)."""
        argv = [sys.executable, "-c", PROBE, self.coord_ip, str(port), method, path, str(self.certs / "ca.crt")]
        res = subprocess.run(
            ["ip", "netns", "exec", ns, *argv, str(cert or ""), str(key or "")],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return (res.stdout or res.stderr).strip()

    # ---- the README's steps: administrator ----
    def make_certs(self) -> None:
        """Administrator: CA and the coordinator's certificate (name and IP the hospitals dial)."""
        self.run(
            self.coord_ns,
            [
                "medflower",
                "deploy",
                "certs",
                "--out",
                str(self.certs),
                "--name",
                COORDINATOR_NAME,
                "--ip",
                self.coord_ip,
            ],
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
            "--admin-port",
            str(self.admin_port),
            "--admin-network",
            f"{self.admin_ip}/32",
            "--superlink-port",
            str(self.superlink_port),
        ]

    def start_coordinator(self) -> Proc:
        self.coordinator = self.spawn(self.coord_ns, self.coordinator_argv(), name="coordinator")
        self.wait_listening(self.coord_ns, self.coord_ip, self.port, proc=self.coordinator)
        self.wait_listening(
            self.coord_ns, "127.0.0.1", self.superlink_port, proc=self.coordinator
        )  # the SuperLink behind it
        return self.coordinator

    def superlink_pids(self) -> list[int]:
        return pids_running(self.coord_ns, "flower-superlink")

    def serverapp_pids(self) -> list[int]:
        """ServerApp processes Flower started in the coordinator's namespace."""
        return [p for p in ns_pids(self.coord_ns) if any("flwr-serverapp" in a for a in cmdline(p)[:2])]

    def kill_superlink(self) -> None:
        """SIGKILL the SuperLink process (a crash, an OOM kill); the launch script then stops nginx and
        exits, and what is left of the service is stopped, as a service manager does.

        Flower starts the ServerApp in a process of its own session (through ``flower-superexec``),
        which notices its parent's death only when its main thread next runs Python code, and then
        may block in its exit handler. systemd (``KillMode=control-group``, its default) and a
        container runtime stop every process of a service whose main process exited; everything in
        the coordinator's namespace is that service, so the lab does the same.
        """
        pids = self.superlink_pids()
        if not pids:
            raise LabError(f"no flower-superlink process in {self.coord_ns}\n{self.logs()}")
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        if self.coordinator is not None:
            self.coordinator.popen.wait(timeout=30)
        kill_ns_processes(self.coord_ns)

    def add_connection(self, *, ns: str | None = None, address: str | None = None, home: Path | None = None) -> None:
        """The administrator's `flwr` connection (default: on the coordinator host, to the admin port)."""
        self.run(
            ns or self.coord_ns,
            [
                "medflower",
                "deploy",
                "connection",
                "--name",
                CONNECTION,
                "--address",
                address or self.admin_address,
                "--ca",
                str(self.certs / "ca.crt"),
            ],
            home=home or self.admin_home,
        )

    def sign(self, site: Site, *, days: int | None = None) -> None:
        """Administrator: sign the hospital's CSR; the hospital installs the certificate (renewal: again)."""
        extra = ["--days", str(days)] if days is not None else []
        self.run(
            self.coord_ns,
            ["medflower", "deploy", "certs", "--out", str(self.certs), "--client-csr", str(site.csr), *extra],
        )
        shutil.copy(self.certs / "clients" / f"{site.name}.crt", site.cert)

    def register(self, site: Site, *, declared_examples: int | None = None) -> int:
        """Administrator: admit the hospital's key under its name (Flower and the site directory)."""
        extra = ["--declared-examples", str(declared_examples)] if declared_examples else []
        self.run(
            self.coord_ns,
            [
                "medflower",
                "deploy",
                "register",
                "--name",
                site.name,
                "--key",
                str(site.pub),
                "--directory",
                str(self.directory),
                *extra,
            ],
            home=self.admin_home,
            timeout=90,
        )
        return self.node_id(site.name)

    def unregister(self, site: Site) -> None:
        self.run(
            self.coord_ns,
            ["medflower", "deploy", "unregister", "--name", site.name, "--directory", str(self.directory)],
            home=self.admin_home,
            timeout=90,
        )

    def node_id(self, name: str) -> int:
        sites = json.loads(self.directory.read_text())["sites"]
        (node,) = [int(n) for n, e in sites.items() if e["name"] == name]
        return node

    def flwr(self, *args: str, ns: str | None = None, home: Path | None = None, check: bool = True) -> Any:
        """An administrator's ``flwr ... --format json`` (default: on the coordinator host); its JSON."""
        res = self.run(
            ns or self.coord_ns, ["flwr", *args, "--format", "json"], home=home or self.admin_home, check=check
        )
        try:
            return json.loads(res.stdout[res.stdout.index("{") :])
        except ValueError:
            if check:
                raise LabError(f"`flwr {' '.join(args)}` printed no JSON:\n{res.stdout}\n{res.stderr}") from None
            return {"success": False, "stdout": res.stdout, "stderr": res.stderr}

    def flwr_run(self, run_config: dict[str, str], *, app: Path = REPO) -> int:
        """Administrator: submit the app to the federation; returns the run id."""
        rc = " ".join(f"{k}='{v}'" for k, v in run_config.items())
        out = self.flwr("run", str(app), CONNECTION, "--run-config", rc)
        if not out.get("success") or "run-id" not in out:
            raise LabError(f"`flwr run` failed: {out}")
        return int(out["run-id"])

    def runs(self) -> list[dict[str, Any]]:
        return list(self.flwr("ls", CONNECTION).get("runs", []))

    def run_status(self, run_id: int) -> str:
        for r in self.runs():
            if int(r.get("run-id", -1)) == run_id:
                return str(r.get("status", ""))
        return ""

    def run_log(self, run_id: int) -> str:
        """Administrator: the run's log so far (``flwr log RUN_ID medflower --show``)."""
        res = self.run(
            self.coord_ns, ["flwr", "log", str(run_id), CONNECTION, "--show"], home=self.admin_home, timeout=60
        )
        return res.stdout

    def status(self, output_dir: Path) -> str:
        """Administrator: ``medflower deploy status`` for the run writing to ``output_dir``."""
        argv = ["medflower", "deploy", "status", "--directory", str(self.directory), "--output-dir", str(output_dir)]
        return self.run(self.coord_ns, argv, home=self.admin_home, timeout=90).stdout

    def stop_run(self, run_id: int) -> None:
        # check=False: the coordinator may already have marked a run whose ServerApp died as finished
        self.run(
            self.coord_ns, ["flwr", "stop", str(run_id), CONNECTION], home=self.admin_home, timeout=60, check=False
        )

    def nodes(self) -> list[dict[str, Any]]:
        return list(self.flwr("supernode", "ls", CONNECTION)["nodes"])

    def node_status(self, node_id: int) -> str:
        return next((str(n.get("status")) for n in self.nodes() if int(n["node-id"]) == node_id), "")

    # ---- the README's steps: hospital ----
    def node_key(self, site: Site) -> None:
        """Hospital IT: node key and TLS key with its CSR; the administrator hands over ca.crt."""
        self.run(site.ns, ["medflower", "deploy", "node-key", "--site", site.name, "--out", str(site.dir)])
        shutil.copy(self.certs / "ca.crt", site.ca)

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
                "--client-cert",
                str(site.cert),
                "--client-key",
                str(site.tls_key),
                *self.data_args(data),
                "--timeout",
                NODE_CHECK_TIMEOUT,
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
            "--coordinator-name",
            COORDINATOR_NAME,
            "--ca",
            str(site.ca),
            "--key",
            str(site.key),
            "--client-cert",
            str(site.cert),
            "--client-key",
            str(site.tls_key),
            *self.data_args(data),
            "--state",
            str(site.state),
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

    def onboard(self, site: Site, data: str | Path, *, check_node: bool = True, start: bool = True) -> None:
        """One hospital's steps: keys, certificate, registration, checks, start."""
        self.node_key(site)
        self.sign(site)
        self.register(site)
        if isinstance(data, Path):  # a hospital with its own files reads every one of them once
            self.run(site.ns, ["medflower", "site", "check", str(data)], timeout=300)
        if check_node:
            res = self.node_check(site, data)
            if res.returncode != 0:
                raise LabError(f"node check failed for {site.name}:\n{res.stdout}\n{res.stderr}")
        if start:
            self.start_hospital(site, data)

    def setup(self, node_configs: list[str | Path], *, check_nodes: bool = True) -> None:
        """The README's steps for the coordinator and every hospital, then start the hospitals' nodes."""
        self.make_certs()
        self.start_coordinator()
        self.add_connection()
        with ThreadPoolExecutor(max_workers=len(self.sites)) as pool:  # hospitals onboard independently
            futures = [
                pool.submit(self.onboard, site, cfg, check_node=check_nodes)
                for site, cfg in zip(self.sites, node_configs, strict=True)
            ]
            for fut in futures:
                fut.result()

    def logs(self) -> str:
        return "\n".join(
            f"---- {p.name} ({'running' if p.alive() else f'exit {p.popen.returncode}'}) ----\n{p.tail()}"
            for p in self.procs
        )
