"""Issue 12's strategy benchmark: aggregation strategies against pooled and local-only training, with CIs.

    python bench/strategy_benchmark.py run --jobs 2      # the sweeps, then the baselines (resumable)
    python bench/strategy_benchmark.py report            # the markdown tables for bench/RESULTS.md
    python bench/strategy_benchmark.py paired bench/results/strategies60/*_runs.jsonl   # each vs FedAvg, per seed

``run`` runs ``medflower sweep`` on each of :data:`SWEEPS` (``bench/sweeps/strategies_*.yaml``: the
strategies x Dirichlet alpha 0.1 / 0.5 / 1.0 x seeds 0-2 on BreastMNIST and RetinaMNIST, a scanner
shift partition on BreastMNIST, and Dirichlet 0.5 on the 3D sets VesselMNIST3D and AdrenalMNIST3D),
then, for every partition and seed of those sweeps, the two baselines ``medflower compare`` defines, on
the same sites and with the same epoch budget (rounds x local epochs):

* **pooled**: one model trained on the union of the sites' training splits (centralised data);
* **local-only**: one model per site on its own training split, each scored on the global test split;
  the table shows their mean.

Every model is scored on the data set's held-out test split (the federation's ``final_global_test``).
Binary tasks are also scored at an operating threshold chosen on validation, never on test: the
federation's is the federated Youden threshold of ``summary.json`` (``final_global_test_at_threshold``);
a baseline's is Youden's J on its own training sites' validation splits (pooled: all of them; a local
model: its site's), with the same fixed-bin histograms (:mod:`medflower.threshold`).

Both steps resume: a finished sweep run is never redone (``medflower sweep``), and a baseline whose JSON
file exists is skipped. ``report`` prints, per data set and partition, mean ± sd and the 95 % CI over the
seeds, and the mean global AUC at a quarter, half, three quarters and all of the rounds (60 rounds: 15, 30,
45, 60; whether the curves have flattened).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a script: the checkout's medflower, installed or not

from medflower.config import ExperimentConfig  # noqa: E402  (after the sys.path line above)
from medflower.data.base import ArraySplit  # noqa: E402
from medflower.metrics import classification_metrics  # noqa: E402
from medflower.simulation.sweep import load_sweep, mean_ci  # noqa: E402
from medflower.threshold import metrics_at_threshold, score_histograms, youden_threshold  # noqa: E402

SWEEPS = ("strategies_breastmnist", "strategies_retinamnist", "strategies_shift", "strategies_3d")
STRATEGY_KEYS = ("strategy.name", "strategy.params", "train.optimizer", "train.lr")


def curve_rounds(stem: str) -> tuple[int, ...]:
    """The rounds whose global AUC the report shows: a quarter, half, three quarters and all of the run's."""
    rounds = load_sweep(sweep_path(stem)).runs[0].exp.train.rounds
    return tuple(sorted({max(1, round(rounds * f)) for f in (0.25, 0.5, 0.75, 1.0)}))


def sweep_path(stem: str) -> Path:
    return REPO / "bench" / "sweeps" / f"{stem}.yaml"


def partition_key(values: dict[str, Any]) -> str:
    """A run's partition and seed: its grid values without the strategy's."""
    return ",".join(f"{k}={values[k]}" for k in sorted(values) if k not in STRATEGY_KEYS)


# ------------------------------------------------------------------------------------------ baselines
def logits_of(model: torch.nn.Module, split: ArraySplit, batch: int) -> torch.Tensor:
    """Logits on the CPU, computed where the model is."""
    model.eval()
    x, device = torch.from_numpy(split.images), next(model.parameters()).device
    with torch.no_grad():
        parts = [model(x[i : i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)]
    return torch.cat(parts) if parts else torch.zeros(0, 2)


def score(model: torch.nn.Module, exp: ExperimentConfig, test: ArraySplit, val: ArraySplit) -> dict[str, Any]:
    """AUC and balanced accuracy on ``test``; binary: also at the Youden threshold chosen on ``val``."""
    batch = exp.train.eval_batch_size
    logits, labels = logits_of(model, test, batch), torch.from_numpy(test.targets.reshape(-1)).long()
    out: dict[str, Any] = {"final": classification_metrics(logits, labels)}
    if logits.shape[1] == 2:
        val_logits = logits_of(model, val, batch)
        val_h = score_histograms(val_logits, torch.from_numpy(val.targets.reshape(-1)).long())
        chosen = youden_threshold(val_h["score-hist-0"], val_h["score-hist-1"])
        if chosen is not None:
            test_h = score_histograms(logits, labels)
            out["at-threshold"] = metrics_at_threshold(test_h["score-hist-0"], test_h["score-hist-1"], chosen[0])
    return out


def run_baselines(exp: ExperimentConfig) -> dict[str, Any]:
    """Pooled and local-only models for ``exp``'s sites, the federation's epoch budget, scored on the
    global test split and on each site's own test split (``sites``: what the federation's ``sites_test``
    reports; a local model is scored on its own site's)."""
    from medflower.data import load_dataset
    from medflower.device import resolve_amp
    from medflower.simulation.compare import concat, train_baseline
    from medflower.simulation.sites import build_sites

    amp = resolve_amp(exp.train.device, exp.train.precision)  # as `medflower compare`: CUDA when present
    torch.set_num_threads(max(1, exp.train.num_threads))
    test = load_dataset(exp).test
    sites = build_sites(exp)
    epochs = exp.train.rounds * exp.train.local_epochs
    pooled = train_baseline(exp, concat([s.train for s in sites]), epochs=epochs, seed=exp.seed * 100003 + 7, amp=amp)
    result: dict[str, Any] = {"pooled": score(pooled, exp, test, concat([s.val for s in sites])), "local": {}}
    result["pooled"]["sites"] = {s.name: score(pooled, exp, s.test, s.val)["final"] for s in sites if len(s.test)}
    for i, s in enumerate(sites):
        if len(s.train) == 0:
            continue
        model = train_baseline(exp, s.train, epochs=epochs, seed=exp.seed * 100003 + 11 + i, amp=amp)
        result["local"][s.name] = score(model, exp, test, s.val)
        if len(s.test):
            result["local"][s.name]["own-site"] = score(model, exp, s.test, s.val)["final"]
    return result


def _baseline_job(stem: str, index: int, path: str) -> str:
    run = load_sweep(sweep_path(stem)).runs[index]
    record = {
        "key": partition_key(run.values),
        "values": {k: run.values[k] for k in run.values if k not in STRATEGY_KEYS},
    }
    record |= run_baselines(run.exp)
    Path(path).write_text(json.dumps(record, indent=1))
    return f"{stem}: baselines for {record['key']} done"


def baselines(stems: list[str], out: Path, *, jobs: int) -> None:
    """Every partition and seed of ``stems``' sweeps once (resumable: a written JSON is kept)."""
    from concurrent.futures import ProcessPoolExecutor

    tasks = []
    for stem in stems:
        folder = out / "baselines" / stem
        folder.mkdir(parents=True, exist_ok=True)
        seen: set[str] = set()
        for i, run in enumerate(load_sweep(sweep_path(stem)).runs):
            key = partition_key(run.values)
            path = folder / f"{key.replace('=', '-').replace(',', '_').replace('/', '-')}.json"  # data.path keys
            if key not in seen and not path.is_file():
                tasks.append((stem, i, str(path)))
            seen.add(key)
    print(f"baselines: {len(tasks)} partition(s) to train", flush=True)
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for message in pool.map(_baseline_job, *zip(*tasks, strict=True)) if tasks else []:
            print(message, flush=True)


def cmd_run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    for stem in args.sweeps:
        cmd = [sys.executable, "-m", "medflower.cli", "sweep", str(sweep_path(stem)), "-o", str(out / stem)]
        subprocess.run([*cmd, "--jobs", str(args.jobs)], check=True, cwd=REPO)
    baselines(list(args.sweeps), out, jobs=args.jobs)


# ------------------------------------------------------------------------------------------ report
def _cell(values: list[float]) -> str:
    """mean ± sd [95 % CI] over the finite values; "(n=k)" when some were undefined (NaN)."""
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return "–"
    ci = mean_ci(vals)
    some = f" (n={len(vals)})" if len(vals) < len(values) else ""
    if ci["ci_low"] is None:
        return f"{ci['mean']:.3f}{some}"
    return f"{ci['mean']:.3f} ± {ci['sd']:.3f} [{ci['ci_low']:.3f}, {ci['ci_high']:.3f}]{some}"


def _get(rec: dict[str, Any], part: str, metric: str) -> float:
    v = (rec.get(part) or {}).get(metric)
    return float(v) if isinstance(v, (int, float)) else math.nan


def sites_auc(run_dir: Path) -> float:
    """Mean over sites of the final model on each site's own test split (FedBN: with the site's own
    normalisation layers); sites whose test split holds one class have no AUC and are left out."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return _finite_mean([m.get("test-auc") for m in (summary.get("sites_test") or {}).values()])


def _finite_mean(values: list[Any]) -> float:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


def curve(run_dir: Path, rounds: tuple[int, ...]) -> list[float]:
    summary = json.loads((run_dir / "summary.json").read_text())
    by_round = {r["round"]: (r.get("global_test") or {}).get("auc") for r in summary.get("rounds", [])}
    return [float(by_round[r]) if isinstance(by_round.get(r), (int, float)) else math.nan for r in rounds]


def report_sweep(stem: str, out: Path) -> str:
    runs = [json.loads(line) for line in (out / stem / "runs.jsonl").read_text().splitlines() if line.strip()]
    binary = any(r.get("at-threshold") for r in runs)
    parts: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in runs:
        keys = r["keys"]
        part = ", ".join(f"{k} {keys[k]}" for k in keys if k not in STRATEGY_KEYS and k != "seed") or "—"
        parts.setdefault(part, {}).setdefault(str(keys.get("strategy.name")), []).append(r)
    base_recs = [json.loads(p.read_text()) for p in sorted((out / "baselines" / stem).glob("*.json"))]
    lines = [f"### {stem.removeprefix('strategies_')}", ""]
    head = ["model", "runs", "test AUC", "test bal. acc. (argmax)"]
    head += ["test bal. acc. @thr (chosen on validation)"] if binary else []
    head += ["sites' own test AUC (mean)"]
    checkpoints = curve_rounds(stem)
    head += [f"AUC round {r}" for r in checkpoints]
    for part, strategies in parts.items():
        lines += [f"**{part}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, recs in strategies.items():
            row = [name, str(len(recs)), _cell([_get(r, "final", "auc") for r in recs])]
            row.append(_cell([_get(r, "final", "balanced-accuracy") for r in recs]))
            if binary:
                row.append(_cell([_get(r, "at-threshold", "balanced-accuracy") for r in recs]))
            row.append(_cell([sites_auc(out / stem / r["run"]) for r in recs]))
            curves = np.array([curve(out / stem / r["run"], checkpoints) for r in recs])
            row += [f"{np.nanmean(c):.3f}" if np.isfinite(c).any() else "–" for c in curves.T]
            lines.append("| " + " | ".join(row) + " |")
        # the baselines of this partition: the same values of every key the sweep varies but the seed
        shown = {k: v for k, v in strategies[next(iter(strategies))][0]["keys"].items() if k not in STRATEGY_KEYS}
        shown.pop("seed", None)
        mine = [b for b in base_recs if all(b["values"].get(k) == v for k, v in shown.items())]
        own_site = {
            "pooled (centralised)": lambda b: [m.get("auc") for m in b["pooled"].get("sites", {}).values()],
            "local-only (mean of sites)": lambda b: [(m.get("own-site") or {}).get("auc") for m in b["local"].values()],
        }
        for label, get in (
            ("pooled (centralised)", lambda b: [b["pooled"]]),
            ("local-only (mean of sites)", lambda b: list(b["local"].values())),
        ):
            per_seed = [get(b) for b in mine]
            row = [f"*{label}*", str(len(per_seed))]
            parts_shown = [("final", "auc"), ("final", "balanced-accuracy")]
            parts_shown += [("at-threshold", "balanced-accuracy")] if binary else []
            for part_name, metric in parts_shown:
                row.append(_cell([_finite_mean([_get(m, part_name, metric) for m in ms]) for ms in per_seed]))
            row.append(_cell([_finite_mean(own_site[label](b)) for b in mine]))
            row += ["–"] * len(checkpoints)
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def paired(runs: list[dict[str, Any]], *, reference: str = "fedavg", metric: tuple[str, str] = ("final", "auc")) -> str:
    """Each strategy minus ``reference`` on the same seed, per partition: mean, sd and the 95 % t CI of
    the paired differences, and whether that CI excludes 0.

    Why paired: one seed fixes the partition (which site holds which images) and the initial model for
    every strategy alike, so most of the seed-to-seed spread in the unpaired table (a partition that is
    hard for all) cancels in the difference; two strategies whose unpaired CIs overlap can still differ
    on every seed in the same direction. Seeds present for only one of the two are left out.
    """
    parts: dict[str, dict[str, dict[Any, float]]] = {}
    for r in runs:
        keys = r["keys"]
        part = ", ".join(f"{k} {keys[k]}" for k in keys if k not in STRATEGY_KEYS and k != "seed") or "—"
        parts.setdefault(part, {}).setdefault(str(keys.get("strategy.name")), {})[keys.get("seed")] = _get(r, *metric)
    label = f"{metric[0]} {metric[1]}"
    lines = [
        f"| partition | strategy | seeds | Δ {label} vs {reference}: mean ± sd [95 % CI] | separated |",
        "|---|---|---|---|---|",
    ]
    for part, strategies in parts.items():
        ref = strategies.get(reference, {})
        for name, by_seed in strategies.items():
            if name == reference:
                continue
            diffs = [by_seed[sd] - ref[sd] for sd in by_seed if sd in ref and math.isfinite(by_seed[sd] - ref[sd])]
            if len(diffs) < 2:
                lines.append(f"| {part} | {name} | {len(diffs)} | – | – |")
                continue
            ci = mean_ci(diffs)
            low, high = float(ci["ci_low"] or 0.0), float(ci["ci_high"] or 0.0)
            verdict = "better" if low > 0 else "worse" if high < 0 else "no"
            cell = f"{ci['mean']:+.3f} ± {ci['sd']:.3f} [{low:+.3f}, {high:+.3f}]"
            lines.append(f"| {part} | {name} | {len(diffs)} | {cell} | {verdict} |")
    return "\n".join(lines)


def cmd_paired(args: argparse.Namespace) -> None:
    for path in args.runs:
        runs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        binary = any(r.get("at-threshold") for r in runs)
        name = Path(path).parent.name if Path(path).name == "runs.jsonl" else Path(path).name
        print(f"### {name}\n")
        print(paired(runs, reference=args.reference) + "\n")
        if binary:
            print(paired(runs, reference=args.reference, metric=("at-threshold", "balanced-accuracy")) + "\n")


def cmd_report(args: argparse.Namespace) -> None:
    out = Path(args.out)
    for stem in args.sweeps:
        if (out / stem / "runs.jsonl").is_file():
            print(report_sweep(stem, out))
        else:
            print(f"### {stem}: not run yet ({out / stem / 'runs.jsonl'} is missing)\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn in (("run", cmd_run), ("report", cmd_report)):
        s = sub.add_parser(name)
        s.add_argument("--out", default=str(REPO / "runs" / "strategies"), help="where the sweeps and baselines go")
        s.add_argument("--sweeps", nargs="+", default=list(SWEEPS), choices=SWEEPS)
        s.set_defaults(func=fn)
        if name == "run":
            s.add_argument("--jobs", type=int, default=1, help="medflower sweep --jobs")
    s = sub.add_parser("paired", help="paired differences against one strategy, from sweeps' runs.jsonl")
    s.add_argument("runs", nargs="+", help="runs.jsonl files (e.g. bench/results/strategies60/*_runs.jsonl)")
    s.add_argument("--reference", default="fedavg", help="the strategy every other is compared with")
    s.set_defaults(func=cmd_paired)
    args = p.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
