"""The launch scripts run exactly the commands deploy/README.md promises.

``flower-superlink``, ``flower-supernode``, ``nginx`` and ``medflower`` are replaced on PATH by
shims that record their arguments and environment, so these tests run in milliseconds and need no
network. (The scripts running the real programs are covered by tests/test_deploy_netns.py.)
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SHIM = """#!/usr/bin/env python3
import json, os, sys, time
name = os.path.basename(sys.argv[0])
with open(os.environ["SHIM_LOG"], "a") as f:
    f.write(json.dumps({"argv": [name] + sys.argv[1:],
                        "env": {k: os.environ.get(k) for k in ("FLWR_HOME", "FLWR_TELEMETRY_ENABLED",
                                "FLWR_DISABLE_UPDATE_CHECK", "RAY_USAGE_STATS_ENABLED",
                                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "MEDFLOWER_SITE_DIRECTORY")}}) + "\\n")
if "proxy-config" in sys.argv:  # the launch scripts read the config's path from its output
    print(sys.argv[sys.argv.index("--out") + 1] + "/nginx.conf")
key = name.replace("-", "_")
if os.environ.get("SHIM_SAY_" + key):
    print(os.environ["SHIM_SAY_" + key], flush=True)
time.sleep(float(os.environ.get("SHIM_SLEEP_" + key, "0")))
sys.exit(int(os.environ.get("SHIM_RC_" + key, "0")))
"""
PROGRAMS = ("flower-superlink", "flower-supernode", "medflower", "nginx")


@pytest.fixture
def shims(tmp_path: Path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in PROGRAMS:
        (bindir / name).write_text(SHIM)
        (bindir / name).chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "SHIM_LOG": str(log)}
    # the two long-running programs outlive each other's start, so that both are recorded before
    # the first to exit makes the script stop the other
    env |= {"SHIM_SLEEP_nginx": "0.5", "SHIM_SLEEP_flower_superlink": "0.5", "SHIM_SLEEP_flower_supernode": "0.5"}
    for var in ("FLWR_HOME", "MEDFLOWER_SITE_DIRECTORY"):
        env.pop(var, None)

    def run(script: str, *args: str, extra_env: dict | None = None) -> tuple[subprocess.CompletedProcess, list[dict]]:
        res = subprocess.run(
            [str(DEPLOY / script), *args],
            env={**env, **(extra_env or {})},
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=30,
        )
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        log.unlink(missing_ok=True)
        return res, calls

    return run


def _by_program(calls: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for c in calls:
        out.setdefault(c["argv"][0], []).append(c)
    return out


def _certs(tmp_path: Path) -> Path:
    d = tmp_path / "certs"
    d.mkdir()
    for f in ("ca.crt", "coordinator.crt", "coordinator.key"):
        (d / f).write_text("x")
    return d


def test_coordinator_runs_superlink_on_loopback_behind_the_proxy(shims, tmp_path: Path) -> None:
    certs = _certs(tmp_path)
    st = tmp_path / "st"
    res, calls = shims(
        "start-coordinator.sh",
        *("--certs", str(certs), "--state", str(st), "--port", "9443"),
        *("--admin-network", "10.0.5.0/24", "--admin-network", "10.0.6.7"),
    )
    assert res.returncode == 0, res.stderr
    progs = _by_program(calls)
    ((config,), (superlink,), (nginx,)) = progs["medflower"], progs["flower-superlink"], progs["nginx"]
    assert config["argv"] == [
        *("medflower", "deploy", "proxy-config", "coordinator", "--out", f"{st}/proxy"),
        *("--listen", "0.0.0.0:9443", "--certs", str(certs), "--admin-port", "9094"),
        *("--superlink", "127.0.0.1:9095", "--admin-network", "10.0.5.0/24", "--admin-network", "10.0.6.7"),
    ]
    argv = superlink["argv"]
    pairs = dict(itertools.pairwise(argv))
    assert pairs["--ssl-ca-certfile"] == f"{certs}/ca.crt"
    assert (
        pairs["--ssl-certfile"] == f"{certs}/coordinator.crt" and pairs["--ssl-keyfile"] == f"{certs}/coordinator.key"
    )
    assert pairs["--database"] == f"{st}/superlink.db"
    assert pairs["--host"] == "127.0.0.1" and pairs["--port"] == "9095"  # never on the network itself
    assert "--enable-supernode-auth" in argv and "--disable-runtime-dependency-installation" in argv
    assert "--insecure" not in argv
    assert superlink["env"] == {
        "FLWR_HOME": f"{st}/flwr-home",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "MEDFLOWER_SITE_DIRECTORY": f"{st}/sites.json",  # the ServerApp (a subprocess of it) inherits it
    }
    conf = f"{st}/proxy/nginx.conf"
    assert nginx["argv"] == [
        "nginx",
        "-p",
        f"{st}/proxy",
        "-c",
        conf,
        "-e",
        f"{st}/proxy/error.log",
        "-g",
        "daemon off;",
    ]


def test_coordinator_stops_the_proxy_when_the_superlink_dies(shims, tmp_path: Path) -> None:
    """One of the two exits: the other is stopped and the script exits with its status (for a restart)."""
    certs = _certs(tmp_path)
    res, _ = shims(
        "start-coordinator.sh",
        *("--certs", str(certs), "--state", str(tmp_path / "st")),
        extra_env={"SHIM_RC_flower_superlink": "137", "SHIM_SLEEP_flower_superlink": "0.5", "SHIM_SLEEP_nginx": "60"},
    )
    assert res.returncode == 137, res.stderr  # well before nginx's 60 s: it was stopped


def test_coordinator_refuses_to_start_without_its_certificate_or_nginx(shims, tmp_path: Path) -> None:
    certs = _certs(tmp_path)
    (certs / "coordinator.key").unlink()
    res, calls = shims("start-coordinator.sh", "--certs", str(certs), "--state", str(tmp_path / "st"))
    assert res.returncode == 2 and calls == []
    assert "coordinator.key is missing" in res.stderr and "medflower deploy certs" in res.stderr
    (certs / "coordinator.key").write_text("x")
    (tmp_path / "bin" / "nginx").unlink()
    if shutil.which("nginx", path="/usr/bin:/bin"):
        pytest.skip("nginx is installed in /usr/bin or /bin: cannot hide it from the script")
    res, calls = shims(
        "start-coordinator.sh",
        *("--certs", str(certs), "--state", str(tmp_path / "st")),
        extra_env={"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"},
    )
    assert res.returncode == 2 and calls == []
    assert "nginx is not installed" in res.stderr


def _hospital_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        *("--coordinator", "coordinator:9093", "--ca", "ca.crt", "--key", "h.key"),
        *("--client-cert", "h.crt", "--client-key", "h.tls.key", "--state", str(tmp_path / "node")),
        *extra,
    ]


def test_hospital_checks_then_runs_supernode_through_its_sidecar(shims, tmp_path: Path) -> None:
    site = tmp_path / "conf" / "site.yaml"
    site.parent.mkdir()
    site.write_text("name: h\n")
    node = tmp_path / "node"
    args = _hospital_args(tmp_path, "--site-config", "conf/site.yaml", "--proxy-port", "9092", "--port", "9190")
    res, calls = shims("start-hospital.sh", *args)
    assert res.returncode == 0, res.stderr
    progs = _by_program(calls)
    (check, config), (nginx,), (supernode,) = progs["medflower"], progs["nginx"], progs["flower-supernode"]
    # absolute paths: the ClientApp runs in another folder; state-dir: its ledger and audit log
    node_config = f"site-config='{site}' state-dir='{node}'"
    assert check["argv"] == [
        *("medflower", "node", "check", "--coordinator", "coordinator:9093", "--ca", "ca.crt", "--key", "h.key"),
        *("--client-cert", "h.crt", "--client-key", "h.tls.key", "--node-config", node_config),
    ]
    assert config["argv"] == [
        *("medflower", "deploy", "proxy-config", "hospital", "--out", f"{node}/proxy", "--listen", "127.0.0.1:9092"),
        *("--coordinator", "coordinator:9093", "--ca", "ca.crt", "--client-cert", "h.crt", "--client-key", "h.tls.key"),
    ]
    assert nginx["argv"][:5] == ["nginx", "-p", f"{node}/proxy", "-c", f"{node}/proxy/nginx.conf"]
    assert supernode["argv"] == [
        *("flower-supernode", "--superlink", "127.0.0.1:9092"),  # the sidecar, on loopback
        *("--host", "127.0.0.1", "--port", "9190"),  # its own Runtime API, for its ClientApps: loopback only
        *("--root-certificates", f"{node}/proxy/loopback-ca.crt", "--auth-supernode-private-key", "h.key"),
        *("--node-config", node_config),
    ]
    assert supernode["env"]["FLWR_HOME"] == f"{node}/flwr-home"
    assert supernode["env"]["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"


def test_hospital_state_folder_joins_a_raw_node_config_and_a_coordinator_name(shims, tmp_path: Path) -> None:
    res, calls = _hospital(shims, tmp_path, "--coordinator-name", "coordinator.example.org", "--proxy-port", "9300")
    assert res.returncode == 0, res.stderr
    progs = _by_program(calls)
    (config,), (supernode,) = progs["medflower"], progs["flower-supernode"]
    assert config["argv"][-2:] == ["--coordinator-name", "coordinator.example.org"]
    assert "127.0.0.1:9300" in config["argv"] and supernode["argv"][2] == "127.0.0.1:9300"
    pairs = dict(itertools.pairwise(supernode["argv"]))
    assert pairs["--node-config"] == f"partition-id=0 num-partitions=3 state-dir='{tmp_path / 'node'}'"


def _hospital(shims, tmp_path: Path, *extra: str, extra_env: dict | None = None):
    args = _hospital_args(tmp_path, "--node-config", "partition-id=0 num-partitions=3", "--no-check", *extra)
    return shims("start-hospital.sh", *args, extra_env=extra_env)


def test_hospital_picks_free_loopback_ports_and_prints_them(shims, tmp_path: Path) -> None:
    """Two nodes on one host: without --port/--proxy-port each gets free ports, never Flower's fixed 9094."""
    res, calls = _hospital(shims, tmp_path)
    assert res.returncode == 0, res.stderr
    (node,) = _by_program(calls)["flower-supernode"]
    pairs = dict(itertools.pairwise(node["argv"]))
    sidecar, runtime = pairs["--superlink"], f"{pairs['--host']}:{pairs['--port']}"
    assert sidecar.startswith("127.0.0.1:") and pairs["--host"] == "127.0.0.1" and sidecar != runtime
    assert f"sidecar on {sidecar}" in res.stdout and f"Runtime API on {runtime}" in res.stdout
    res, calls = _hospital(shims, tmp_path, "--port", "9200", "--proxy-port", "9200")
    assert res.returncode == 2 and "give two different ports" in res.stderr and calls == []


def test_hospital_explains_a_refused_key(shims, tmp_path: Path) -> None:
    """Flower's refusal of an unregistered key (its log; the process exits 1) gets its cause and action."""
    flower_says = (
        "Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n[code: 3] Failed to activate SuperNode."
    )
    res, _ = _hospital(
        shims,
        tmp_path,
        extra_env={"SHIM_RC_flower_supernode": "1", "SHIM_SAY_flower_supernode": flower_says, "SHIM_SLEEP_nginx": "60"},
    )
    assert res.returncode == 1
    assert "Failed to activate SuperNode" in res.stdout  # Flower's own output still shows
    assert "its key is not registered there" in res.stderr and "Send h.pub (key sha256 " in res.stderr, res.stderr


def test_hospital_runs_only_signed_app_bundles_when_it_names_trusted_entities(shims, tmp_path: Path) -> None:
    """deploy/README.md, "Which code runs at your hospital": Flower's --trusted-entities, or its default."""
    (tmp_path / "trust").mkdir()
    (tmp_path / "trust" / "entities.yaml").write_text("fpk_x: ssh-ed25519 AAAA\n")
    res, calls = _hospital(shims, tmp_path, "--trusted-entities", "trust/entities.yaml")
    assert res.returncode == 0, res.stderr
    (node,) = _by_program(calls)["flower-supernode"]
    # absolute: the node's working directory is not the hospital's
    assert node["argv"][-2:] == ["--trusted-entities", str(tmp_path / "trust" / "entities.yaml")]
    for default in ([], ["--trusted-entities", ""]):  # empty (compose's default) = Flower's default
        res, calls = _hospital(shims, tmp_path, *default)
        assert res.returncode == 0, res.stderr
        assert "--trusted-entities" not in _by_program(calls)["flower-supernode"][0]["argv"], default


def test_hospital_refuses_a_missing_trusted_entities_file(shims, tmp_path: Path) -> None:
    res, calls = _hospital(shims, tmp_path, "--trusted-entities", "nowhere.yaml")
    assert res.returncode == 2 and calls == []
    assert "--trusted-entities nowhere.yaml: file not found" in res.stderr


def test_hospital_does_not_start_when_its_check_fails(shims, tmp_path: Path) -> None:
    args = _hospital_args(tmp_path, "--node-config", "partition-id=0 num-partitions=3")
    res, calls = shims("start-hospital.sh", *args, extra_env={"SHIM_RC_medflower": "1"})
    assert res.returncode == 1
    assert [c["argv"][:3] for c in calls] == [["medflower", "node", "check"]]  # nothing started after it


def test_hospital_stops_the_sidecar_when_the_supernode_exits(shims, tmp_path: Path) -> None:
    args = _hospital_args(tmp_path, "--node-config", "partition-id=0 num-partitions=3", "--no-check")
    res, _ = shims(
        "start-hospital.sh",
        *args,
        extra_env={"SHIM_RC_flower_supernode": "5", "SHIM_SLEEP_flower_supernode": "0.5", "SHIM_SLEEP_nginx": "60"},
    )
    assert res.returncode == 5, res.stderr  # e.g. Flower's exit code when the node's key is refused


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ca", "a", "--key", "k", "--node-config", "x=1"], "--coordinator HOST:PORT is required"),
        (["--coordinator", "c:1", "--ca", "a", "--key", "k"], "--client-cert SITE.crt is required"),
        (["--coordinator", "c:1", "--ca", "a", "--key", "k", "--client-cert", "c"], "--client-key SITE.tls.key is"),
        (["--coordinator", "c:1", "--ca", "a", "--key", "k", "--client-cert", "c", "--client-key", "t"], "--state DIR"),
        (["--coordinator", "c:1", "--bogus"], "unknown argument '--bogus'"),
    ],
)
def test_hospital_argument_errors_name_the_argument(shims, args, message) -> None:
    res, calls = shims("start-hospital.sh", *args)
    assert res.returncode == 2 and calls == []
    assert message in res.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "--site-config site.yaml (or --node-config) is required"),
        (["--site-config", "s.yaml", "--node-config", "x=1"], "not both"),
        (["--site-config", "nowhere/site.yaml"], "--site-config nowhere/site.yaml: file not found"),
        (["--node-config", "partition-id=0 state-dir='/x'"], "--node-config must not set state-dir: give --state DIR"),
    ],
)
def test_hospital_data_argument_errors(shims, tmp_path: Path, extra: list[str], message: str) -> None:
    res, calls = shims("start-hospital.sh", *_hospital_args(tmp_path, *extra))
    assert res.returncode == 2 and calls == []
    assert message in res.stderr


@pytest.mark.parametrize("script", ["start-coordinator.sh", "start-hospital.sh"])
def test_help_prints_the_whole_header_comment(script: str) -> None:
    res = subprocess.run([str(DEPLOY / script), "--help"], capture_output=True, text=True, timeout=10)
    header = []
    for line in (DEPLOY / script).read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        header.append(line)
    assert res.returncode == 0 and res.stdout.splitlines() == header
