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
    ap.add_argument("--keep", help="folder to copy each seed's summary.json into")
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
            proc = subprocess.run(
                [sys.executable, "-m", "medflower.cli", "simulate", str(p), "-o", str(out)],
                capture_output=True,
                text=True,
            )
            wall = time.time() - t0
            if proc.returncode != 0:
                sys.exit(f"seed {seed} failed:\n{proc.stderr[-3000:]}")
            s = json.loads((out / "summary.json").read_text())
            if args.keep:
                Path(args.keep).mkdir(parents=True, exist_ok=True)
                (Path(args.keep) / f"seed{seed}.json").write_text(json.dumps(s, indent=1))
            fin, sel = s["final_global_test"], s["selected_global_test"]
            curve = " ".join(f"{r['global_test']['auc']:.3f}" for r in s["rounds"])
            rows.append((seed, fin["auc"], fin["accuracy"], sel["auc"], sel["accuracy"], s["selected_round"], wall))
            print(
                f"seed {seed}: final AUC {fin['auc']:.3f} ACC {fin['accuracy']:.3f} | selected round "
                f"{s['selected_round']} AUC {sel['auc']:.3f} | AUC per round {curve} | wall {wall:.0f}s",
                flush=True,
            )
    print(f"\nexperiment: {exp_path.relative_to(REPO) if exp_path.is_relative_to(REPO) else exp_path}")
    print(
        "\n| seed | final test AUC | final test ACC | selected round | selected test AUC | selected test ACC "
        "| wall (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for seed, auc, acc, sauc, sacc, srnd, wall in rows:
        print(f"| {seed} | {auc:.3f} | {acc:.3f} | {srnd} | {sauc:.3f} | {sacc:.3f} | {wall:.0f} |")

    def ms(i: int) -> str:
        v = [r[i] for r in rows]
        return f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.3f}"

    print(f"| mean ± sd | {ms(1)} | {ms(2)} | | {ms(3)} | {ms(4)} | |")


if __name__ == "__main__":
    main()
