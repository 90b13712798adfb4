"""A real deployment on one machine: a coordinator and 3 hospitals in their own network namespaces.

TLS and SuperNode authentication are on; everything is started by the commands and scripts of
deploy/README.md (through :class:`medflower.deploy.lab.Lab`, which records every command it runs). Covers:
a run to completion through ``flwr run``; an unregistered node is refused; the ServerApp is killed
and a resubmitted run resumes from the checkpoint with no round repeated or lost; a hospital's link
is cut mid-round and the run completes with the others, the absence recorded in summary.json.

Costly (every Flower message starts a ClientApp process that imports torch and MONAI), so the
federation is shared by the module and the experiment is tiny. Skips without root/``ip netns``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from flwr.cli.build import build_fab_from_disk

from medflower import __version__
from medflower.deploy.lab import REPO, Lab, LabError, netns_unavailable_reason, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

_REASON = netns_unavailable_reason()
if _REASON is not None:
    pytest.skip(f"deployment lab unavailable: {_REASON}", allow_module_level=True)

NUM_SITES = 3
RUN_TIMEOUT = 600
SIM_PARTITION = "partition-id={} num-partitions=3"


def _file_site(root: Path) -> Path:
    """hospital-1 serves files: a site YAML over a folder of PNGs (synthetic blobs, written here)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:28, :28]
    for label in (0, 1):
        d = root / "hospital-1-export" / str(label)
        d.mkdir(parents=True)
        for i in range(40):
            img = rng.normal(0.3, 0.1, (28, 28))
            if label:
                cy, cx = rng.integers(8, 20, 2)
                img += 0.5 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 18.0)
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), "L").save(d / f"img{i:03d}.png")
    site = root / "hospital-1-site.yaml"
    site.write_text("name: hospital-1\ntask: classification\ndata:\n  kind: folders\n  path: hospital-1-export\n")
    return site


def _experiment(root: Path, name: str, rounds: int) -> Path:
    """Synthetic quick-start data, tiny; one site evaluates per round (each message is a process)."""
    path = root / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nseed: 0\n"
        "data: {kind: synthetic, synthetic_samples: 240}\n"
        f"partition: {{kind: iid, num_sites: {NUM_SITES}}}\n"
        "model: {name: cnn}\n"
        f"train: {{rounds: {rounds}, batch_size: 32}}\n"
        "strategy: {fraction_evaluate: 0.0}\n"
        "participation: {min_sites: 2, round_timeout: 240, startup_timeout: 120}\n"
    )
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("deploy-lab")
    with Lab(root, num_sites=NUM_SITES) as lab:
        lab.setup([_file_site(root), SIM_PARTITION.format(1), SIM_PARTITION.format(2)])
        # an extra machine with a well-formed node key the administrator never registered; it is
        # started now (it only needs to be refused) so that it overlaps with the first run
        rogue = lab.add_site_namespace("rogue")
        lab.node_key(rogue)
        lab.rogue, lab.rogue_site = lab.start_hospital(rogue, SIM_PARTITION.format(0)), rogue
        yield lab


def test_lab_cleans_up_namespaces_and_processes_even_on_failure(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), Lab(tmp_path, num_sites=1, tag=f"mf{os.getpid()}x0") as tiny:
        proc = tiny.spawn(tiny.sites[0].ns, ["sleep", "300"], name="sleeper")
        names = set(tiny._namespaces)
        res = tiny.run(tiny.sites[0].ns, ["ip", "-o", "-4", "addr", "show", "eth0"])
        assert f"{tiny.sites[0].ip}/24" in res.stdout  # its own address, on its own interface
        raise RuntimeError("boom")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not names & {line.split()[0] for line in listed.splitlines() if line.strip()}
    assert proc.popen.poll() is not None


def _summary(out: Path, lab: Lab, run_id: int) -> dict:
    polls = iter(range(10**9))

    def done():
        if (out / "summary.json").is_file():
            return True
        if next(polls) % 20 == 19:  # `flwr ls` costs a Python start: ask the coordinator only now and then
            status = lab.run_status(run_id)
            if status.startswith("finished") and not (out / "summary.json").is_file():
                raise LabError(f"run {run_id} ended ({status}) without summary.json\n{lab.logs()}")
        return False

    wait_for(done, timeout=RUN_TIMEOUT, interval=1.0, what=f"run {run_id}'s summary.json", lab=lab)
    return json.loads((out / "summary.json").read_text())


def _checkpoint_round(out: Path) -> int:
    try:
        return int(json.loads((out / "checkpoint" / "checkpoint.json").read_text())["round"])
    except (OSError, ValueError, KeyError):
        return 0


def test_run_completes_over_tls_with_node_auth(lab: Lab) -> None:
    out = lab.root / "run-complete"
    exp = _experiment(lab.root, "deploy-complete", rounds=1)
    run_id = lab.flwr_run({"experiment": str(exp), "output-dir": str(out)})
    summary = _summary(out, lab, run_id)
    assert [r["round"] for r in summary["rounds"]] == [1]
    for r in summary["rounds"]:
        assert sorted(r["sites_train"]) == ["hospital-1", "site-1", "site-2"], r
        assert r["failures"] == [] and r["aggregated"], r
    assert summary["final_global_test"]["accuracy"] is not None
    wait_for(lambda: lab.run_status(run_id) == "finished:completed", timeout=60, what="run status", lab=lab)
    assert _checkpoint_round(out) == 1


def test_unregistered_node_is_refused(lab: Lab) -> None:
    proc = lab.rogue
    proc.popen.wait(timeout=180)
    log = proc.log.read_text(errors="replace")
    assert proc.popen.returncode != 0, log[-3000:]
    assert "Failed to activate SuperNode" in log, log[-3000:]
    assert len(_nodes(lab)) == NUM_SITES  # only the registered hospitals exist for the coordinator
    # what the administrator does to admit, then remove, a site
    res = lab.run(
        lab.coord_ns,
        ["flwr", "supernode", "register", str(lab.rogue_site.pub), "medflower", "--name", "rogue", "--format", "json"],
        home=lab.admin_home,
    )
    node_id = json.loads(res.stdout[res.stdout.index("{") :])["node-id"]
    lab.run(lab.coord_ns, ["flwr", "supernode", "unregister", str(node_id), "medflower"], home=lab.admin_home)
    assert str(node_id) not in {str(n.get("node-id")) for n in _nodes(lab) if n.get("status") != "unregistered"}


def _trusted_entities(path: Path) -> Path:
    """A publisher the hospital trusts (Flower's format): an Ed25519 key that signed nothing sent here."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"fpk_trusted_reviewer: '{key.decode()} reviewer'\n")
    return path


def test_a_hospital_trusting_only_signed_apps_runs_nothing_the_coordinator_sends(lab: Lab) -> None:
    """deploy/README.md, "Which code runs at your hospital": ``--trusted-entities`` refuses an unsigned bundle.

    ``flwr run .`` sends a bundle built from a checkout, which carries no signature: the node answers
    each instruction with Flower's FAB verification error, never unpacks the bundle, and the run
    goes on with the other hospitals.
    """
    site = lab.add_site_namespace("hospital-4")
    lab.node_key(site)
    res = lab.run(
        lab.coord_ns,
        ["flwr", "supernode", "register", str(site.pub), "medflower", "--name", site.name, "--format", "json"],
        home=lab.admin_home,
    )
    node_id = int(json.loads(res.stdout[res.stdout.index("{") :])["node-id"])
    site_yaml = lab.root / "hospital-4-site.yaml"  # hospital-1's export folder, under its own name
    site_yaml.write_text("name: hospital-4\ntask: classification\ndata:\n  kind: folders\n  path: hospital-1-export\n")
    proc = lab.start_hospital(site, site_yaml, trusted_entities=_trusted_entities(site.dir / "trusted-entities.yaml"))
    try:
        wait_for(
            lambda: any(int(n["node-id"]) == node_id and n.get("status") == "online" for n in _nodes(lab)),
            timeout=120,
            interval=2.0,
            what="hospital-4 to come online",
            lab=lab,
        )
        out = lab.root / "run-trusted"
        run_id = lab.flwr_run({"experiment": str(_experiment(lab.root, "deploy-trusted", 1)), "output-dir": str(out)})
        (rnd,) = _summary(out, lab, run_id)["rounds"]
        assert sorted(rnd["sites_train"]) == ["hospital-1", "site-1", "site-2"], rnd
        refused = [f for f in rnd["failures"] if int(f["node_id"]) == node_id]
        assert refused and "could not be verified" in refused[0]["reason"], rnd["failures"]
        assert "The FAB could not be verified" in proc.log.read_text(errors="replace")
        apps = site.dir / "flwr-home" / "apps"  # where a ClientApp process unpacks the bundle it runs
        assert not apps.exists() or not any(apps.iterdir()), list(apps.iterdir())
        # a hospital that accepts it runs the bundle of the administrator's checkout: the same bytes
        # as `flwr build` of those files (deploy/README.md: how to see which bundle ran)
        fab_hash = hashlib.sha256(build_fab_from_disk(REPO)).hexdigest()[:8]
        ran = [p.name for p in (lab.sites[0].dir / "flwr-home" / "apps").iterdir()]
        assert f"medflower.medflower.{__version__}.{fab_hash}" in ran, (ran, fab_hash)
        wait_for(lambda: lab.run_status(run_id) == "finished:completed", timeout=60, what="run status", lab=lab)
    finally:  # the next test expects the three hospitals only
        if proc.alive():
            os.killpg(proc.popen.pid, signal.SIGTERM)
            proc.popen.wait(timeout=30)
        lab.run(lab.coord_ns, ["flwr", "supernode", "unregister", str(node_id), "medflower"], home=lab.admin_home)


def _nodes(lab: Lab) -> list[dict]:
    res = lab.run(lab.coord_ns, ["flwr", "supernode", "ls", "medflower", "--format", "json"], home=lab.admin_home)
    return json.loads(res.stdout[res.stdout.index("{") :])["nodes"]


def _received_train(site_log: Path, run_id: int) -> int:
    text = site_log.read_text(errors="replace")
    return len(re.findall(rf"\[RUN {run_id}\][^\n]*\n[^\n]*Receiving: train message", text))


def test_serverapp_restart_resumes_and_a_cut_site_is_skipped(lab: Lab) -> None:
    """Kill the ServerApp after round 1, resubmit, cut hospital-3's link during round 2."""
    out = lab.root / "run-resume"
    exp = _experiment(lab.root, "deploy-resume", rounds=2)
    run_config = {"experiment": str(exp), "output-dir": str(out)}
    first = lab.flwr_run(run_config)
    wait_for(
        lambda: _checkpoint_round(out) >= 1,
        timeout=RUN_TIMEOUT,
        interval=0.2,
        what="the checkpoint of round 1",
        lab=lab,
    )
    pids = wait_for(lab.serverapp_pids, timeout=30, what="the ServerApp process", lab=lab)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)  # the coordinator's ServerApp dies mid-run
    wait_for(lambda: not lab.serverapp_pids(), timeout=30, what="the ServerApp to die", lab=lab)
    before = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
    from medflower.config import load_experiment
    from medflower.server.checkpoint import load_checkpoint

    ckpt_before = load_checkpoint(out / "checkpoint", load_experiment(exp))
    assert ckpt_before is not None and ckpt_before.round == before["round"] >= 1
    assert not (out / "summary.json").exists()
    lab.stop_run(first)  # README: stop the broken run, then resubmit the same command

    second = lab.flwr_run(run_config)
    site3 = lab.sites[2]
    wait_for(
        lambda: _received_train(site3.proc.log, second) >= 1,
        timeout=RUN_TIMEOUT,
        interval=0.2,
        what="hospital-3 to receive its train instruction in the resumed run",
        lab=lab,
    )
    lab.cut_link(site3)  # mid-round: the site got its instructions, its reply cannot come back

    summary = _summary(out, lab, second)
    rounds = [r["round"] for r in summary["rounds"]]
    assert rounds == [1, 2], rounds  # no round lost, none repeated
    k = ckpt_before.round
    # rounds finished before the kill are reported exactly as they were recorded then (not re-run)
    for old, new in zip(ckpt_before.history.rounds, summary["rounds"][:k], strict=True):
        assert new["seconds"] == old.seconds and new["sites_train"].keys() == old.sites_train.keys()
    digest = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
    assert [s["start_round"] for s in digest["starts"]] == [1, k + 1]
    # the cut round: the two other sites' updates were aggregated, hospital-3's absence is recorded
    cut = summary["rounds"][-1]
    assert sorted(cut["sites_train"]) == ["hospital-1", "site-1"], cut
    assert cut["aggregated"], cut
    assert [f["site"] for f in cut["failures"]] == ["site-2"], cut["failures"]
    wait_for(lambda: lab.run_status(second) == "finished:completed", timeout=60, what="run status", lab=lab)


def test_readme_commands_were_run(lab: Lab) -> None:
    """Every command in deploy/README.md was run by this module (or by a script it ran)."""
    from medflower.deploy.readme_check import readme_commands, unexercised

    ran = {tuple(c[:2]) for c in lab.commands}
    if not {("flwr", "run"), ("flwr", "stop")} <= ran:
        pytest.skip("needs the whole module to run first (it checks the commands the other tests ran)")
    missing = unexercised(readme_commands(), lab.commands)
    assert not missing, "README commands not exercised by the lab:\n" + "\n".join(missing)
