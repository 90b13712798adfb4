"""A real deployment on one machine: a coordinator, an administrator's workstation and 3 hospitals,
each in its own network namespace.

The SuperLink listens on the coordinator's loopback interface only, behind nginx; hospitals reach it
through their own nginx sidecar with a client certificate the federation CA issued; TLS and
SuperNode authentication are on; hospitals are registered under their names in the site directory.
Everything is started by the commands and scripts of deploy/README.md (through
:class:`medflower.deploy.lab.Lab`, which records every command it runs). Covers:

* network separation: only nginx listens on the network; Fleet works through the proxy; a node
  without a client certificate cannot connect; a certificate from another CA, an expired one, or
  the coordinator's own server certificate is refused; from a hospital's namespace, listing,
  submitting and stopping runs are refused on both ports (with a valid client certificate too);
  the administrator's ``flwr`` commands work from the coordinator host and the admin network;
* registration: an unregistered key is refused; ``medflower deploy register/unregister/sites``;
  a hospital trusting only signed bundles runs nothing the coordinator sends;
* reliability: a hospital's link is cut mid-round (the run goes on without it) and restored (it is
  back in a later round); the ServerApp is killed and a resubmitted run resumes from the checkpoint
  with no round repeated or lost; the SuperLink process itself is killed mid-run and
  restarted (the hospitals reconnect, the resubmitted run resumes), and a hospital unregistered
  meanwhile is refused from the next round on;
* secure aggregation: a SecAgg+ run over the three hospitals, one of them cut after sharing its keys
  (its masks are recovered from the two others' shares, the round aggregated without it).

Costly (every Flower message starts a ClientApp process that imports torch and MONAI), so the
federation is shared by the module and the experiment is tiny; every wait is bounded. Skips, with
the reason, without root/``ip netns`` or without nginx.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.cli.build import build_fab_from_disk

from medflower import __version__
from medflower.deploy.lab import (
    NODE_CHECK_TIMEOUT,
    REPO,
    Lab,
    LabError,
    Site,
    netns_unavailable_reason,
    proxy_unavailable_reason,
    wait_for,
)
from medflower.deploy.labnet import environ
from medflower.deploy.proxy import CERT_REFUSED

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

_REASON = netns_unavailable_reason() or proxy_unavailable_reason()
if _REASON is not None:
    pytest.skip(f"deployment lab unavailable: {_REASON}", allow_module_level=True)

NUM_SITES = 3
NAMES = ["hospital-1", "site-1", "site-2"]  # a simulated partition's replies name it site-<partition-id>
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


def _experiment(
    root: Path, name: str, rounds: int, *, startup_timeout: int = 120, round_timeout: int = 240, extra: str = ""
) -> Path:
    """hospital-1's synthetic PNG export, tiny; no site evaluates (each message is a process).

    The coordinator's test data are in the hospitals' format (deploy/README.md, "The coordinator's
    data"): the same export, prepared as hospital-1 prepares it; the simulated partitions split it.
    A coordinator testing on other data (e.g. ``kind: synthetic``) would be refused by hospital-1's
    preparation fingerprint.
    """
    path = root / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nseed: 0\n"
        f"data: {{kind: folders, path: {root / 'hospital-1-export'}}}\n"
        f"partition: {{kind: iid, num_sites: {NUM_SITES}}}\n"
        "model: {name: cnn}\n"
        f"train: {{rounds: {rounds}, batch_size: 32}}\n"
        "strategy: {fraction_evaluate: 0.0}\n"
        f"participation: {{min_sites: 2, round_timeout: {round_timeout}, startup_timeout: {startup_timeout}}}\n" + extra
    )
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("deploy-lab")
    with Lab(root, num_sites=NUM_SITES, names=NAMES) as lab:
        lab.setup([_file_site(root), SIM_PARTITION.format(1), SIM_PARTITION.format(2)])
        # an extra machine with a well-formed node key and a valid client certificate whose key the
        # administrator never registered; started now (it only needs to be refused) so that it
        # overlaps with the first run
        rogue = lab.add_site_namespace("rogue")
        lab.node_key(rogue)
        lab.sign(rogue)
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


def _bridge_mac(lab: Lab) -> str:
    return lab.run(lab.coord_ns, ["cat", "/sys/class/net/br0/address"]).stdout.strip()


def test_a_machine_added_later_does_not_move_the_coordinators_mac(tmp_path: Path) -> None:
    """A Linux bridge takes its lowest port's MAC unless given one. The lab's used to: a namespace added
    mid-module then changed the coordinator's MAC under the hospitals' ARP caches, and their connections
    to the proxy went unanswered for up to a minute (the flaky node-check timeout)."""
    with Lab(tmp_path, num_sites=1, tag=f"mf{os.getpid()}x1") as tiny:
        site, port = tiny.sites[0], 9000
        listener = f"import socket, time; s = socket.create_server(('{tiny.coord_ip}', {port})); time.sleep(300)"
        tiny.spawn(tiny.coord_ns, [sys.executable, "-c", listener], name="listener")
        tiny.wait_listening(site.ns, tiny.coord_ip, port)  # the site now caches the coordinator's MAC
        before = _bridge_mac(tiny)
        assert before == tiny.bridge_mac
        port_name = f"vx{len(tiny._namespaces)}"  # the bridge-side end add_site_namespace creates
        late = tiny.add_site_namespace("late")
        # the lowest MAC there can be on the newcomer's port: the case that moved the bridge's before
        tiny.run(tiny.coord_ns, ["ip", "link", "set", port_name, "address", "00:00:00:00:00:01"])
        assert _bridge_mac(tiny) == before
        for ns in (site.ns, late.ns):  # both connect at once, the first site still from its ARP cache
            tiny.run(ns, ["timeout", "5", "bash", "-c", f"exec 3<>/dev/tcp/{tiny.coord_ip}/{port}"])


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


def _listeners(lab: Lab) -> list[tuple[str, str]]:
    """(local address:port, program) of every listening TCP socket in the coordinator's namespace."""
    res = lab.run(lab.coord_ns, ["ss", "-Hltnp"])
    out = []
    for line in res.stdout.splitlines():
        fields = line.split()
        prog = re.search(r'users:\(\("([^"]+)"', line)
        out.append((fields[3], prog.group(1) if prog else "?"))
    return out


def test_only_the_proxy_listens_on_the_network(lab: Lab) -> None:
    listeners = _listeners(lab)
    exposed = [(a, p) for a, p in listeners if not a.startswith(("127.", "[::1]"))]
    assert exposed and {p for _, p in exposed} == {"nginx"}, listeners
    assert {a.rsplit(":", 1)[1] for a, _ in exposed} == {str(lab.port), str(lab.admin_port)}, listeners
    assert (f"127.0.0.1:{lab.superlink_port}", "flower-superlin") in listeners, listeners  # ss cuts names at 15


def test_run_completes_through_the_proxy(lab: Lab) -> None:
    """Fleet works through the coordinator's proxy and the hospitals' sidecars; replies named by the directory."""
    out = lab.root / "run-complete"
    exp = _experiment(lab.root, "deploy-complete", rounds=1)
    run_id = lab.flwr_run({"experiment": str(exp), "output-dir": str(out)})
    (serverapp, *_) = wait_for(lab.serverapp_pids, timeout=60, what="the ServerApp process", lab=lab)
    # the ServerApp Flower started inherited start-coordinator.sh's MEDFLOWER_SITE_DIRECTORY
    assert environ(serverapp).get("MEDFLOWER_SITE_DIRECTORY") == str(lab.directory)
    summary = _summary(out, lab, run_id)
    assert [r["round"] for r in summary["rounds"]] == [1]
    for r in summary["rounds"]:
        assert sorted(r["sites_train"]) == NAMES, r
        assert r["failures"] == [] and r["aggregated"], r
    assert summary["final_global_test"]["accuracy"] is not None
    wait_for(lambda: lab.run_status(run_id) == "finished:completed", timeout=60, what="run status", lab=lab)
    assert _checkpoint_round(out) == 1
    # the administrator's views: the run's log, and every hospital by name with the round reached
    assert "[round 1/1]" in lab.run_log(run_id)
    status = lab.status(out)
    for name in NAMES:
        (row,) = [line for line in status.splitlines() if line.startswith(name + " ")]
        assert str(lab.node_id(name)) in row and "connected (since" in row, status
    assert "deploy-complete: round 1 of 1 done (finished" in status, status
    # every hospital's Fleet traffic came through the proxy, each under its own client certificate
    access = (lab.coord_state / "proxy" / "access.log").read_text()
    for name in NAMES:
        assert re.search(rf'"POST /v1/fleet/push-messages HTTP/1.1" 200 .* client="CN={name}"', access), name
    serverapp_log = (lab.root / "logs" / "coordinator.log").read_text(errors="replace")
    assert "no site directory" not in serverapp_log  # so it named the replies by the directory


def _other_ca_and_expired_certs(lab: Lab, site: Site) -> tuple[Path, Path]:
    """A certificate for ``site``'s key from another CA, and one from the federation CA that expired."""
    from medflower.deploy.certs import sign_client_csr

    other = lab.root / "other-ca"
    lab.run(lab.coord_ns, ["medflower", "deploy", "certs", "--out", str(other), "--name", "elsewhere"])
    lab.run(lab.coord_ns, ["medflower", "deploy", "certs", "--out", str(other), "--client-csr", str(site.csr)])
    foreign = (other / "clients" / f"{site.name}.crt").rename(lab.root / "foreign.crt")
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=40)
    expired = sign_client_csr(lab.certs, site.csr, days=30, not_before=long_ago).rename(lab.root / "expired.crt")
    lab.sign(site, days=365)  # renewal (README step 9): the federation's valid one again, same CSR
    return foreign, expired


def test_a_hospital_without_a_valid_client_certificate_cannot_connect(lab: Lab) -> None:
    site = lab.sites[1]  # a registered hospital's key and CSR: only the certificate decides here
    probe = lambda cert=None, key=site.tls_key: lab.probe(  # noqa: E731
        site.ns, lab.port, "/v1/fleet/pull-messages", cert=cert, key=key if cert else None
    )
    assert probe().startswith(f"400 {CERT_REFUSED} (NONE)")
    foreign, expired = _other_ca_and_expired_certs(lab, site)
    assert probe(foreign).startswith(f"400 {CERT_REFUSED} (FAILED:"), probe(foreign)
    assert probe(expired).startswith(f"400 {CERT_REFUSED} (FAILED:certificate has expired)"), probe(expired)
    server_cert = probe(lab.certs / "coordinator.crt", lab.certs / "coordinator.key")  # a server certificate
    assert server_cert.startswith(f"400 {CERT_REFUSED} (FAILED:unsuitable certificate purpose)"), server_cert
    assert probe(site.cert).split()[0] not in {"400", "403"}  # the valid one reaches Flower (which wants a signature)

    # flower-supernode itself, dialling the coordinator directly with a registered key: refused, exits
    direct = lab.add_site_namespace("no-cert")
    direct.dir.mkdir(parents=True)
    argv = ["flower-supernode", "--superlink", lab.address, "--root-certificates", str(lab.certs / "ca.crt")]
    argv += ["--auth-supernode-private-key", str(site.key), "--node-config", SIM_PARTITION.format(1)]
    proc = lab.spawn(direct.ns, argv, name="no-cert", home=direct.dir / "flwr-home")
    proc.popen.wait(timeout=120)
    log = proc.log.read_text(errors="replace")
    assert proc.popen.returncode != 0 and "400 Bad Request" in log, log[-3000:]
    assert "Failed to initialize the connection to the SuperLink" in log, log[-3000:]

    # the hospital's own check names the problem
    res = lab.run(
        site.ns,
        [
            "medflower",
            "node",
            "check",
            "--coordinator",
            lab.address,
            "--ca",
            str(site.ca),
            "--key",
            str(site.key),
            "--client-cert",
            str(expired),
            "--client-key",
            str(site.tls_key),
            "--node-config",
            SIM_PARTITION.format(1),
            "--timeout",
            NODE_CHECK_TIMEOUT,
        ],
        check=False,
    )
    assert res.returncode == 1 and "certificate has expired" in res.stdout, res.stdout


def test_hospitals_cannot_list_submit_or_stop_runs(lab: Lab) -> None:
    """From a hospital's namespace the Control API is refused on both ports; the admin network may use it."""
    site = lab.sites[0]
    for port in (lab.port, lab.admin_port):
        home = site.dir / f"flwr-cli-{port}"
        lab.add_connection(ns=site.ns, address=f"{lab.coord_ip}:{port}", home=home)
        refused = {
            "ls": lab.flwr("ls", "medflower", ns=site.ns, home=home, check=False),
            "run": lab.flwr("run", str(REPO), "medflower", ns=site.ns, home=home, check=False),
            "stop": lab.flwr("stop", "1", "medflower", ns=site.ns, home=home, check=False),
            "register": lab.flwr(
                "supernode", "register", str(site.pub), "medflower", ns=site.ns, home=home, check=False
            ),
        }
        for what, res in refused.items():
            assert not res.get("success"), (port, what, res)
            text = json.dumps(res)
            assert ("400" in text or "Bad Request" in text) if port == lab.port else "403" in text, (port, what, text)
    # even with a valid client certificate, the hospital port serves nothing but the Fleet API
    for path in ("/v1/control/list-runs", "/v1/control/start-run", "/v1/control/stop-run", "/v1/control/register-node"):
        got = lab.probe(site.ns, lab.port, path, cert=site.cert, key=site.tls_key)
        assert got.startswith("403 medflower coordinator: hospitals reach only"), (path, got)
    for path in ("/v1/fleet/register-node", "/v1/runtime/pull-app-inputs", "/docs"):  # self-registration, Runtime
        got = lab.probe(site.ns, lab.port, path, cert=site.cert, key=site.tls_key, method="POST")
        assert got.startswith("403 "), (path, got)
    # the administrator's workstation, on the admin network named in the coordinator's config
    admin_home = lab.root / "admin-workstation"
    lab.add_connection(ns=lab.admin_ns, address=f"{lab.coord_ip}:{lab.admin_port}", home=admin_home)
    assert lab.flwr("ls", "medflower", ns=lab.admin_ns, home=admin_home)["success"]
    nodes = lab.flwr("supernode", "ls", "medflower", ns=lab.admin_ns, home=admin_home)["nodes"]
    assert {int(n["node-id"]) for n in nodes} >= {lab.node_id(n) for n in NAMES}


def test_unregistered_node_is_refused(lab: Lab) -> None:
    proc = lab.rogue
    proc.popen.wait(timeout=180)
    log = proc.log.read_text(errors="replace")
    assert proc.popen.returncode != 0, log[-3000:]
    assert "Failed to activate SuperNode" in log, log[-3000:]
    # deploy/README.md's exit codes, as they are: Flower logs its code 305, the process exits with 1
    assert "Exit Code: 305" in log and proc.popen.returncode == 1, (proc.popen.returncode, log[-3000:])
    fingerprint = lab.run(lab.rogue_site.ns, ["medflower", "node", "fingerprint", "--key", str(lab.rogue_site.key)])
    fp = fingerprint.stdout.strip()
    assert (
        "its key is not registered there (never registered, or unregistered). "
        f"Send {lab.rogue_site.pub} (key sha256 {fp})" in log
    ), log[-3000:]
    registered = {lab.node_id(n) for n in NAMES}
    assert {int(n["node-id"]) for n in lab.nodes()} == registered  # only the registered hospitals exist
    # what the administrator does to admit, then remove, a site
    node_id = lab.register(lab.rogue_site, declared_examples=80)
    sites = lab.run(
        lab.coord_ns, ["medflower", "deploy", "sites", "--directory", str(lab.directory)], home=lab.admin_home
    )
    rows = {line.split()[0]: line.split() for line in sites.stdout.splitlines()[1:]}
    assert sorted(rows) == sorted([*NAMES, "rogue"]), sites.stdout
    assert rows["rogue"][2] == fp, sites.stdout  # the administrator sees the digits the hospital was told to send
    assert rows["rogue"][1:] == [str(node_id), rows["rogue"][2], "80", "registered"], sites.stdout
    assert all(rows[n][-1] == "online" for n in NAMES), sites.stdout
    dup = lab.run(
        lab.coord_ns,
        [
            "medflower",
            "deploy",
            "register",
            "--name",
            "rogue-2",
            "--key",
            str(lab.rogue_site.pub),
            "--directory",
            str(lab.directory),
        ],
        home=lab.admin_home,
        check=False,
    )
    assert dup.returncode == 2 and "already registered, for site 'rogue'" in dup.stderr, dup.stderr
    lab.unregister(lab.rogue_site)
    assert lab.node_status(node_id) in {"unregistered", ""}
    assert "rogue" not in json.dumps(json.loads(lab.directory.read_text()))


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
    site_yaml = lab.root / "hospital-4-site.yaml"  # hospital-1's export folder, under its own name
    site_yaml.write_text("name: hospital-4\ntask: classification\ndata:\n  kind: folders\n  path: hospital-1-export\n")
    lab.onboard(site, site_yaml, check_node=False, start=False)
    node_id = lab.node_id(site.name)
    proc = lab.start_hospital(site, site_yaml, trusted_entities=_trusted_entities(site.dir / "trusted-entities.yaml"))
    try:
        wait_for(lambda: lab.node_status(node_id) == "online", timeout=120, interval=2.0, what="hospital-4", lab=lab)
        out = lab.root / "run-trusted"
        run_id = lab.flwr_run({"experiment": str(_experiment(lab.root, "deploy-trusted", 1)), "output-dir": str(out)})
        (rnd,) = _summary(out, lab, run_id)["rounds"]
        assert sorted(rnd["sites_train"]) == NAMES, rnd
        refused = [f for f in rnd["failures"] if int(f["node_id"]) == node_id]
        assert refused and "could not be verified" in refused[0]["reason"], rnd["failures"]
        assert "The FAB could not be verified" in proc.log.read_text(errors="replace")
        apps = site.state / "flwr-home" / "apps"  # where a ClientApp process unpacks the bundle it runs
        assert not apps.exists() or not any(apps.iterdir()), list(apps.iterdir())
        # a hospital that accepts it runs the bundle of the administrator's checkout: the same bytes
        # as `flwr build` of those files (deploy/README.md: how to see which bundle ran)
        fab_hash = hashlib.sha256(build_fab_from_disk(REPO)).hexdigest()[:8]
        ran = [p.name for p in (lab.sites[0].state / "flwr-home" / "apps").iterdir()]
        assert f"medflower.medflower.{__version__}.{fab_hash}" in ran, (ran, fab_hash)
        wait_for(lambda: lab.run_status(run_id) == "finished:completed", timeout=60, what="run status", lab=lab)
    finally:  # the next tests expect the three hospitals only
        if proc.alive():
            os.killpg(proc.popen.pid, signal.SIGTERM)
            proc.popen.wait(timeout=30)
        lab.unregister(site)


def _received_train(site_log: Path, run_id: int, server_round: int | None = None) -> int:
    """Train messages the hospital's node received in the run (in ``server_round``: messages that name
    their round, as SecAgg+'s stages do, are logged ``[RUN id, ROUND n]``)."""
    text = site_log.read_text(errors="replace")
    head = rf"\[RUN {run_id}\]" if server_round is None else rf"\[RUN {run_id}, ROUND {server_round}\]"
    return len(re.findall(rf"{head}[^\n]*\n[^\n]*Receiving: train message", text))


def test_a_cut_site_is_skipped_then_back_and_a_killed_serverapp_resumes(lab: Lab) -> None:
    """Cut site-2's link in round 2; kill the ServerApp in round 3 and restore the link; resubmit.

    The order makes both outcomes deterministic: the cut round goes on without site-2 (its absence
    recorded), and the resumed run starts only when site-2 is back online, so round 3 has it again.
    """
    out = lab.root / "run-resume"
    exp = _experiment(lab.root, "deploy-resume", rounds=3)
    run_config = {"experiment": str(exp), "output-dir": str(out)}
    first = lab.flwr_run(run_config)
    cut_site = lab.sites[2]
    assert cut_site.proc is not None
    wait_for(
        lambda: _received_train(cut_site.proc.log, first) >= 2,
        timeout=RUN_TIMEOUT,
        interval=0.2,
        what="site-2 to receive its round-2 train instruction",
        lab=lab,
    )
    lab.cut_link(cut_site)  # mid-round: the site got its instructions, its reply cannot come back
    wait_for(lambda: _checkpoint_round(out) >= 2, timeout=RUN_TIMEOUT, interval=0.2, what="the cut round", lab=lab)
    pids = wait_for(lab.serverapp_pids, timeout=30, what="the ServerApp process", lab=lab)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)  # the coordinator's ServerApp dies mid-run (in round 3)
    wait_for(lambda: not lab.serverapp_pids(), timeout=30, what="the ServerApp to die", lab=lab)
    lab.restore_link(cut_site)
    from medflower.config import load_experiment
    from medflower.server.checkpoint import load_checkpoint

    ckpt_before = load_checkpoint(out / "checkpoint", load_experiment(exp))
    assert ckpt_before is not None and ckpt_before.round == 2
    assert not (out / "summary.json").exists()
    cut_id = lab.node_id(cut_site.name)
    wait_for(lambda: lab.node_status(cut_id) == "online", timeout=180, interval=2.0, what="site-2 back", lab=lab)
    lab.stop_run(first)  # README: stop the broken run, then resubmit the same command

    second = lab.flwr_run(run_config)
    summary = _summary(out, lab, second)
    rounds = [r["round"] for r in summary["rounds"]]
    assert rounds == [1, 2, 3], rounds  # no round lost, none repeated
    # rounds finished before the kill are reported exactly as they were recorded then (not re-run)
    for old, new in zip(ckpt_before.history.rounds, summary["rounds"][:2], strict=True):
        assert new["seconds"] == old.seconds and new["sites_train"].keys() == old.sites_train.keys()
    digest = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
    assert [s["start_round"] for s in digest["starts"]] == [1, 3]
    # the cut round: the two other sites' updates were aggregated, site-2's absence is recorded
    cut = summary["rounds"][1]
    assert sorted(cut["sites_train"]) == ["hospital-1", "site-1"], cut
    assert cut["aggregated"], cut
    assert [f["site"] for f in cut["failures"]] == ["site-2"], cut["failures"]
    assert sorted(summary["rounds"][2]["sites_train"]) == NAMES, summary["rounds"][2]  # the link is back: so is it
    wait_for(lambda: lab.run_status(second) == "finished:completed", timeout=60, what="run status", lab=lab)


SECAGG = "secure_aggregation: {mode: secagg+, num_shares: 3, reconstruction_threshold: 2}\n"
SECAGG_STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")


def test_secagg_plus_runs_and_recovers_a_hospital_cut_after_sharing_its_keys(lab: Lab) -> None:
    """Two SecAgg+ rounds over the three hospitals; site-2's link is cut in round 2 after key sharing.

    Nothing is deployed for SecAgg+: the experiment turns it on. Each SecAgg+ stage reaches a hospital
    as one train message logged with its round (setup, share_keys, collect_masked_vectors, unmask), so
    site-2's 3rd train message of round 2 is its collect_masked_vectors instruction. The coordinator sends
    it only once every site's share_keys reply is in, so cutting the link when the hospital's SuperNode
    logs receiving it is a cut after key sharing and before the masked update: the closest
    deterministic variant of "mid-protocol" (the reply needs a ClientApp process that imports torch
    and trains, seconds, while the cut follows the log line within a 0.2 s poll). Once site-2's
    heartbeat lapses Flower answers for it (*Node Unavailable*; ``round_timeout`` bounds the wait), and
    the coordinator recovers site-2's masks from the two others' shares (2 >= the
    threshold; ``min_sites: 2`` lets the smaller round count). Round 2 is the last, so no later round
    depends on when site-2 reconnects; the link is restored before the next tests.
    """
    ids = {lab.node_id(n): n for n in NAMES}
    wait_for(
        lambda: all(lab.node_status(n) == "online" for n in ids),
        timeout=180,
        interval=2.0,
        what="the three hospitals online",
        lab=lab,
    )
    out = lab.root / "run-secagg"
    exp = _experiment(lab.root, "deploy-secagg", rounds=2, round_timeout=150, extra=SECAGG)
    run_id = lab.flwr_run({"experiment": str(exp), "output-dir": str(out)})
    cut_site = lab.sites[2]
    assert cut_site.proc is not None
    try:
        wait_for(
            lambda: _received_train(cut_site.proc.log, run_id, server_round=2) >= 3,
            timeout=RUN_TIMEOUT,
            interval=0.2,
            what="site-2 to receive round 2's collect_masked_vectors instruction",
            lab=lab,
        )
        lab.cut_link(cut_site)
        summary = _summary(out, lab, run_id)
    finally:
        lab.restore_link(cut_site)
    full, cut = summary["rounds"]
    assert sorted(full["sites_train"]) == NAMES and full["failures"] == [] and full["aggregated"], full
    sa = full["secure_aggregation"]
    assert sa["mode"] == "secagg+" and "not_aggregated" not in sa, sa
    assert (sa["num_shares"], sa["reconstruction_threshold"]) == (3, 2), sa
    assert [sa[stage] for stage in SECAGG_STAGES] == [3, 3, 3, 3] and sa["recovered_dropouts"] == [], sa
    # the cut round: site-2 shared its keys, sent no masked update, and was recovered by the two others
    sa = cut["secure_aggregation"]
    assert sa["mode"] == "secagg+" and "not_aggregated" not in sa, sa
    assert [sa[stage] for stage in SECAGG_STAGES] == [3, 3, 2, 2], sa
    assert sa["recovered_dropouts"] == ["site-2"], sa
    assert sorted(cut["sites_train"]) == ["hospital-1", "site-1"] and cut["aggregated"], cut
    assert [(f["site"], f["stage"]) for f in cut["failures"]] == [("site-2", "collect_masked_vectors")], cut
    # what the administrator sees in the run's log
    log = lab.run_log(run_id)
    assert "secure aggregation unmasked the sum of 3 site(s)" in log, log[-3000:]
    assert "secure aggregation unmasked the sum of 2 site(s)" in log, log[-3000:]
    assert summary["final_global_test"]["accuracy"] is not None
    wait_for(lambda: lab.run_status(run_id) == "finished:completed", timeout=60, what="run status", lab=lab)
    cut_id = lab.node_id(cut_site.name)
    wait_for(lambda: lab.node_status(cut_id) == "online", timeout=180, interval=2.0, what="site-2 back", lab=lab)


def test_superlink_restart_resumes_and_an_unregistered_hospital_is_refused(lab: Lab) -> None:
    """Kill the SuperLink process mid-run and restart it; unregister site-2 meanwhile; resubmit."""
    out = lab.root / "run-superlink"
    exp = _experiment(lab.root, "deploy-superlink", rounds=3, startup_timeout=10)
    run_config = {"experiment": str(exp), "output-dir": str(out)}
    first = lab.flwr_run(run_config)
    wait_for(lambda: _checkpoint_round(out) >= 1, timeout=RUN_TIMEOUT, interval=0.2, what="round 1", lab=lab)
    lab.kill_superlink()  # the launch script stops nginx too and exits, for the service manager to restart it
    assert lab.coordinator is not None and lab.coordinator.popen.returncode != 0
    assert not lab.serverapp_pids() and not lab.superlink_pids()
    done = _checkpoint_round(out)
    assert 1 <= done < 3 and not (out / "summary.json").exists()

    lab.start_coordinator()  # the same database: registrations and runs survive
    ids = {lab.node_id(n): n for n in NAMES}
    wait_for(
        lambda: all(lab.node_status(n) == "online" for n in ids),
        timeout=120,
        interval=2.0,
        what="every hospital to reconnect through the restarted proxy",
        lab=lab,
    )
    gone = lab.sites[2]
    gone_id = lab.node_id(gone.name)
    lab.unregister(gone)  # revoke site-2's key while the run is paused after round `done`
    assert gone.proc is not None
    gone.proc.popen.wait(timeout=120)  # Flower refuses the node's next request; its SuperNode stops
    assert lab.node_status(gone_id) == "unregistered"
    access = (lab.coord_state / "proxy" / "access.log").read_text()
    assert re.search(r'"POST /v1/fleet/[a-z-]+ HTTP/1.1" 401 .* client="CN=site-2"', access)  # by Flower, not the proxy

    lab.stop_run(first)
    second = lab.flwr_run(run_config)
    summary = _summary(out, lab, second)
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    digest = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
    assert [s["start_round"] for s in digest["starts"]] == [1, done + 1]
    assert sorted(summary["rounds"][0]["sites_train"]) == NAMES
    for r in summary["rounds"][done:]:  # from the next round on: without site-2, with the two others
        assert sorted(r["sites_train"]) == ["hospital-1", "site-1"], r
        assert r["aggregated"], r
    wait_for(lambda: lab.run_status(second) == "finished:completed", timeout=60, what="run status", lab=lab)


def test_readme_commands_were_run(lab: Lab) -> None:
    """Every command in deploy/README.md was run by this module (or by a script it ran)."""
    from medflower.deploy.readme_check import readme_commands, unexercised

    ran = {tuple(c[:2]) for c in lab.commands}
    if not {("flwr", "run"), ("flwr", "stop")} <= ran:
        pytest.skip("needs the whole module to run first (it checks the commands the other tests ran)")
    missing = unexercised(readme_commands(), lab.commands)
    assert not missing, "README commands not exercised by the lab:\n" + "\n".join(missing)
