"""``medflower compare EXPERIMENT.yaml``: pooled, local-only and federated training, cross-site evaluated.

FLamby's benchmark protocol on simulated hospitals: with the same training budget (every model sees
each of its training images ``rounds x local_epochs`` times), train

* **pooled** — one model on the union of all sites' training splits (what centralising the data
  would give; the usual upper reference);
* **local-only** — one model per site on that site's training split alone;
* **federated** — the experiment itself, through :func:`medflower.simulation.runner.simulate` (the
  configured engine, strategy, privacy and participation),

then evaluate every model on every site's test split and on the pooled test set (the union of the
site test splits, each from its own scanner). The matrix shows what a hospital gains by federating:
local models that fall off on other hospitals' scanners and case mixes, and a federated model that
does better than a typical local one without moving any image.

The baselines reuse the clients' own training loop (:func:`medflower.client.train.train_epochs`) and the shared
evaluation (:func:`medflower.tasks.evaluate`), so the three rows differ only in who trains on what.
They are trained without differential privacy even when ``privacy:`` is set (reported as such).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medflower.client.augment import make_augment
from medflower.client.train import make_loader, make_optimizer, train_epochs
from medflower.config import ExperimentConfig
from medflower.data import ArraySplit, load_dataset
from medflower.device import Amp, inference_amp, pin_memory, resolve_amp
from medflower.modelspec import build_experiment_model, initial_model
from medflower.server.app import FINAL_MODEL_FILE
from medflower.simulation.measure import measure_shift
from medflower.simulation.preview import md_table, site_tables, write_json
from medflower.simulation.runner import simulate
from medflower.simulation.sites import SiteData, build_sites
from medflower.strategies.registry import model_device
from medflower.tasks import evaluate, inference_roi

POOLED_TEST = "pooled-test"


def concat(splits: Sequence[ArraySplit]) -> ArraySplit:
    splits = [s for s in splits if len(s)] or list(splits[:1])
    return ArraySplit(np.concatenate([s.images for s in splits]), np.concatenate([s.targets for s in splits]))


def main_metrics(task: str) -> tuple[str, ...]:
    return ("accuracy", "auc", "balanced-accuracy") if task == "classification" else ("dice",)


def train_baseline(
    exp: ExperimentConfig, split: ArraySplit, *, epochs: int, seed: int, amp: Amp | None = None
) -> torch.nn.Module:
    """A model trained centrally on ``split`` with the experiment's recipe (same init as the federation,
    same ``train.augment`` and multiplicity), on ``amp``'s device and in its precision (default: float32
    on the CPU)."""
    amp = amp or Amp(torch.device("cpu"))
    torch.manual_seed(exp.seed)  # the server seeds the federation's initial model the same way
    model = initial_model(exp).to(amp.device)  # and reads model.init the same way
    torch.manual_seed(seed)
    loader = make_loader(split, exp.train.batch_size, seed, pin_memory=pin_memory(amp.device))
    train_epochs(
        model,
        loader,
        make_optimizer(model, exp.train),
        epochs=epochs,
        task=exp.task,
        augment=make_augment(exp.train.augment, seed=seed),
        amp=amp,
        multiplicity=exp.train.augment_multiplicity,
    )
    return model


def evaluate_everywhere(
    model: torch.nn.Module, exp: ExperimentConfig, tests: dict[str, ArraySplit]
) -> dict[str, dict[str, float]]:
    roi = inference_roi(exp)  # 3D models trained on patches infer by sliding window, as the sites do
    amp = inference_amp(model_device(model), exp.train.precision)  # where the model is
    return {
        name: evaluate(model, split, task=exp.task, batch_size=exp.train.eval_batch_size, roi_size=roi, amp=amp)
        for name, split in tests.items()
    }


def federated_model(
    exp: ExperimentConfig, out_dir: Path, *, verbose: bool, device: torch.device | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Run the experiment through its simulation engine; load its final global model (on ``device``)."""
    summary = simulate(exp, out_dir, verbose=verbose)
    path = out_dir / FINAL_MODEL_FILE
    if not path.is_file():
        raise RuntimeError(f"the federated run wrote no {path}; see its log above")
    model = build_experiment_model(exp)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.to(device or torch.device("cpu")), summary


def _nanmean(values: Sequence[float | None]) -> float:
    """The mean of the defined values (None or NaN: undefined, e.g. AUC on one class)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def derive(matrix: dict[str, dict[str, dict[str, float]]], site_names: Sequence[str], metric: str) -> dict[str, Any]:
    """The comparison's headline numbers for one metric."""
    locals_ = [f"local:{s}" for s in site_names if f"local:{s}" in matrix]
    own = {s: matrix[f"local:{s}"][s].get(metric, math.nan) for s in site_names if f"local:{s}" in matrix}
    others = {
        s: _nanmean([matrix[f"local:{s}"][t].get(metric, math.nan) for t in site_names if t != s])
        for s in site_names
        if f"local:{s}" in matrix
    }
    out: dict[str, Any] = {
        "local_own_site": own,
        "local_other_sites": others,
        "local_own_site_mean": _nanmean(list(own.values())),
        "local_other_sites_mean": _nanmean(list(others.values())),
        "local_pooled_test_mean": _nanmean([matrix[m][POOLED_TEST].get(metric, math.nan) for m in locals_]),
    }
    for m in ("pooled", "federated"):
        if m in matrix:
            out[f"{m}_pooled_test"] = matrix[m][POOLED_TEST].get(metric, math.nan)
            out[f"{m}_site_mean"] = _nanmean([matrix[m][s].get(metric, math.nan) for s in site_names])
            out[f"{m}_site_worst"] = min(
                (v for v in (matrix[m][s].get(metric, math.nan) for s in site_names) if not math.isnan(v)),
                default=math.nan,
            )
    return out


def matrix_table(matrix: dict[str, dict[str, dict[str, float]]], columns: Sequence[str], metric: str) -> str:
    return md_table(
        ["model \\ test split", *list(columns)],
        [[m] + [row[c].get(metric, math.nan) for c in columns] for m, row in matrix.items()],
    )


def comparison_table(derived: dict[str, Any], site_names: Sequence[str]) -> str:
    rows = []
    for m in ("pooled", "federated"):
        if f"{m}_pooled_test" in derived:
            rows.append(
                [m, derived[f"{m}_pooled_test"], derived[f"{m}_site_mean"], derived[f"{m}_site_worst"], "-", "-"]
            )
    rows.append(
        [
            "local-only (mean of sites)",
            derived["local_pooled_test_mean"],
            "-",
            "-",
            derived["local_own_site_mean"],
            derived["local_other_sites_mean"],
        ]
    )
    for s in site_names:
        if s in derived["local_own_site"]:
            rows.append([f"local:{s}", "-", "-", "-", derived["local_own_site"][s], derived["local_other_sites"][s]])
    return md_table(["model", "pooled test", "mean over sites", "worst site", "own site", "other sites (mean)"], rows)


def plot_matrix(
    matrix: dict[str, dict[str, dict[str, float]]],
    columns: Sequence[str],
    metrics: Sequence[str],
    path: Path,
    title: str,
    labels: dict[str, str] | None = None,
) -> Path:
    """One heat map per metric: rows are models, columns test splits.

    ``labels`` renames sites (e.g. with their scanner)."""
    # here, not at the top: the headless backend must be chosen before pyplot loads, and a run
    # that plots nothing never pays for matplotlib
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(matrix)
    fig, axes = plt.subplots(
        1,
        len(metrics),
        figsize=(1.0 * len(columns) * len(metrics) + 3.5 * len(metrics), 0.45 * len(models) + 2.2),
        squeeze=False,
    )
    for ax, metric in zip(axes[0], metrics, strict=True):
        data = np.array([[matrix[m][c].get(metric, math.nan) for c in columns] for m in models], dtype=float)
        im = ax.imshow(
            np.ma.masked_invalid(data),
            cmap="viridis",
            vmin=np.nanmin(data) if np.isfinite(data).any() else 0,
            vmax=np.nanmax(data) if np.isfinite(data).any() else 1,
            aspect="auto",
        )
        for i in range(len(models)):
            for j in range(len(columns)):
                v = data[i, j]
                ax.text(
                    j,
                    i,
                    "-" if math.isnan(v) else f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if not math.isnan(v) and v < np.nanmean(data) else "black",
                )
        lab = labels or {}
        ax.set_xticks(range(len(columns)), [lab.get(c, c) for c in columns], rotation=30, ha="right")
        ax.set_yticks(
            range(len(models)),
            [
                m.split(":")[0] + ":" + lab.get(m.split(":", 1)[1], m.split(":", 1)[1]) if ":" in m else m
                for m in models
            ],
        )
        ax.set_xlabel("evaluated on (test split)")
        ax.set_ylabel("model (trained on)")
        ax.set_title(metric)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=metric)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_compare(
    exp: ExperimentConfig,
    out_dir: str | Path,
    *,
    verbose: bool = False,
    federated: bool = True,
    identifiability: bool = True,
) -> dict[str, Any]:
    """Train and cross-evaluate pooled, local-only and federated models; write and print the results."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    torch.set_num_threads(max(1, exp.train.num_threads))
    amp = resolve_amp(exp.train.device, exp.train.precision)  # before any work: this machine runs every model
    ds = load_dataset(exp)
    sites: list[SiteData] = build_sites(exp)
    names = [s.name for s in sites]
    tests = {s.name: s.test for s in sites} | {POOLED_TEST: concat([s.test for s in sites])}
    epochs = exp.train.rounds * exp.train.local_epochs
    print(
        f"medflower compare {exp.name!r}: {len(sites)} sites, budget {epochs} epochs per model "
        f"({exp.train.rounds} rounds x {exp.train.local_epochs} local epochs), model {exp.model.name}",
        flush=True,
    )

    measured = measure_shift(
        sites,
        num_classes=ds.num_classes if ds.task == "classification" else None,
        seed=exp.seed,
        identifiability=identifiability,
        device=amp.device,
    )
    print(site_tables(measured), flush=True)

    matrix: dict[str, dict[str, dict[str, float]]] = {}
    seconds: dict[str, float] = {}
    t0 = time.time()
    pooled = train_baseline(exp, concat([s.train for s in sites]), epochs=epochs, seed=exp.seed * 100003 + 7, amp=amp)
    matrix["pooled"] = evaluate_everywhere(pooled, exp, tests)
    seconds["pooled"] = time.time() - t0
    print(f"\npooled: trained on {sum(len(s.train) for s in sites)} images in {seconds['pooled']:.1f}s", flush=True)
    for i, s in enumerate(sites):
        t0 = time.time()
        if len(s.train) == 0:
            print(f"local:{s.name}: no training images; skipped")
            continue
        model = train_baseline(exp, s.train, epochs=epochs, seed=exp.seed * 100003 + 11 + i, amp=amp)
        matrix[f"local:{s.name}"] = evaluate_everywhere(model, exp, tests)
        seconds[f"local:{s.name}"] = time.time() - t0
        print(f"local:{s.name}: trained on {len(s.train)} images in {seconds[f'local:{s.name}']:.1f}s", flush=True)
    if federated:
        t0 = time.time()
        print("federated: simulating with Flower ...", flush=True)
        fed, _fed_summary = federated_model(exp, out_dir / "federated", verbose=verbose, device=amp.device)
        matrix["federated"] = evaluate_everywhere(fed, exp, tests)
        seconds["federated"] = time.time() - t0
        print(
            f"federated: {exp.train.rounds} rounds in {seconds['federated']:.1f}s "
            f"(summary: {out_dir / 'federated' / 'summary.json'})",
            flush=True,
        )
    # order rows: pooled, federated, locals
    order = [m for m in ("pooled", "federated") if m in matrix] + [m for m in matrix if m.startswith("local:")]
    matrix = {m: matrix[m] for m in order}

    columns = [*names, POOLED_TEST]
    metrics = main_metrics(exp.task)
    derived = {m: derive(matrix, names, m) for m in metrics}
    result = {
        "experiment": exp.to_dict(),
        "dataset": ds.name,
        "synthetic": ds.synthetic,
        "budget_epochs": epochs,
        "baselines_private": False,
        "privacy_mode": exp.privacy.mode,
        "test_sizes": {k: len(v) for k, v in tests.items()},
        "matrix": matrix,
        "derived": derived,
        "shift": measured,
        "seconds": seconds,
        "wall_seconds": time.time() - t_start,
        "federated_summary": "federated/summary.json" if federated else None,
    }
    report = render(result, names)
    print("\n" + report)
    write_json(out_dir / "compare.json", result)
    (out_dir / "compare.md").write_text(report + "\n", encoding="utf-8")
    labels = {s.name: f"{s.name} ({s.info['preset']})" for s in sites if s.info.get("preset")}
    plot_matrix(
        matrix,
        columns,
        metrics[:2],
        out_dir / "compare.png",
        f"{exp.name}: every model on every site's test split (budget {epochs} epochs)",
        labels,
    )
    print(f"\nwritten: {out_dir / 'compare.json'}, {out_dir / 'compare.md'}, {out_dir / 'compare.png'}")
    return result


def render(result: dict[str, Any], names: Sequence[str]) -> str:
    """The markdown report: headline facts, the comparison table and one matrix per metric."""
    exp = result["experiment"]
    lines = [
        f"# Cross-site comparison: {exp['name']}",
        "",
        f"Data set {result['dataset']}{' (SYNTHETIC)' if result['synthetic'] else ''}, {len(names)} sites, "
        f"model {exp['model']['name']}, strategy {exp['strategy']['name']}, seed {exp['seed']}; every model "
        f"trained for {result['budget_epochs']} epochs over its data. Test sizes: "
        + ", ".join(f"{k} {v}" for k, v in result["test_sizes"].items())
        + ".",
    ]
    if result["privacy_mode"] != "none":
        lines.append(
            f"The federated model trains with privacy mode {result['privacy_mode']!r}; the pooled and "
            "local baselines do not."
        )
    ident = result["shift"].get("identifiability")
    if ident:
        lines += [
            "",
            f"Site identifiability: balanced accuracy {ident['balanced_accuracy']:.3f} (chance {ident['chance']:.3f}).",
        ]
    for metric, d in result["derived"].items():
        lines += ["", f"## {metric}", ""]
        facts = [
            f"local-only models: {d['local_own_site_mean']:.3f} on their own site's test split, "
            f"{d['local_other_sites_mean']:.3f} on other sites' (mean)"
        ]
        if "federated_pooled_test" in d:
            facts.append(
                f"pooled test set: federated {d['federated_pooled_test']:.3f}, mean local-only "
                f"{d['local_pooled_test_mean']:.3f}, pooled (centralised) {d.get('pooled_pooled_test', math.nan):.3f}"
            )
        lines += [f"- {f}" for f in facts] + [
            "",
            comparison_table(d, names),
            "",
            matrix_table(result["matrix"], [*list(names), POOLED_TEST], metric),
        ]
    return "\n".join(lines)
