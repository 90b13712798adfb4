"""Differential privacy: DP-SGD cost per epoch and utility at epsilon 1, 3, 8 against no DP.

    nice -n 10 python bench/privacy_bench.py timing  --model cnn|vit|unet [--repeats 3]
    nice -n 10 python bench/privacy_bench.py utility --model cnn|vit|unet [--eps none 1 3 8] [--seeds 0 1 2]
    python bench/privacy_bench.py report

``timing`` trains one site's local epoch with and without DP-SGD, alternating the two side by side
in one process (same data, same architecture, one torch thread), and prints the median seconds per
epoch and their ratio. The DP epoch runs medflower's production path (``medflower.client.privacy.RoundPrivacy``:
Opacus' GradSampleModule, DP optimizer and Poisson loader).

``utility`` runs whole federations through Flower's simulation engine (``medflower.simulation.runner.simulate``)
for each epsilon and seed and appends the final global test metrics to
``bench/results/privacy_utility.json`` (runs already there are skipped, so it can be resumed in
pieces that each stay under 10 minutes). ``report`` prints the markdown tables for bench/RESULTS.md.

Data: BreastMNIST (``../shared/data/medmnist/breastmnist.npz``) for cnn and vit; the ISBI 2012 EM
membrane set (``../shared/data/segmentation/isbi2012_em_membrane``, resized to 64x64) for unet.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "bench" / "results" / "privacy_utility.json"
sys.path.insert(0, str(REPO))  # a script: the checkout's medflower, installed or not

from medflower.config import ExperimentConfig  # noqa: E402  (after the sys.path line above)


def experiment(model: str, *, seed: int, eps: float | None) -> dict[str, Any]:
    """The benchmark's experiment (small rounds: 2 shared CPU cores)."""
    privacy = {"mode": "none"} if eps is None else {"mode": "sample", "target_epsilon": eps, "target_delta": 1e-5}
    if model == "unet":
        return {
            "name": f"dp-bench-unet-eps{eps}-s{seed}",
            "seed": seed,
            "task": "segmentation",
            "data": {
                "kind": "folders",
                "path": str(SHARED / "segmentation" / "isbi2012_em_membrane"),
                "image_dir": "image",
                "label_dir": "label",
                "size": [64, 64],
                "intensity": "window",
                "window": [0, 255],
                "mask_values": [255, 0],
                "val_fraction": 0.1,
                "test_fraction": 0.2,
            },
            "partition": {"kind": "iid", "num_sites": 2, "min_site_size": 5},
            "model": {"name": "unet", "spatial_dims": 2},
            "train": {"rounds": 5, "local_epochs": 2, "batch_size": 4, "optimizer": "adam", "lr": 0.003},
            "privacy": privacy,
        }
    return {
        "name": f"dp-bench-{model}-eps{eps}-s{seed}",
        "seed": seed,
        "data": {"kind": "medmnist", "path": str(SHARED / "medmnist" / "breastmnist.npz")},
        "partition": {"kind": "dirichlet", "num_sites": 3, "alpha": 0.5},
        "model": {"name": model},
        "train": {
            "rounds": 10 if model == "cnn" else 6,
            "local_epochs": 2 if model == "cnn" else 1,
            "batch_size": 32,
            "optimizer": "adam",
            "lr": 0.003 if model == "cnn" else 0.001,
        },
        "privacy": privacy,
    }


def timing(model: str, repeats: int) -> None:
    # here, not at the top: `report` needs none of torch, Flower, Opacus
    import torch
    from flwr.app import Context, RecordDict

    from medflower.client.privacy import RoundPrivacy
    from medflower.client.train import make_loader, make_optimizer, train_epochs
    from medflower.modelspec import build_experiment_model
    from medflower.simulation.sites import build_sites

    torch.set_num_threads(1)
    exps = {
        "no DP": ExperimentConfig.from_dict(experiment(model, seed=0, eps=None)),
        "DP-SGD": ExperimentConfig.from_dict(experiment(model, seed=0, eps=8.0)),
    }
    site = build_sites(exps["no DP"])[0]
    times: dict[str, list[float]] = {k: [] for k in exps}
    for rep in range(repeats + 1):  # repeat 0 warms up (imports, Opacus' functorch compilation)
        for name, exp in exps.items():  # side by side: the two alternate
            torch.manual_seed(rep)
            model_ = build_experiment_model(exp)
            loader = make_loader(site.train, exp.train.batch_size, rep)
            opt = make_optimizer(model_, exp.privacy.local_train(exp.train))  # identity without DP
            ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
            dp = RoundPrivacy.start(exp, ctx, site=site.name, num_train=len(site.train), server_round=1)
            train_model, opt, loader = dp.wrap(model_, opt, loader)
            t0 = time.perf_counter()
            train_epochs(train_model, loader, opt, epochs=1, task=exp.task)
            dt = time.perf_counter() - t0
            dp.finish()
            if rep > 0:
                times[name].append(dt)
            print(f"repeat {rep} {name}: {dt:.2f}s per epoch ({len(site.train)} images)", flush=True)
    plain, dpsgd = statistics.median(times["no DP"]), statistics.median(times["DP-SGD"])
    print(
        f"\n| model | images/epoch | no DP (s/epoch) | DP-SGD (s/epoch) | ratio |\n|---|---|---|---|---|\n"
        f"| {model} | {len(site.train)} | {plain:.2f} | {dpsgd:.2f} | {dpsgd / plain:.1f}x |"
    )


def _load() -> list[dict[str, Any]]:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else []


def utility(model: str, eps_list: list[float | None], seeds: list[int]) -> None:
    from medflower.simulation.runner import simulate  # here: `report` needs no torch or Flower

    for seed in seeds:
        for eps in eps_list:
            cfg = experiment(model, seed=seed, eps=eps)
            if any(
                r["model"] == model and r["eps"] == eps and r["seed"] == seed and r.get("config") == cfg
                for r in _load()
            ):
                continue  # this exact run is already recorded
            exp = ExperimentConfig.from_dict(cfg)
            t0 = time.time()
            with tempfile.TemporaryDirectory() as tmp:
                s = simulate(exp, Path(tmp) / "run")
            last = s["rounds"][-1]
            sites_eps = {k: v.get("dp-epsilon") for k, v in last["sites_train"].items()}
            row = {
                "model": model,
                "eps": eps,
                "seed": seed,
                "config": cfg,
                "final_global_test": s["final_global_test"],
                "sites_epsilon": sites_eps,
                "rounds": len(s["rounds"]),
                "refused": sum(
                    int(v.get("dp-budget-exhausted") or 0) for r in s["rounds"] for v in r["sites_train"].values()
                ),
                "wall_seconds": round(time.time() - t0, 1),
            }
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps([*_load(), row], indent=1))
            print(json.dumps(row), flush=True)


def untrained(model: str, seed: int) -> dict[str, float]:
    """The initial global model's test metrics, built as the ServerApp builds it (seeded init)."""
    # here, not at the top: `report` needs no torch
    import torch

    from medflower.data import load_dataset
    from medflower.modelspec import build_experiment_model
    from medflower.tasks import evaluate

    exp = ExperimentConfig.from_dict(experiment(model, seed=seed, eps=None))
    torch.manual_seed(exp.seed)
    return evaluate(build_experiment_model(exp), load_dataset(exp).test, task=exp.task)


def report() -> None:
    current = {
        (m, e, sd): experiment(m, seed=sd, eps=e)
        for m in ("cnn", "vit", "unet")
        for e in (None, 1.0, 3.0, 8.0)
        for sd in range(10)
    }
    rows = [r for r in _load() if r.get("config") == current.get((r["model"], r["eps"], r["seed"]))]
    for model in ("cnn", "vit", "unet"):
        mine = [r for r in rows if r["model"] == model]
        if not mine:
            continue
        metrics = ("dice",) if model == "unet" else ("auc", "balanced-accuracy", "accuracy")
        print(f"\n**{model}** (mean ± sd over seeds; final global test)\n")
        print("| epsilon | seeds | " + " | ".join(f"test {m}" for m in metrics) + " | max site epsilon spent |")
        print("|---|---|" + "---|" * len(metrics) + "---|")
        seeds = sorted({r["seed"] for r in mine})
        init = [untrained(model, sd) for sd in seeds]
        cells = []
        for m in metrics:
            vals = [i[m] for i in init if i.get(m) is not None]
            cells.append(f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:.3f}")
        print(f"| untrained (round 0) | {len(seeds)} | " + " | ".join(cells) + " | - |")
        for eps in (None, 1.0, 3.0, 8.0):
            rs = [r for r in mine if r["eps"] == eps]
            if not rs:
                continue
            cells = []
            for m in metrics:
                vals = [r["final_global_test"].get(m) for r in rs if r["final_global_test"].get(m) is not None]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cells.append(f"{statistics.mean(vals):.3f} ± {sd:.3f}" if vals else "-")
            spent = [
                max(v for v in r["sites_epsilon"].values() if v is not None)
                for r in rs
                if any(v is not None for v in r["sites_epsilon"].values())
            ]
            label = "no DP" if eps is None else f"{eps:g}"
            print(f"| {label} | {len(rs)} | " + " | ".join(cells) + f" | {f'{max(spent):.2f}' if spent else '-'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("timing")
    t.add_argument("--model", choices=("cnn", "vit", "unet"), required=True)
    t.add_argument("--repeats", type=int, default=3)
    u = sub.add_parser("utility")
    u.add_argument("--model", choices=("cnn", "vit", "unet"), required=True)
    u.add_argument("--eps", nargs="+", default=["none", "1", "3", "8"])
    u.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    sub.add_parser("report")
    args = ap.parse_args()
    if args.cmd == "timing":
        timing(args.model, args.repeats)
    elif args.cmd == "utility":
        utility(args.model, [None if e == "none" else float(e) for e in args.eps], args.seeds)
    else:
        report()


if __name__ == "__main__":
    main()
