"""Many simulated sites: peak memory and wall time of ``medflower simulate`` (issue 11, item 4).

Issue 11's bar: 100 sites x 5 rounds stay under 8 GB of peak memory; 1,000 sites are measured (time
and memory) with no bar. Each site holds ``--per-site`` SYNTHETIC 28x28 training images (IID partition,
so every site is non-empty at any count), the ``cnn`` of the quick start, one local epoch.

Peak memory is that of the whole process tree (``medflower simulate`` and, with ``--engine ray``, Ray's
daemons and workers): the sum of the tree's resident set sizes, sampled from ``/proc`` every 0.2 s,
and, as a cross-check that misses nothing between samples, the largest single process's peak from
``getrusage(RUSAGE_CHILDREN)``. The sum double-counts pages shared between processes (Ray's object
store), so for ``ray`` it is an upper bound.

    python bench/scale.py --sites 100 --rounds 5          # the 8 GB bar
    python bench/scale.py --sites 1000 --rounds 2         # the 1,000-site measurement
    python bench/scale.py --sites 10 --rounds 1           # smoke run

Why it stays small with the local engine: the data set is built once and split into one array per
split and site (together the size of the data set), each message builds its model afresh and lets it
go, and the server holds one round's replies at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss(root: int) -> int:
    """Bytes resident in ``root`` and all its descendants now (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            rss[int(d.name)] = int((d / "statm").read_text().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


def experiment(sites: int, rounds: int, per_site: int, engine: str) -> dict[str, Any]:
    return {
        "name": f"scale-{sites}",
        "data": {"kind": "synthetic", "synthetic_samples": sites * per_site},
        "partition": {"kind": "iid", "num_sites": sites, "min_site_size": 1},
        "model": {"name": "cnn"},
        "train": {"rounds": rounds},
        "simulation": {"engine": engine},
    }


def measure(sites: int, rounds: int, per_site: int, engine: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mf-scale-") as tmp:
        exp = Path(tmp) / "exp.yaml"
        exp.write_text(yaml.safe_dump(experiment(sites, rounds, per_site, engine)))
        cmd = [sys.executable, "-m", "medflower.cli", "simulate", str(exp), "-o", str(Path(tmp) / "out")]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        peak = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, tree_rss(proc.pid))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        output, _ = proc.communicate()
        done.set()
        sampler.join()
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"simulate failed:\n{output[-4000:]}")
        summary = json.loads((Path(tmp) / "out" / "summary.json").read_text())
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    answered = [len(r["sites_train"]) for r in summary["rounds"]]
    return {
        "sites": sites,
        "rounds": rounds,
        "per_site": per_site,
        "engine": engine,
        "seconds": round(seconds, 1),
        "peak_tree_rss_gib": round(peak / 2**30, 3),
        "largest_process_peak_gib": round(largest / 2**30, 3),
        "sites_answered_per_round": answered,
        "final_accuracy": summary["final_global_test"]["accuracy"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--per-site", type=int, default=50, help="synthetic training images per site")
    p.add_argument("--engine", choices=("local", "ray"), default="local")
    args = p.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.2f}", flush=True)
    print(json.dumps(measure(args.sites, args.rounds, args.per_site, args.engine)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
