"""How long a deployed round takes beyond the sites' compute: deploy/README's one-host walkthrough,
run with more rounds and timed.

It runs the page's ``<!-- walkthrough -->`` blocks (the administrator's certificates, a coordinator
and two hospitals on 127.0.0.1 behind their nginx proxies, TLS and node authentication on, the
small CNN) exactly as tests/test_deploy_walkthrough.py does, with two changes to the study: ``--rounds``
rounds, and site evaluation every round unless ``--no-evaluate``. The hospitals' data are synthetic
PNG exports (``--images`` per hospital, two classes). Each hospital runs with
``MEDFLOWER_SITE_TIMING=1``, so every reply carries ``compute-seconds`` (its ClientApp's handling of
the message, client/app.py); per round it prints the wall time (summary.json's ``seconds``: from
the round's first message to the end of its global test), the slowest site's train + evaluate
compute and the overhead, the difference. As root it runs in a network namespace of its own (the
page's fixed ports 9093-9095 cannot collide with anything).

    .venv/bin/python bench/deploy_rounds.py --rounds 5 --images 219

``--repo DIR`` runs another checkout's scripts and code (e.g. a ``git worktree`` of an older commit,
for a before/after comparison); its replies carry no ``compute-seconds`` if it predates them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from medflower.deploy.labnet import loopback_namespace, netns_unavailable_reason
from medflower.deploy.readme_check import synthetic_export, walkthrough_blocks
from medflower.runenv import FLOWER_ENV

REPO = Path(__file__).resolve().parents[1]
PLACEHOLDER = "/tmp/medflower-demo"


# a line filter prefixing each line with the time it arrived (the hospitals' logs carry no times)
STAMP = (
    "import sys, time\n"
    "for line in sys.stdin:\n"
    "    sys.stdout.write(f'{time.time():.3f} {line}')\n"
    "    sys.stdout.flush()"
)
EVENTS = {"Received successfully": "pulled", "Start `flwr-clientapp` process": "started", "Sending: ": "sent"}


def script(base: Path, *, rounds: int, evaluate: bool) -> str:
    """The page's blocks as one bash session, in ``base``, with the study's rounds and evaluation set,
    and each hospital's output time-stamped line by line."""
    body = "\n".join(b.replace(PLACEHOLDER, str(base)) for b in walkthrough_blocks())
    (base / "stamp.py").write_text(STAMP + "\n")
    edits = [
        ("rounds: 2,", f"rounds: {rounds},"),
        ("fraction_evaluate: 0.0", f"fraction_evaluate: {1.0 if evaluate else 0.0}"),
    ]
    edits += [
        (f"> {base}/{h}.log 2>&1 &", f"2>&1 | python3 -u {base}/stamp.py > {base}/{h}.log &")
        for h in ("hospital-a", "hospital-b")
    ]
    for old, new in edits:
        if old not in body:
            raise SystemExit(f"deploy/README.md's walkthrough no longer has {old!r} in its study")
        body = body.replace(old, new)
    return "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + body


def per_round(summary: dict[str, Any]) -> list[dict[str, float]]:
    """Per round: wall, the slowest site's train + evaluate compute (NaN if not reported), overhead."""
    rows = []
    for r in summary["rounds"]:
        sites = set(r["sites_train"]) | set(r["sites_evaluate"])
        compute = [
            r["sites_train"].get(s, {}).get("compute-seconds", float("nan"))
            + r["sites_evaluate"].get(s, {}).get("compute-seconds", 0.0)
            for s in sites
        ]
        slowest = max(compute) if compute else float("nan")
        rows.append({"round": r["round"], "wall": r["seconds"], "compute": slowest, "overhead": r["seconds"] - slowest})
    return rows


def timeline(log: Path) -> list[tuple[str, float, float, float]]:
    """Per message a hospital served: (kind, waiting for the node's pull after its previous reply,
    pulled -> ClientApp started, started -> reply sent), from the time-stamped log."""
    events: list[tuple[float, str, str]] = []
    for line in log.read_text(errors="replace").splitlines():
        stamp, _, text = line.partition(" ")
        for needle, name in EVENTS.items():
            if needle in text:
                kind = text.split("Sending: ", 1)[1].split()[0] if name == "sent" else ""
                events.append((float(stamp), name, kind))
    rows, last_sent, pulled, started = [], None, None, None
    for t, name, kind in events:
        if name == "pulled":
            pulled, started = t, None
        elif name == "started" and pulled is not None:
            started = t
        elif name == "sent" and pulled is not None and started is not None:
            wait = pulled - last_sent if last_sent is not None else float("nan")
            rows.append((kind, wait, started - pulled, t - started))
            last_sent, pulled = t, None
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=219, help="training images per hospital (synthetic)")
    ap.add_argument("--no-evaluate", action="store_true", help="no site evaluation in the rounds")
    ap.add_argument("--repo", type=Path, default=REPO, help="the checkout whose scripts and code run")
    ap.add_argument("--keep", type=Path, default=None, help="run in this folder and keep it (logs)")
    args = ap.parse_args(argv)
    repo = args.repo.resolve()
    base = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="deploy-rounds-"))
    # the walkthrough's folders export; test_fraction as the site default (0.2): ~images/0.8 per class pair
    per_class = round(args.images / 0.8 / 2)
    for name, n, seed in (("hospital-a", per_class, 1), ("hospital-b", per_class, 2), ("coordinator-test", 20, 3)):
        synthetic_export(base / "data" / name, n=n, seed=seed)
    sh = base / "rounds.sh"
    sh.write_text(script(base, rounds=args.rounds, evaluate=not args.no_evaluate))
    env = {k: v for k, v in os.environ.items() if k not in ("FLWR_HOME", "MEDFLOWER_SITE_DIRECTORY")}
    env |= FLOWER_ENV | {"PYTHONUNBUFFERED": "1", "MEDFLOWER_SITE_TIMING": "1"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(repo), *filter(None, [os.environ.get("PYTHONPATH")])])
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        prefix: list[str] = []
        if netns_unavailable_reason() is None:
            prefix = ["ip", "netns", "exec", stack.enter_context(loopback_namespace("mfrounds"))]
        res = subprocess.run(
            [*prefix, "bash", str(sh)], cwd=repo, env=env, capture_output=True, text=True, timeout=3600
        )
    total = time.monotonic() - t0
    (base / "rounds.out").write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        print(res.stdout[-3000:], res.stderr[-3000:], f"\nfailed; logs in {base}", file=sys.stderr)
        return 1
    summary = json.loads((base / "runs" / "demo" / "summary.json").read_text())
    rows = per_round(summary)
    load = os.getloadavg()
    print(f"repo {repo}  rounds {args.rounds}  images/hospital {args.images}  evaluate {not args.no_evaluate}")
    print(f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}  whole script {total:.0f}s  logs {base}")
    print("round  wall_s  slowest_site_compute_s  overhead_s")
    for r in rows:
        print(f"{r['round']:5d}  {r['wall']:6.2f}  {r['compute']:22.2f}  {r['overhead']:10.2f}")
    later = rows[1:] or rows
    mean = {k: sum(r[k] for r in later) / len(later) for k in ("wall", "compute", "overhead")}
    print(
        f"mean over rounds {later[0]['round']}-{later[-1]['round']}: wall {mean['wall']:.2f}s, "
        f"compute {mean['compute']:.2f}s, overhead {mean['overhead']:.2f}s"
    )
    print("hospital-a, per message: since its previous reply until pulled (the coordinator's work and")
    print("the node's poll) | pulled -> ClientApp process started | started -> reply sent (compute included)")
    for kind, wait, start, serve in timeline(base / "hospital-a.log"):
        print(f"  {kind:9s} {wait:7.2f}s {start:7.2f}s {serve:7.2f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
