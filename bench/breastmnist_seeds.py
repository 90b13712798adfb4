"""BreastMNIST, 3 hospitals, Dirichlet(0.5): final global test AUC/accuracy over seeds.

    python bench/breastmnist_seeds.py [--seeds 0 1 2] [--experiment examples/breastmnist_3sites.yaml]
                                      [--keep DIR] [--jobs N]

A sweep over ``seed`` (:mod:`medflower.simulation.sweep`, what ``medflower sweep`` runs): every seed
through the real ServerApp loop and ClientApp on the in-process engine, resumable in ``--keep``
(each seed's folder holds its ``summary.json``), then a markdown table of per-seed results, their
mean ± sd and 95 % CI, and wall times. Runs are bit-reproducible, so a seed gives the same numbers
here as under ``medflower simulate``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a script: the checkout's medflower, installed or not


def main() -> None:
    from medflower.simulation.sweep import load_sweep, mean_ci, run_sweep, sweep_to_yaml

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default=str(REPO / "examples" / "breastmnist_3sites.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--keep", help="sweep folder: each seed's summary.json (resumable); default: a temporary one")
    ap.add_argument("--jobs", type=int, default=1, help="seeds in parallel, one process each")
    args = ap.parse_args()
    exp_path = Path(args.experiment).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep) if args.keep else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        sweep_file = out / "sweep.yaml"
        sweep_file.write_text(sweep_to_yaml(str(exp_path), {"seed": args.seeds}))  # base: an absolute path
        sweep = load_sweep(sweep_file)
        recs = run_sweep(sweep, out, jobs=args.jobs, echo=lambda line: print(line, flush=True))
        summaries = {r.name: json.loads((out / r.name / "summary.json").read_text()) for r in sweep.runs}
    shown = exp_path.relative_to(REPO) if exp_path.is_relative_to(REPO) else exp_path
    print(f"\nexperiment: {shown}")
    print(
        "\n| seed | final test AUC | final test ACC | final bal. acc | selected round | selected test AUC "
        "| threshold | bal. acc at threshold | wall (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for rec in recs:
        s = summaries[rec["run"]]
        fin, sel, at = rec["final"], rec["selected"], rec["at-threshold"]
        print(
            f"| {rec['keys'].get('seed', args.seeds[0])} | {fin['auc']:.3f} | {fin['accuracy']:.3f} | "
            f"{fin['balanced-accuracy']:.3f} | {s['selected_round']} | {sel['auc']:.3f} | "
            f"{s['selected_threshold'] if s['selected_threshold'] is not None else '-'} | "
            f"{at.get('balanced-accuracy', float('nan')):.3f} | {rec['wall_seconds']:.0f} |"
        )

    def ms(part: str, metric: str) -> str:
        c = mean_ci([r[part][metric] for r in recs if r[part].get(metric) is not None])
        if c["mean"] is None:
            return "-"
        text = f"{c['mean']:.3f} ± {c['sd'] or 0.0:.3f}"
        return text + (f" [{c['ci_low']:.3f}, {c['ci_high']:.3f}]" if c["ci_low"] is not None else "")

    print(
        f"| mean ± sd [95% CI] | {ms('final', 'auc')} | {ms('final', 'accuracy')} | "
        f"{ms('final', 'balanced-accuracy')} | | {ms('selected', 'auc')} | | "
        f"{ms('at-threshold', 'balanced-accuracy')} | |"
    )
    for rec in recs:
        for w in rec["warnings"]:
            print(f"\nWARNING (seed {rec['keys'].get('seed', args.seeds[0])}): {w}")


if __name__ == "__main__":
    main()
