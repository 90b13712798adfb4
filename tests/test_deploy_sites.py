"""``medflower deploy register / unregister / sites``: Flower's registration and the site directory agree.

``flwr`` is replaced on PATH by a fake that keeps its nodes in a JSON file and answers like
Flower 1.42's CLI (``--format json``), so these run in milliseconds with no SuperLink; the real
commands against a real SuperLink run in tests/test_deploy_netns.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from medflower.cli import main as cli
from medflower.deploy import certs, sites
from medflower.server.identity import read_directory

FAKE_FLWR = """#!/usr/bin/env python3
import json, os, sys
state_path = os.environ["FAKE_FLWR_STATE"]
state = json.load(open(state_path)) if os.path.exists(state_path) else {"next": 1001, "nodes": {}}
args = [a for a in sys.argv[1:] if a not in ("--format", "json")]
with open(state_path + ".calls", "a") as f:
    f.write(json.dumps(args) + "\\n")
if os.environ.get("FAKE_FLWR_FAIL"):
    print(json.dumps({"success": False, "error-message": "SuperLink unreachable"}))
    sys.exit(1)
if args[:2] == ["supernode", "register"]:
    key = open(args[2]).read().split()[1]
    if any(n["key"] == key for n in state["nodes"].values()):
        print(json.dumps({"success": False, "error-message": "Public key already in use"}))
        sys.exit(1)
    node = str(state["next"]); state["next"] += 1
    state["nodes"][node] = {"key": key, "status": "registered"}
    print(json.dumps({"success": True, "node-id": int(node)}))
elif args[:2] == ["supernode", "unregister"]:
    state["nodes"][args[2]]["status"] = "unregistered"
    print(json.dumps({"success": True}))
elif args[:2] == ["supernode", "ls"]:
    nodes = [{"node-id": n, "status": v["status"]} for n, v in state["nodes"].items()]
    print(json.dumps({"success": True, "nodes": nodes}))
json.dump(state, open(state_path, "w"))
"""


@pytest.fixture
def fake_flwr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "flwr").write_text(FAKE_FLWR)
    (bindir / "flwr").chmod(0o755)
    state = tmp_path / "flwr-state.json"
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_FLWR_STATE", str(state))
    return state


def _calls(state: Path) -> list[list[str]]:
    path = Path(str(state) + ".calls")
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _pub(tmp_path: Path, site: str) -> Path:
    return certs.make_node_key(tmp_path / "keys", site=site).public_key


def test_register_writes_the_directory_the_coordinator_reads(fake_flwr: Path, tmp_path: Path, capsys) -> None:
    directory = tmp_path / "state" / "sites.json"
    pub = _pub(tmp_path, "hospital-a")
    argv = ["deploy", "register", "--name", "hospital-a", "--key", str(pub), "--declared-examples", "1200"]
    assert cli([*argv, "--directory", str(directory), "--connection", "fed"]) == 0
    assert _calls(fake_flwr) == [["supernode", "register", str(pub), "fed", "--name", "hospital-a"]]
    data = json.loads(directory.read_text())
    assert data == {
        "format": 1,
        "sites": {"1001": {"name": "hospital-a", "key_sha256": certs.key_sha256(pub), "declared_examples": 1200}},
    }
    (site,) = read_directory(directory).values()  # exactly what the ServerApp reads every round
    assert (site.node_id, site.name, site.declared_examples) == (1001, "hospital-a", 1200)
    assert "registered hospital-a as node 1001" in capsys.readouterr().out


def test_a_duplicate_name_or_key_is_an_error_and_flower_is_not_asked(fake_flwr: Path, tmp_path: Path) -> None:
    directory = tmp_path / "sites.json"
    pub_a, pub_b = _pub(tmp_path, "hospital-a"), _pub(tmp_path, "hospital-b")
    sites.register_site(directory=directory, name="hospital-a", pub=pub_a)
    with pytest.raises(ValueError, match="--name hospital-a: already registered as node 1001"):
        sites.register_site(directory=directory, name="hospital-a", pub=pub_b)
    with pytest.raises(ValueError, match="this key is already registered, for site 'hospital-a'"):
        sites.register_site(directory=directory, name="hospital-c", pub=pub_a)
    assert len(_calls(fake_flwr)) == 1  # the refused ones never reached the SuperLink
    with pytest.raises(ValueError, match="--declared-examples must be a whole number >= 1"):
        sites.register_site(directory=directory, name="hospital-b", pub=pub_b, declared_examples=0)
    with pytest.raises(ValueError, match="site name 'a b'"):
        sites.register_site(directory=directory, name="a b", pub=pub_b)
    (tmp_path / "bad.pub").write_text("ssh-rsa AAAA nope\n")
    with pytest.raises(ValueError, match="--key .*bad.pub: not an OpenSSH public key"):
        sites.register_site(directory=directory, name="hospital-b", pub=tmp_path / "bad.pub")
    assert cli(["deploy", "register", "--name", "hospital-a", "--key", str(pub_b), "--directory", str(directory)]) == 2


def test_a_failed_flower_registration_writes_nothing(fake_flwr: Path, tmp_path: Path, monkeypatch) -> None:
    directory = tmp_path / "sites.json"
    monkeypatch.setenv("FAKE_FLWR_FAIL", "1")
    with pytest.raises(sites.FlwrError, match="SuperLink unreachable"):
        sites.register_site(directory=directory, name="hospital-a", pub=_pub(tmp_path, "hospital-a"))
    assert not directory.exists()


def test_unregister_revokes_the_key_then_removes_the_entry(fake_flwr: Path, tmp_path: Path, capsys) -> None:
    directory = tmp_path / "sites.json"
    sites.register_site(directory=directory, name="hospital-a", pub=_pub(tmp_path, "hospital-a"))
    sites.register_site(directory=directory, name="hospital-b", pub=_pub(tmp_path, "hospital-b"), declared_examples=7)
    assert cli(["deploy", "sites", "--directory", str(directory)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["site", "node", "id", "key", "sha256", "declared", "examples", "status"]
    assert table[1].split()[:2] == ["hospital-a", "1001"] and table[1].split()[-1] == "registered"
    assert table[2].split()[-2:] == ["7", "registered"]
    assert cli(["deploy", "unregister", "--name", "hospital-a", "--directory", str(directory)]) == 0
    assert ["supernode", "unregister", "1001"] in _calls(fake_flwr)
    assert [s.name for s in read_directory(directory).values()] == ["hospital-b"]
    with pytest.raises(ValueError, match="--name hospital-a: not in .* \\(registered: hospital-b\\)"):
        sites.unregister_site(directory=directory, name="hospital-a")
    # a key Flower already dropped is still removed from the directory, without asking Flower to drop it again
    sites.flwr_json(["supernode", "unregister", "1002"], what="by hand")
    before = len(_calls(fake_flwr))
    sites.unregister_site(directory=directory, name="hospital-b")
    assert [c[:2] for c in _calls(fake_flwr)[before:]] == [["supernode", "ls"]]
    assert read_directory(directory) == {}


def test_sites_without_flower_and_the_directory_from_the_environment(tmp_path: Path, monkeypatch, capsys) -> None:
    directory = tmp_path / "sites.json"
    directory.write_text(json.dumps({"format": 1, "sites": {"5": {"name": "h", "key_sha256": "ab" * 32}}}))
    monkeypatch.setenv("MEDFLOWER_SITE_DIRECTORY", str(directory))
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # no flwr at all
    assert cli(["deploy", "sites"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["h", "5", "ab" * 8, "unknown"]
    monkeypatch.delenv("MEDFLOWER_SITE_DIRECTORY")
    assert cli(["deploy", "sites"]) == 2
    assert "--directory: give the coordinator's site directory" in capsys.readouterr().err
