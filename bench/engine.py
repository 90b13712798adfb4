"""What the simulation engine costs: ``medflower simulate`` against a plain PyTorch FedAvg loop.

Issue 11's bar: at 5 sites, on the synthetic and the MedMNIST workloads, ``medflower simulate`` (process
start to exit) takes at most 1.15x the wall time of a plain single-process PyTorch loop doing the same
work (:mod:`bench.plain_fedavg`: same sites, network, initial weights, rounds, local epochs, optimizer,
batch size, thread count and evaluations), with accuracy equal within noise. Both run as fresh
processes, back to back, so each pays its own imports.

The fastest peer is the yardstick too: when pfl-research is at hand, :mod:`bench.pfl_fedavg` does the
same work with pfl's simulator (FedAvg, same sites, network, initial weights, recipe and evaluations; its
docstring lists where pfl differs) and the script prints medflower's wall and CPU ratios to it, and pfl's
to the plain loop. ``pfl==0.6.0`` pins ``dp-accounting<0.6`` and the ``test`` extra pins
``dp-accounting==0.6.0``, so pfl lives in an environment of its own (the ``bench-pfl`` extra), found by
interpreter: ``--pfl-python PATH``, else ``$MEDFLOWER_PFL_PYTHON``, else this interpreter if it can
import pfl. Without one the pfl comparison is skipped, and the script says how to enable it.

Workload (issue 11): the ``cnn`` with width 32, Dirichlet(0.5) partition, 1 local epoch, Adam 1e-3, batch
32, 20 rounds; 3, 5 and 20 sites; BreastMNIST and RetinaMNIST from ``../shared/data/medmnist`` (or
``$MEDFLOWER_SHARED_DATA``) and a SYNTHETIC set of 5,000 training images of 28x28.

    python bench/engine.py                         # the full grid (about an hour on 2 cores)
    python bench/engine.py --quick                 # smoke run: 3 sites, 2 rounds, small synthetic set
    python bench/engine.py --workloads synthetic --sites 5 --engines local ray
    python bench/engine.py --pfl-python /path/to/pfl-env/bin/python   # with the pfl-research yardstick

Timings mean something only on a quiet machine: the script refuses to record (``--record``) while the
1-minute load average is at or above 1.5.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDFLOWER_SHARED_DATA", REPO.parent / "shared" / "data"))
MAX_LOAD = 1.5
WORKLOADS = ("synthetic", "breastmnist", "retinamnist")


def experiment(workload: str, sites: int, rounds: int, *, samples: int = 5000) -> dict[str, Any]:
    """Issue 11's workload as an experiment YAML mapping."""
    if workload == "synthetic":
        data: dict[str, Any] = {"kind": "synthetic", "synthetic_samples": samples}
    else:
        data = {"kind": "medmnist", "path": str(SHARED / "medmnist" / f"{workload}.npz")}
    return {
        "name": f"engine-{workload}-{sites}",
        "seed": 0,
        "data": data,
        # 20 sites of BreastMNIST's 546 images: no Dirichlet(0.5) draw gives each the default 10 images
        "partition": {
            "kind": "dirichlet",
            "num_sites": sites,
            "alpha": 0.5,
            **({"min_site_size": 2} if sites >= 20 else {}),
        },
        "model": {"name": "cnn", "params": {"width": 32}},
        "train": {"rounds": rounds, "local_epochs": 1, "optimizer": "adam", "lr": 1e-3, "batch_size": 32},
    }


def write_plain_inputs(exp_dict: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    """The plain loop's inputs: medflower's very sites as arrays, and the recipe (not timed)."""
    from medflower.config import ExperimentConfig
    from medflower.data import load_dataset
    from medflower.simulation.sites import build_sites

    exp = ExperimentConfig.from_dict(exp_dict)
    ds = load_dataset(exp)
    arrays: dict[str, np.ndarray] = {"test_x": ds.test.images, "test_y": ds.test.targets.reshape(-1)}
    for i, site in enumerate(build_sites(exp)):
        for s in ("train", "val", "test"):
            split = site.split(s)
            arrays[f"{i}_{s}_x"], arrays[f"{i}_{s}_y"] = split.images, split.targets.reshape(-1)
    npz, spec = folder / "sites.npz", folder / "spec.json"
    np.savez(npz, **arrays)
    t = exp.train
    model = {
        "spatial_dims": 2,
        "in_channels": ds.in_channels,
        "out_channels": ds.num_classes,
        "width": exp.model.params["width"],
        "norm": exp.model.norm,
    }
    recipe = {"seed": exp.seed, "num_sites": exp.partition.num_sites, "rounds": t.rounds, "model": model}
    recipe |= {"local_epochs": t.local_epochs, "lr": t.lr, "batch_size": t.batch_size}
    recipe |= {"eval_batch_size": t.eval_batch_size, "num_threads": t.num_threads}
    spec.write_text(json.dumps(recipe))
    return npz, spec


PFL_HELP = (
    "to enable it, give pfl an environment of its own (pfl==0.6.0 pins dp-accounting<0.6, the test extra "
    "dp-accounting==0.6.0): `python -m venv --system-site-packages ENV && ENV/bin/pip install pfl==0.6.0` "
    "next to torch 2.13 (or `ENV/bin/pip install -e '.[bench-pfl]'` in a fresh venv), then pass "
    "--pfl-python ENV/bin/python or set MEDFLOWER_PFL_PYTHON"
)


def find_pfl(python: str | None) -> tuple[str | None, str]:
    """The interpreter to run :mod:`bench.pfl_fedavg` with, or None, and a line saying which and why.

    ``python`` is ``--pfl-python``; without it ``$MEDFLOWER_PFL_PYTHON``, else this interpreter. The
    interpreter is asked whether it can import pfl (a look-up, not an import: no torch start-up).
    """
    python = python or os.environ.get("MEDFLOWER_PFL_PYTHON") or sys.executable
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('pfl') is None)"
    try:
        found = subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"pfl (pfl-research): cannot run {python} ({err}): its comparison is skipped; {PFL_HELP}"
    if not found:
        return None, f"pfl (pfl-research) is not installed for {python}: its comparison is skipped; {PFL_HELP}"
    return python, f"pfl (pfl-research) runs with {python}: each row adds it, and the ratios to it"


def _children_cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds from process start to exit, CPU seconds of the process and its reaped children (on
    a loaded machine the fairer of the two; Ray's daemons are not counted), and its stdout."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cpu0, t0 = _children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    seconds, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return seconds, cpu, proc.stdout


def _result(seconds: float, cpu: float, final: dict[str, float]) -> dict[str, float]:
    return {"seconds": seconds, "cpu": cpu, "accuracy": final["accuracy"], "balanced": final["balanced-accuracy"]}


def run_case(
    workload: str, sites: int, rounds: int, engines: list[str], *, samples: int, pfl_python: str | None = None
) -> dict[str, Any]:
    exp_dict = experiment(workload, sites, rounds, samples=samples)
    with tempfile.TemporaryDirectory(prefix="mf-engine-") as tmp:
        folder = Path(tmp)
        yaml_path = folder / "exp.yaml"
        yaml_path.write_text(yaml.safe_dump(exp_dict))
        npz, spec = write_plain_inputs(exp_dict, folder)
        row: dict[str, Any] = {"workload": workload, "sites": sites, "rounds": rounds}
        for engine in engines:
            out = folder / f"run-{engine}"
            cmd = [
                sys.executable,
                "-m",
                "medflower.cli",
                "simulate",
                str(yaml_path),
                "-o",
                str(out),
                "--engine",
                engine,
            ]
            seconds, cpu, _ = timed(cmd)
            final = json.loads((out / "summary.json").read_text())["final_global_test"]
            row[engine] = _result(seconds, cpu, final)
        loops = {"plain": (sys.executable, "plain_fedavg.py")}
        if pfl_python:
            loops["pfl"] = (pfl_python, "pfl_fedavg.py")
        for name, (python, script) in loops.items():
            seconds, cpu, stdout = timed([python, str(REPO / "bench" / script), str(npz), str(spec)])
            row[name] = _result(seconds, cpu, json.loads(stdout.strip().splitlines()[-1])["final_global_test"])
    return row


def _ratios(r: dict[str, float], base: dict[str, float]) -> str:
    return f"({r['seconds'] / base['seconds']:.2f}x) cpu {r['cpu']:6.1f}s ({r['cpu'] / base['cpu']:.2f}x)"


def print_row(row: dict[str, Any], engines: list[str]) -> None:
    plain = row["plain"]
    parts = [f"{row['workload']:<12} {row['sites']:>3} sites {row['rounds']:>3} rounds"]
    parts.append(f"plain {plain['seconds']:6.1f}s cpu {plain['cpu']:6.1f}s acc {plain['accuracy']:.3f}")
    pfl = row.get("pfl")
    if pfl:
        parts.append(f"pfl {pfl['seconds']:6.1f}s {_ratios(pfl, plain)} acc {pfl['accuracy']:.3f}")
    for e in engines:
        r = row[e]
        part = f"{e} {r['seconds']:6.1f}s {_ratios(r, plain)} acc {r['accuracy']:.3f}"
        if pfl:
            wall, cpu = r["seconds"] / pfl["seconds"], r["cpu"] / pfl["cpu"]
            part += f" [vs pfl: wall {wall:.2f}x cpu {cpu:.2f}x]"
        parts.append(part)
    print(" | ".join(parts), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: synthetic, 3 sites, 2 rounds, 600 images")
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    p.add_argument("--sites", nargs="+", type=int, default=[3, 5, 20])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--engines", nargs="+", choices=("local", "ray"), default=["local"])
    p.add_argument("--record", help="write the rows as JSON to this file (refused on a loaded machine)")
    p.add_argument(
        "--pfl-python",
        help="an interpreter with pfl==0.6.0 installed (default: $MEDFLOWER_PFL_PYTHON, else this one if it has pfl)",
    )
    args = p.parse_args(argv)
    workloads, sites, rounds, samples = args.workloads, args.sites, args.rounds, 5000
    if args.quick:
        workloads, sites, rounds, samples = ["synthetic"], [3], 2, 600
    load = os.getloadavg()[0]
    if args.record and load >= MAX_LOAD:
        raise SystemExit(f"load average {load:.2f} >= {MAX_LOAD}: timings would measure the other jobs; not recording")
    pfl_python, pfl_line = find_pfl(args.pfl_python)
    print(pfl_line)
    print(f"load average {load:.2f}; each run is a fresh process, timed from start to exit", flush=True)
    rows = []
    for workload in workloads:
        for n in sites:
            row = run_case(workload, n, rounds, args.engines, samples=samples, pfl_python=pfl_python)
            print_row(row, args.engines)
            rows.append(row)
    if args.record:
        Path(args.record).write_text(
            json.dumps({"load_average": load, "pfl_python": pfl_python, "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
