"""Aggregation strategies on real MedMNIST data: a comparison table and a poisoning experiment.

    nice -n 10 python bench/strategies.py all          # the whole benchmark (resumable, see below)
    python bench/strategies.py report                  # the markdown tables from the stored runs

``table``: every strategy of ``--strategies`` on BreastMNIST and RetinaMNIST (``../shared/data/
medmnist``), 5 sites, Dirichlet label skew alpha 0.1 and 1.0, seeds 0-2; the small CNN, 1 local
epoch per round. ``attack``: one of 5 sites (``site-0``) sends a sign-flipped update scaled by
``--scale`` every round (the SIMULATION-ONLY ``attack:`` option), against a clean run, with
FedAvg and the robust aggregators.

Every run goes through the real ServerApp loop (``medflower.server.app.run_server``) and the
simulation's ClientApp (``medflower.simulation.clientapp:app``, the hospitals' pipeline on simulated
sites) on :class:`medflower.simulation.inprocess.InProcessGrid`: no Ray, sites run one after the
other, which on a 2-core machine shared with others costs far less than the simulation engine.

Each finished run is appended to ``--results`` (JSON lines) and skipped when the command is run
again, and a command stops starting new runs after ``--budget-min`` minutes: rerun the same
command until it prints "all runs done" (each invocation stays under ~10 minutes).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a script: the checkout's medflower, installed or not

from medflower.config import ExperimentConfig  # noqa: E402  (after the sys.path line above)
from medflower.runenv import quiet_flower_env  # noqa: E402

quiet_flower_env()

DATA = Path(os.environ.get("MEDFLOWER_SHARED_DATA", REPO.parent / "shared" / "data")) / "medmnist"
RESULTS = REPO / "bench" / "results" / "strategies.jsonl"
TABLE_STRATEGIES = [
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadam",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "scaffold",
    "fedbn",
    "ditto",
]
ATTACK_STRATEGIES = ["fedavg", "fedmedian", "fedtrimmedavg", "krum"]
PARAMS: dict[str, dict[str, Any]] = {  # medflower's defaults, written out so the table says what ran
    "fedprox": {"proximal_mu": 0.01},
    "fedavgm": {"server_learning_rate": 1.0, "server_momentum": 0.9},
    "fedadam": {"eta": 0.01},
    "fedtrimmedavg": {"beta": 0.2},
    "krum": {"num_malicious_nodes": 1},
    "scaffold": {"server_learning_rate": 1.0},
    "ditto": {"lam": 0.1},
}


def experiment(dataset: str, alpha: float, seed: int, strategy: str, rounds: int, attack_scale: float | None):
    sgd = strategy == "scaffold"  # SCAFFOLD's control variates assume plain SGD (see strategies.scaffold)
    cfg = {
        "name": f"bench-{dataset}-{strategy}",
        "seed": seed,
        "data": {"kind": "medmnist", "path": str(DATA / f"{dataset}.npz")},
        "partition": {"kind": "dirichlet", "num_sites": 5, "alpha": alpha, "min_site_size": 10},
        "model": {"name": "cnn"},
        "train": {
            "rounds": rounds,
            "local_epochs": 1,
            "batch_size": 32,
            "optimizer": "sgd" if sgd else "adam",
            "lr": 0.05 if sgd else 0.003,
            "momentum": 0.0,
        },
        "strategy": {"name": strategy, "params": PARAMS.get(strategy, {})},
    }
    if attack_scale is not None:
        cfg["attack"] = {"kind": "sign_flip", "sites": ["site-0"], "scale": attack_scale}
    return ExperimentConfig.from_dict(cfg)


def run_key(
    kind: str, dataset: str, alpha: float, seed: int, strategy: str, rounds: int, attack_scale: float | None
) -> str:
    return json.dumps([kind, dataset, alpha, seed, strategy, rounds, attack_scale])


def _mean_site(sites: dict[str, dict[str, Any]], metric: str) -> float:
    vals = [m.get(metric) for m in sites.values()]
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return statistics.fmean(vals) if vals else math.nan


def run_one(exp) -> dict[str, Any]:
    from medflower.simulation.inprocess import simulate_inprocess  # here: `report` needs no torch or Flower

    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        s = simulate_inprocess(exp, tmp)
    final = s["final_global_test"]
    personal = exp.strategy.name == "ditto"
    prefix = "personal-" if personal else ""
    return {
        "global_auc": final.get("auc"),
        "global_accuracy": final.get("accuracy"),
        "global_balanced_accuracy": final.get("balanced-accuracy"),
        "site_auc": _mean_site(s["sites_test"], f"{prefix}test-auc"),
        "site_accuracy": _mean_site(s["sites_test"], f"{prefix}test-accuracy"),
        "auc_by_round": [r["global_test"].get("auc") for r in s["rounds"]],
        "rejected": sum(len(r["failures"]) for r in s["rounds"]),
        "seconds": time.time() - t0,
    }


def load_results(path: Path) -> dict[str, dict[str, Any]]:
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out[rec["key"]] = rec
    return out


def plan(args) -> list[tuple]:
    runs = []
    if args.command in ("table", "all"):
        for dataset in args.datasets:
            for alpha in args.alphas:
                for strategy in args.strategies:
                    for seed in args.seeds:
                        runs.append(("table", dataset, alpha, seed, strategy, args.rounds, None))
    if args.command in ("attack", "all"):
        for strategy in ATTACK_STRATEGIES:
            for scale in (None, args.scale):
                for seed in args.seeds:
                    runs.append(("attack", args.attack_dataset, args.attack_alpha, seed, strategy, args.rounds, scale))
    return runs


def execute(args) -> None:
    import torch  # here, not at the top: `report` needs no torch or Flower

    import medflower.server.app  # noqa: F401  (Flower configures its logger on import; quiet it afterwards)

    logging.getLogger("flwr").setLevel(logging.WARNING)

    torch.set_num_threads(1)
    done = load_results(args.results)
    todo = [r for r in plan(args) if run_key(*r) not in done]
    print(f"{len(todo)} run(s) to do, {len(done)} stored in {args.results}", flush=True)
    t_start = time.time()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(todo):
        if time.time() - t_start > args.budget_min * 60:
            print(
                f"time budget of {args.budget_min} min reached: {len(todo) - i} run(s) left; run the same "
                "command again to continue",
                flush=True,
            )
            return
        kind, dataset, alpha, seed, strategy, rounds, scale = r
        res = run_one(experiment(dataset, alpha, seed, strategy, rounds, scale))
        rec = {
            "key": run_key(*r),
            "kind": kind,
            "dataset": dataset,
            "alpha": alpha,
            "seed": seed,
            "strategy": strategy,
            "rounds": rounds,
            "attack_scale": scale,
            **res,
        }
        with args.results.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(
            f"[{i + 1}/{len(todo)}] {kind} {dataset} alpha={alpha} seed={seed} {strategy}"
            f"{' attacked x' + str(scale) if scale else ''}: global AUC {res['global_auc']}, "
            f"site AUC {res['site_auc']:.3f}, {res['seconds']:.0f}s",
            flush=True,
        )
    print("all runs done", flush=True)


def _ms(vals: list[float | None]) -> str:
    v = [x for x in vals if x is not None and math.isfinite(x)]
    if not v:
        return "-"
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.fmean(v):.3f} ± {sd:.3f}" + ("" if len(v) == len(vals) else f" (n={len(v)})")


def report(args) -> None:
    recs = list(load_results(args.results).values())
    table = [r for r in recs if r["kind"] == "table"]
    if table:
        rounds = sorted({r["rounds"] for r in table})
        print(
            f"Strategy table: 5 sites, Dirichlet label skew, small CNN, {rounds} rounds x 1 local epoch, "
            f"mean ± sd over seeds {sorted({r['seed'] for r in table})}. *Global*: the final global model on the "
            "held-out test split (server-side). *Sites*: mean over the 5 sites of their own test split "
            "(FedBN: with each site's own normalization layers; Ditto: each site's personal model); sites AUC "
            "averages the sites whose test split holds both classes, and (n=k) marks seeds where no site did.\n"
        )
        for dataset in sorted({r["dataset"] for r in table}):
            for a in sorted({r["alpha"] for r in table if r["dataset"] == dataset}):
                cell = [r for r in table if r["dataset"] == dataset and r["alpha"] == a]
                print(
                    f"**{dataset}, Dirichlet α={a}** ({len(cell)} runs, "
                    f"{statistics.fmean(r['seconds'] for r in cell):.0f} s wall per run on average)\n"
                )
                print("| strategy | global AUC | global acc | global bal. acc | sites AUC | sites acc |")
                print("|---|---|---|---|---|---|")
                for strategy in [s for s in TABLE_STRATEGIES if any(r["strategy"] == s for r in cell)]:
                    rs = [r for r in cell if r["strategy"] == strategy]
                    cols = ["global_auc", "global_accuracy", "global_balanced_accuracy", "site_auc", "site_accuracy"]
                    print(f"| {strategy} | " + " | ".join(_ms([r[c] for r in rs]) for c in cols) + " |")
                print()
    attack = [r for r in recs if r["kind"] == "attack"]
    if attack:
        a0 = attack[0]
        print(
            f"Poisoning: {a0['dataset']}, 5 sites, Dirichlet alpha {a0['alpha']}, {a0['rounds']} rounds; site-0 "
            f"sends `global - {a0['attack_scale'] or next(r['attack_scale'] for r in attack if r['attack_scale'])}"
            " * (local - global)` every round. Final global test, mean ± sd over seeds "
            f"{sorted({r['seed'] for r in attack})}.\n"
        )
        print("| strategy | clean AUC | attacked AUC | clean acc | attacked acc |")
        print("|---|---|---|---|---|")
        for strategy in [s for s in ATTACK_STRATEGIES if any(r["strategy"] == s for r in attack)]:
            clean = [r for r in attack if r["strategy"] == strategy and r["attack_scale"] is None]
            bad = [r for r in attack if r["strategy"] == strategy and r["attack_scale"] is not None]
            print(
                f"| {strategy} | {_ms([r['global_auc'] for r in clean])} | {_ms([r['global_auc'] for r in bad])} | "
                f"{_ms([r['global_accuracy'] for r in clean])} | {_ms([r['global_accuracy'] for r in bad])} |"
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["all", "table", "attack", "report"])
    p.add_argument("--datasets", nargs="+", default=["breastmnist", "retinamnist"])
    p.add_argument("--alphas", nargs="+", type=float, default=[0.1, 1.0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--strategies", nargs="+", default=TABLE_STRATEGIES)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--attack-dataset", default="breastmnist")
    p.add_argument("--attack-alpha", type=float, default=1.0)
    p.add_argument("--scale", type=float, default=10.0)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--budget-min", type=float, default=9.0, help="stop starting runs after this many minutes")
    args = p.parse_args(argv)
    if args.command == "report":
        report(args)
        return 0
    for d in [*args.datasets, args.attack_dataset]:
        if not (DATA / f"{d}.npz").is_file():
            print(f"bench/strategies.py: {DATA / f'{d}.npz'} not found (set MEDFLOWER_SHARED_DATA)", file=sys.stderr)
            return 2
    execute(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
