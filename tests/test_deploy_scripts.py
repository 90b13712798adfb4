"""The launch scripts exec exactly the Flower commands deploy/README.md promises.

``flower-superlink``, ``flower-supernode`` and ``medflower`` are replaced on PATH by shims that
record their arguments and environment, so these tests run in milliseconds and need no network.
(The scripts running the real programs are covered by tests/test_deploy_netns.py.)
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SHIM = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["SHIM_LOG"], "a") as f:
    f.write(json.dumps({"argv": [os.path.basename(sys.argv[0])] + sys.argv[1:],
                        "env": {k: os.environ.get(k) for k in ("FLWR_HOME", "FLWR_TELEMETRY_ENABLED",
                                "FLWR_DISABLE_UPDATE_CHECK", "RAY_USAGE_STATS_ENABLED",
                                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION")}}) + "\\n")
sys.exit(int(os.environ.get("SHIM_RC_" + os.path.basename(sys.argv[0]).replace("-", "_"), "0")))
"""


@pytest.fixture
def shims(tmp_path: Path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("flower-superlink", "flower-supernode", "medflower"):
        (bindir / name).write_text(SHIM)
        (bindir / name).chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "SHIM_LOG": str(log)}
    env.pop("FLWR_HOME", None)

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


def _certs(tmp_path: Path) -> Path:
    d = tmp_path / "certs"
    d.mkdir()
    for f in ("ca.crt", "coordinator.crt", "coordinator.key"):
        (d / f).write_text("x")
    return d


def test_coordinator_runs_superlink_with_tls_auth_and_no_runtime_installs(shims, tmp_path: Path) -> None:
    certs = _certs(tmp_path)
    res, calls = shims("start-coordinator.sh", "--certs", str(certs), "--state", str(tmp_path / "st"), "--port", "9443")
    assert res.returncode == 0, res.stderr
    (call,) = calls
    argv = call["argv"]
    assert argv[0] == "flower-superlink"
    pairs = dict(itertools.pairwise(argv))
    assert pairs["--ssl-ca-certfile"] == f"{certs}/ca.crt"
    assert (
        pairs["--ssl-certfile"] == f"{certs}/coordinator.crt" and pairs["--ssl-keyfile"] == f"{certs}/coordinator.key"
    )
    assert pairs["--database"] == f"{tmp_path}/st/superlink.db" and pairs["--port"] == "9443"
    assert "--enable-supernode-auth" in argv and "--disable-runtime-dependency-installation" in argv
    assert "--insecure" not in argv
    assert call["env"] == {
        "FLWR_HOME": f"{tmp_path}/st/flwr-home",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }


def test_coordinator_refuses_to_start_without_its_certificate(shims, tmp_path: Path) -> None:
    certs = _certs(tmp_path)
    (certs / "coordinator.key").unlink()
    res, calls = shims("start-coordinator.sh", "--certs", str(certs), "--state", str(tmp_path / "st"))
    assert res.returncode == 2 and calls == []
    assert "coordinator.key is missing" in res.stderr and "medflower deploy certs" in res.stderr


def test_hospital_checks_then_runs_supernode_with_site_config(shims, tmp_path: Path) -> None:
    site = tmp_path / "conf" / "site.yaml"
    site.parent.mkdir()
    site.write_text("name: h\n")
    res, calls = shims(
        "start-hospital.sh",
        "--coordinator",
        "coordinator:9093",
        "--ca",
        "ca.crt",
        "--key",
        "h.key",
        "--site-config",
        "conf/site.yaml",
        "--state",
        str(tmp_path / "fh"),
    )
    assert res.returncode == 0, res.stderr
    check, node = calls
    node_config = f"site-config='{site}'"  # absolute: the ClientApp process runs in another folder
    assert check["argv"] == [
        "medflower",
        "node",
        "check",
        "--coordinator",
        "coordinator:9093",
        "--ca",
        "ca.crt",
        "--key",
        "h.key",
        "--node-config",
        node_config,
    ]
    assert node["argv"] == [
        "flower-supernode",
        "--superlink",
        "coordinator:9093",
        "--root-certificates",
        "ca.crt",
        "--auth-supernode-private-key",
        "h.key",
        "--node-config",
        node_config,
    ]
    assert node["env"]["FLWR_HOME"] == str(tmp_path / "fh")
    assert node["env"]["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"


def _hospital(shims, *extra: str):
    return shims(
        "start-hospital.sh",
        "--coordinator",
        "c:1",
        "--ca",
        "ca.crt",
        "--key",
        "k",
        "--node-config",
        "partition-id=0 num-partitions=3",
        "--no-check",
        *extra,
    )


def test_hospital_runs_only_signed_app_bundles_when_it_names_trusted_entities(shims, tmp_path: Path) -> None:
    """deploy/README.md, "Which code runs at your hospital": Flower's --trusted-entities, or its default."""
    (tmp_path / "trust").mkdir()
    (tmp_path / "trust" / "entities.yaml").write_text("fpk_x: ssh-ed25519 AAAA\n")
    res, calls = _hospital(shims, "--trusted-entities", "trust/entities.yaml")
    assert res.returncode == 0, res.stderr
    (node,) = calls
    assert node["argv"][0] == "flower-supernode"
    # absolute: the node's working directory is not the hospital's
    assert node["argv"][-2:] == ["--trusted-entities", str(tmp_path / "trust" / "entities.yaml")]
    for default in ([], ["--trusted-entities", ""]):  # empty (compose's default) = Flower's default
        res, calls = _hospital(shims, *default)
        assert res.returncode == 0, res.stderr
        assert "--trusted-entities" not in calls[0]["argv"], default


def test_hospital_refuses_a_missing_trusted_entities_file(shims) -> None:
    res, calls = _hospital(shims, "--trusted-entities", "nowhere.yaml")
    assert res.returncode == 2 and calls == []
    assert "--trusted-entities nowhere.yaml: file not found" in res.stderr


def test_hospital_does_not_start_when_its_check_fails(shims, tmp_path: Path) -> None:
    res, calls = shims(
        "start-hospital.sh",
        "--coordinator",
        "c:1",
        "--ca",
        "ca.crt",
        "--key",
        "k",
        "--node-config",
        "partition-id=0 num-partitions=3",
        extra_env={"SHIM_RC_medflower": "1"},
    )
    assert res.returncode == 1
    assert [c["argv"][0] for c in calls] == ["medflower"]  # no flower-supernode after a failed check


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ca", "a", "--key", "k", "--node-config", "x=1"], "--coordinator HOST:PORT is required"),
        (["--coordinator", "c:1", "--ca", "a", "--key", "k"], "--site-config site.yaml (or --node-config) is required"),
        (
            ["--coordinator", "c:1", "--ca", "a", "--key", "k", "--site-config", "s.yaml", "--node-config", "x=1"],
            "not both",
        ),
        (["--coordinator", "c:1", "--bogus"], "unknown argument '--bogus'"),
        (
            ["--coordinator", "c:1", "--ca", "a", "--key", "k", "--site-config", "nowhere/site.yaml"],
            "--site-config nowhere/site.yaml: file not found",
        ),
    ],
)
def test_hospital_argument_errors_name_the_argument(shims, args, message) -> None:
    res, calls = shims("start-hospital.sh", *args)
    assert res.returncode == 2 and calls == []
    assert message in res.stderr
