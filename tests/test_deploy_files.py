"""The container files and deploy/README.md stay in step with the tested launch scripts.

There is no Docker engine here, so the compose file and Dockerfile are checked statically: the
compose services run the same scripts with the same flags as :class:`medflower.deploy.lab.Lab` (which the
namespace test runs), and everything the Dockerfile copies or greps exists. The README's commands
are checked to use only flags their program accepts (the namespace test checks they were run).
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import tomli
import yaml

from medflower.deploy import readme_check
from medflower.deploy.lab import Lab, Site

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _flags(argv: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for i, tok in enumerate(argv):
        if tok.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
            out[tok] = nxt
    return out


def _script_flags(script: str) -> set[str]:
    """The flags a launch script's argument parser accepts (its `case` labels)."""
    text = (DEPLOY / script).read_text()
    return set(re.findall(r"^\s*(--[a-z-]+)(?:\|[^)]*)?\)", text, re.M))


def _lab_argv() -> tuple[list[str], list[str]]:
    lab = Lab(Path("/nonexistent/lab"))
    site = Site("hospital-1", "ns", "10.0.0.2", Path("/s"))
    return lab.coordinator_argv(), lab.hospital_argv(site, Path("/s/site.yaml"))  # as the lab's hospital-1


def test_compose_runs_one_coordinator_and_three_hospitals_like_the_lab() -> None:
    services = _compose()["services"]
    lab_coord, lab_hosp = _lab_argv()
    runners = {n: s for n, s in services.items() if "admin" not in s.get("profiles", [])}
    assert sorted(runners) == ["coordinator", "hospital-1", "hospital-2", "hospital-3"]

    coord = runners["coordinator"]["command"]
    assert Path(coord[0]).name == "start-coordinator.sh"
    assert set(_flags(coord)) == set(_flags(lab_coord[1:]))
    port, admin_port = _flags(coord)["--port"], _flags(coord)["--admin-port"]
    assert runners["coordinator"]["ports"] == [f"{port}:{port}"]  # the hospital port only, never the admin port
    # the Control API is allowed from the admin network, which only the admin service (no hospital) is on
    subnet = _compose()["networks"]["admin"]["ipam"]["config"][0]["subnet"]
    assert _flags(coord)["--admin-network"] == subnet and admin_port != port
    assert sorted(runners["coordinator"]["networks"]) == ["admin", "federation"]
    assert services["admin"]["networks"] == ["admin"]
    assert all("admin" not in runners[f"hospital-{i}"].get("networks", ["federation"]) for i in (1, 2, 3))
    assert "coordinator-state:/state" in services["admin"]["volumes"]  # `deploy register` writes sites.json there
    assert services["admin"]["environment"]["MEDFLOWER_SITE_DIRECTORY"] == "/state/sites.json"

    # the lab's hospitals were checked (`medflower node check`) just before they started
    lab_flags = set(_flags(lab_hosp[1:])) - {"--no-check"}
    for i in (1, 2, 3):
        cmd = runners[f"hospital-{i}"]["command"]
        assert Path(cmd[0]).name == "start-hospital.sh"
        flags = _flags(cmd)
        assert set(flags) == lab_flags, f"hospital-{i}"
        assert flags["--coordinator"] == f"coordinator:{port}"  # the service name; in the certificate (README)
        assert flags["--key"] == f"/node/hospital-{i}.key"
        assert flags["--client-cert"] == f"/node/hospital-{i}.crt"
        assert flags["--client-key"] == f"/node/hospital-{i}.tls.key"
        assert flags["--state"] == "/state" and f"hospital-{i}-state:/state" in runners[f"hospital-{i}"]["volumes"]
        assert runners[f"hospital-{i}"]["depends_on"] == ["coordinator"]
        # the hospital's choice of code (deploy/README.md): empty unless the operator sets it
        assert flags["--trusted-entities"] == "${MEDFLOWER_TRUSTED_ENTITIES:-}", f"hospital-{i}"


@pytest.mark.parametrize("script", ["start-coordinator.sh", "start-hospital.sh"])
def test_compose_and_lab_flags_are_ones_the_scripts_accept(script: str) -> None:
    accepted = _script_flags(script)
    assert "--state" in accepted  # the parser regex works
    lab_coord, lab_hosp = _lab_argv()
    commands = [c["command"] for c in _compose()["services"].values() if Path(c["command"][0]).name == script]
    commands.append(lab_coord if script == "start-coordinator.sh" else lab_hosp)
    for cmd in commands:
        assert set(_flags(cmd)) <= accepted, cmd


def _dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def test_dockerfile_copies_every_package_pip_installs() -> None:
    text = _dockerfile()
    sources = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ")]
    copied = {src for group in sources for src in group}
    for src in copied:
        assert (REPO / src).exists(), src
    pyproject = tomli.loads((REPO / "pyproject.toml").read_text())
    packages = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    assert packages <= copied, packages - copied
    assert pyproject["project"]["readme"] in copied
    # `flwr run .` in the admin container bundles /opt/medflower: its components must be there
    for ref in pyproject["tool"]["flwr"]["app"]["components"].values():
        top = ref.split(":")[0].split(".")[0]
        assert top in copied or f"{top}.py" in copied, ref
    # the compose commands are relative to WORKDIR, where deploy/ is copied
    workdir = re.search(r"^WORKDIR (\S+)", text, re.M).group(1)
    assert "COPY deploy ./deploy" in text and workdir == "/opt/medflower"
    assert _compose()["services"]["admin"]["working_dir"] == workdir


def test_dockerfile_installs_the_pinned_torch_from_the_chosen_wheel_index() -> None:
    text = _dockerfile()
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", text, re.M)
    assert "https://download.pytorch.org/whl/${TORCH_VARIANT}" in text
    grep = re.search(r"TORCH_PIN=\"\$\((.*?)\)\"", text).group(1)
    pin = subprocess.run(["bash", "-c", grep], cwd=REPO, capture_output=True, text=True).stdout.strip()
    deps = tomli.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert pin.startswith("torch==") and pin in deps
    for var in (
        "FLWR_TELEMETRY_ENABLED=0",
        "FLWR_DISABLE_UPDATE_CHECK=1",
        "RAY_USAGE_STATS_ENABLED=0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1",
    ):
        assert var in text
    assert re.search(r"^USER medflower$", text, re.M)  # not root
    assert re.search(r"apt-get install -y --no-install-recommends nginx", text)  # the proxies (both roles)
    assert _compose()["x-image"]["build"]["dockerfile"] == "deploy/Dockerfile"


def test_readme_commands_use_only_flags_their_program_accepts() -> None:
    from medflower.cli import build_parser

    commands = readme_check.readme_commands()
    assert len(commands) >= 10
    for line in commands:
        argv = shlex.split(line)
        prog, _subs, _ = readme_check.signature(argv)
        assert prog in readme_check.CHECKED, line
        if prog.endswith(".sh"):
            assert set(_flags(argv)) <= _script_flags(prog), line
        elif prog == "medflower":
            build_parser().parse_args(argv[1:])  # exits (SystemExit) on an unknown flag
    assert all("docker" in b for b in readme_check.skipped_blocks())  # only the container block is exempt


def test_readme_checker_catches_an_unrun_command() -> None:
    recorded = [
        ["medflower", "deploy", "certs", "--out", "x", "--name", "n"],
        ["flwr", "run", "/repo", "medflower", "--run-config", "a=1", "--format", "json"],
    ]
    assert (
        readme_check.unexercised(
            ["medflower deploy certs --out /c --name a", "flwr run . medflower --run-config x"], recorded
        )
        == []
    )
    assert readme_check.unexercised(["medflower deploy certs --out /c --days 3"], recorded) != []
    assert readme_check.unexercised(["flwr ls medflower"], recorded) != []
    assert readme_check.unexercised(["rm -rf /"], recorded) != []
