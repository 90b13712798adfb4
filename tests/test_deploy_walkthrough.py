"""deploy/README.md's one-host rehearsal, run verbatim: an administrator and two hospitals on loopback.

The page's ``<!-- walkthrough -->`` shell blocks are joined, in page order, into one bash session
(``set -euo pipefail -x``: every command is echoed and the first failure stops it) with only the
documented placeholder, the base folder ``/tmp/medflower-demo``, replaced by a temporary folder.
As root, where ``ip netns`` works, the session runs in a network namespace of its own (its own
loopback: the page's fixed ports 9093-9095 cannot collide with anything); otherwise on the host's
loopback, which needs no root (skipped, with the reason, if those ports are taken). The data are
synthetic PNG exports written here. After the page's commands: the run finished two rounds with
both hospitals, the nodes got distinct free ports, and the coordinator's global test agrees with
re-scoring ``model.pt`` through a hospital's own preparation (a site YAML over the same images).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from medflower.deploy.labnet import loopback_namespace, netns_unavailable_reason
from medflower.deploy.readme_check import synthetic_export, walkthrough_blocks
from medflower.runenv import FLOWER_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[1]
PLACEHOLDER = "/tmp/medflower-demo"
PORTS = (9093, 9094, 9095)


def _busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _script(base: Path) -> str:
    blocks = walkthrough_blocks()
    assert len(blocks) >= 5, "deploy/README.md lost its walkthrough blocks"
    body = "\n".join(b.replace(PLACEHOLDER, str(base)) for b in blocks)
    assert PLACEHOLDER not in body
    # the harness's own line, not the page's: whatever happens, stop the services it started
    return "set -euo pipefail -x\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + body


def test_the_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed (the coordinator's proxy and the hospitals' sidecars)")
    base = tmp_path / "demo"
    for name, n, seed in (("hospital-a", 30, 1), ("hospital-b", 30, 2), ("coordinator-test", 20, 3)):
        synthetic_export(base / "data" / name, n=n, seed=seed)
    script = tmp_path / "walkthrough.sh"
    script.write_text(_script(base))
    env = {k: v for k, v in os.environ.items() if k not in ("FLWR_HOME", "MEDFLOWER_SITE_DIRECTORY")}
    env |= FLOWER_ENV | {"PYTHONUNBUFFERED": "1"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    in_namespace = netns_unavailable_reason() is None
    if not in_namespace and any(_busy(p) for p in PORTS):
        pytest.skip(f"ports {PORTS} on 127.0.0.1 are in use and no network namespace is available (not root)")
    with contextlib.ExitStack() as stack:
        prefix = ["ip", "netns", "exec", stack.enter_context(loopback_namespace("mfwalk"))] if in_namespace else []
        res = subprocess.run(
            [*prefix, "bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1100
        )
    logs = "\n".join(
        f"---- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(base.glob("*.log")) if p.is_file()
    )
    assert res.returncode == 0, f"{res.stdout[-4000:]}\n{res.stderr[-6000:]}\n{logs}"

    out = base / "runs" / "demo"
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for r in summary["rounds"]:
        assert sorted(r["sites_train"]) == ["hospital-a", "hospital-b"] and r["failures"] == [], r
    assert summary["global_test_note"] == ""
    # the walkthrough's `medflower deploy status` named both hospitals and the run's last round
    assert "hospital-a" in res.stdout and "hospital-b" in res.stdout and "round 2 of 2 done" in res.stdout
    # two nodes on one host: each printed its own free ports, all distinct
    ports = []
    for site in ("hospital-a", "hospital-b"):
        text = (base / f"{site}.log").read_text(errors="replace")
        ports += [line.rsplit("127.0.0.1:", 1)[1].split()[0] for line in text.splitlines() if "(--" in line]
    assert len(ports) == 4 and len(set(ports)) == 4, ports
    # the coordinator's log: whom it waited for, by name, and where that number comes from
    coord_log = (base / "coordinator.log").read_text(errors="replace") + res.stdout + res.stderr
    assert "registered: hospital-a (node " in coord_log, coord_log[-3000:]  # with its key's fingerprint

    # the coordinator's global test == model.pt re-scored through a hospital's own preparation
    import torch

    from medflower.client.site import load_site_data
    from medflower.config import load_experiment
    from medflower.modelspec import build_experiment_model
    from medflower.tasks import evaluate

    exp = load_experiment(base / "study.yaml")
    site_yaml = tmp_path / "as-a-hospital.yaml"
    site_yaml.write_text(
        "name: rescore\ntask: classification\n"
        f"data: {{kind: folders, path: {base / 'data' / 'coordinator-test'}, test_fraction: 0.5}}\n"
    )
    site = load_site_data(site_yaml, exp)
    model = build_experiment_model(exp)
    model.load_state_dict(torch.load(out / "model.pt"))
    rescored = evaluate(model, site.test, task=exp.task, batch_size=exp.train.eval_batch_size)
    final = summary["final_global_test"]
    for key in ("accuracy", "auc"):
        assert final[key] == pytest.approx(rescored[key], abs=1e-6), (key, final, rescored)
