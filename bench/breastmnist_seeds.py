"""BreastMNIST, 3 hospitals, Dirichlet(0.5): final global test AUC/accuracy over seeds.

    python bench/breastmnist_seeds.py [--seeds 0 1 2] [--experiment examples/breastmnist_3sites.yaml]

Runs each seed through `medflower simulate` (Flower's simulation engine, as a user would) and
prints a markdown table of per-seed results, their mean and spread, and wall times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default=str(REPO / "examples" / "breastmnist_3sites.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    exp_path = Path(args.experiment).resolve()
    base = yaml.safe_load(exp_path.read_text())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            cfg = dict(base, seed=seed)
            data = dict(cfg["data"])
            if data.get("path") and not Path(data["path"]).is_absolute():
                data["path"] = str((exp_path.parent / data["path"]).resolve())
            cfg["data"] = data
            p = Path(tmp) / f"seed{seed}.yaml"
            p.write_text(yaml.safe_dump(cfg))
            out = Path(tmp) / f"out{seed}"
            t0 = time.time()
            proc = subprocess.run([sys.executable, "-m", "medflower.cli", "simulate", str(p), "-o", str(out)],
                                  capture_output=True, text=True)
            wall = time.time() - t0
            if proc.returncode != 0:
                sys.exit(f"seed {seed} failed:\n{proc.stderr[-3000:]}")
            s = json.loads((out / "summary.json").read_text())
            fin = s["final_global_test"]
            rows.append((seed, fin["auc"], fin["accuracy"], wall))
            print(f"seed {seed}: AUC {fin['auc']:.3f} ACC {fin['accuracy']:.3f} wall {wall:.0f}s", flush=True)
    aucs, accs = [r[1] for r in rows], [r[2] for r in rows]
    print(f"\nexperiment: {exp_path.relative_to(REPO) if exp_path.is_relative_to(REPO) else exp_path}")
    print("\n| seed | test AUC | test ACC | wall (s) |\n|---|---|---|---|")
    for seed, auc, acc, wall in rows:
        print(f"| {seed} | {auc:.3f} | {acc:.3f} | {wall:.0f} |")
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
    print(f"| mean ± sd | {statistics.mean(aucs):.3f} ± {sd(aucs):.3f} | {statistics.mean(accs):.3f} ± {sd(accs):.3f} | |")


if __name__ == "__main__":
    main()
