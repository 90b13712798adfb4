"""``medflower sweep SWEEP.yaml``: a grid of experiments in one command, resumable, with CI tables.

A sweep file names a base experiment and the keys to vary::

    base: experiment.yaml          # relative to this file, or an inline experiment mapping
    grid:                          # any experiment keys, dotted; every combination runs
      seed: [0, 1, 2]
      partition.alpha: [0.1, 1.0]
    cases:                         # optional: settings that vary together; each runs with every grid combination
      - {strategy.name: fedavg}
      - {strategy.name: fedprox}
      - {strategy.name: scaffold, train.optimizer: sgd, train.lr: 0.05}
    metrics: [auc, balanced-accuracy]   # optional: the global test metrics the tables show

What it guarantees, and how:

* **Validated first.** Every combination is built into an :class:`ExperimentConfig` before any run;
  a key that does not exist or a value that fails validation is an error naming the grid key, the
  value and the reason. More than :data:`MAX_RUNS_WITHOUT_YES` runs need ``--yes``.
* **Engine start-up paid once.** Runs go through the real ServerApp loop and the simulation's
  ClientApp on the in-process grid (:mod:`medflower.simulation.inprocess`), one after the other in
  one long-lived process per job (``--jobs N``: N worker processes): imports, data sets and the
  model zoo load once per process, where Flower's simulation engine starts and stops Ray for every
  run (about 10 s each here). Runs are bit-reproducible and the two engines give the same metrics
  (``tests/test_reproducible.py``), so the engine does not change the numbers.
* **Resumable.** Each run has its own folder, named by its key values; a folder with a
  ``summary.json`` (written atomically, last) is finished and never redone. A killed sweep, run
  again with the same ``-o``, continues with the runs that have none (a run cut short restarts
  from round 1: the simulated sites' state lives in memory).
* **Tables.** ``runs.jsonl`` (one line per run: the varying keys, the final, selected and
  at-threshold global test metrics, the wall time) and ``table.md``/``table.csv``: per cell (the
  varying keys other than ``seed``), mean ± sd and a two-sided 95 % confidence interval over the
  seeds, mean ± t(0.975, n-1)·sd/√n (:func:`t_quantile`).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medflower.config import ExperimentConfig
from medflower.fileio import atomic_write_text
from medflower.schema import ConfigError, read_yaml_mapping

MAX_RUNS_WITHOUT_YES = 1000
SWEEP_KEYS = ("base", "grid", "cases", "metrics")
DEFAULT_METRICS = {
    "classification": ("auc", "balanced-accuracy", "accuracy"),
    "segmentation": ("dice", "hd95"),
}
# the summary's test metrics a run reports, by the column prefix the tables give them
SUMMARY_PARTS = {
    "final": "final_global_test",
    "selected": "selected_global_test",
    "at-threshold": "final_global_test_at_threshold",
}


@dataclass(frozen=True)
class Run:
    """One combination: its grid values (in grid order), its folder name and its experiment."""

    values: dict[str, Any]
    name: str
    exp: ExperimentConfig


@dataclass(frozen=True)
class Sweep:
    path: Path
    grid: dict[str, list[Any]]
    metrics: tuple[str, ...]
    runs: list[Run]
    varying: list[str]  # the keys whose value differs between runs (the tables' columns), in file order


# ------------------------------------------------------------------------------------------ the plan
def set_dotted(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of ``data`` with ``a.b.c`` set to ``value``; a part that is not a mapping is an error."""
    head, _, rest = key.partition(".")
    if not rest:
        return {**data, head: value}
    inner = data.get(head, {})
    if inner is None:
        inner = {}
    if not isinstance(inner, dict):
        raise ConfigError(f"{head} is {inner!r}, not a mapping: cannot set {key}")
    return {**data, head: set_dotted(inner, rest, value)}


def show(value: Any) -> str:
    """A key's value as run names and tables show it: mappings as ``k=v,k=v``, unset (a case that
    leaves the key alone) as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={show(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ",".join(show(v) for v in value)
    return str(value)


def run_name(values: dict[str, Any]) -> str:
    """The run's folder: ``key=value`` pairs (unset ones left out) joined by ``__``; unsafe characters
    become ``-``."""
    parts = [f"{k}={show(v)}" for k, v in values.items() if v is not None]
    return re.sub(r"[^A-Za-z0-9._=,+-]", "-", "__".join(parts))[:200] if parts else "run"


def _base(raw: dict[str, Any], path: Path) -> tuple[dict[str, Any], Path]:
    """The base experiment mapping and the folder its relative paths resolve from."""
    base = raw.get("base")
    if isinstance(base, str):
        base_path = (path.parent / base).expanduser()
        return read_yaml_mapping(base_path, what="experiment"), base_path.resolve().parent
    if isinstance(base, dict):
        return base, path.resolve().parent
    raise ConfigError(f"{path}: base must be an experiment YAML path or an inline mapping, got {base!r}")


def _grid(raw: dict[str, Any], path: Path) -> dict[str, list[Any]]:
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"{path}: grid must be a mapping of dotted experiment keys to lists of values")
    out = {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid.{key} must be a non-empty list of values, got {values!r}")
        out[str(key)] = values
    return out


def _cases(raw: dict[str, Any], path: Path, grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """``cases:``: settings that vary *together* (a strategy and the optimizer it needs); each case
    runs with every grid combination. None: one empty case."""
    cases = raw.get("cases")
    if cases is None:
        return [{}]
    if not isinstance(cases, list) or not cases or not all(isinstance(c, dict) for c in cases):
        raise ConfigError(f"{path}: cases must be a non-empty list of mappings of dotted keys to values")
    for i, case in enumerate(cases):
        both = sorted(set(case) & set(grid))
        if both:
            raise ConfigError(f"{path}: cases[{i}] sets {both[0]}, which grid varies too")
    return [{str(k): v for k, v in c.items()} for c in cases]


def load_sweep(path: str | Path, *, allow_many: bool = False) -> Sweep:
    """Read a sweep file and build (validate) every run's experiment before anything runs."""
    path = Path(path)
    raw = read_yaml_mapping(path, what="sweep", keys_hint="keys " + ", ".join(SWEEP_KEYS))
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]}; valid keys are " + ", ".join(SWEEP_KEYS))
    base, base_dir = _base(raw, path)
    grid = _grid(raw, path)
    cases = _cases(raw, path, grid)
    total = len(cases) * math.prod(len(v) for v in grid.values())
    if total > MAX_RUNS_WITHOUT_YES and not allow_many:
        raise ConfigError(
            f"{path}: the grid has {total} runs (more than {MAX_RUNS_WITHOUT_YES}); pass --yes to run them"
        )
    case_keys = list(dict.fromkeys(k for c in cases for k in c))
    varying = [k for k in case_keys if len({json.dumps(c.get(k), sort_keys=True) for c in cases}) > 1]
    varying += [k for k, v in grid.items() if len(v) > 1]
    runs: list[Run] = []
    names: set[str] = set()
    for case, combo in itertools.product(cases, itertools.product(*grid.values())):
        values = {**case, **dict(zip(grid, combo, strict=True))}
        data = base
        for key, value in values.items():
            try:
                data = set_dotted(data, key, value)
            except ConfigError as err:
                raise ConfigError(f"{path}: grid {key} = {value!r}: {err}") from err
        try:
            exp = ExperimentConfig.from_dict(data, base_dir=base_dir)
        except ConfigError as err:
            shown = ", ".join(f"{k} = {v!r}" for k, v in values.items())
            raise ConfigError(f"{path}: grid combination {shown}: {err}") from err
        name = run_name({k: values.get(k) for k in varying})
        if name in names:  # e.g. two values that differ only in unsafe characters
            name = f"{name}__{len(runs)}"
        names.add(name)
        runs.append(Run(values, name, exp))
    metrics = tuple(raw.get("metrics") or DEFAULT_METRICS.get(runs[0].exp.task, ("loss",)))
    return Sweep(path, grid, metrics, runs, varying)


# ------------------------------------------------------------------------------------------ running
def run_one(exp_json: str, out_dir: str) -> float:
    """One run on the in-process grid (this process); returns its wall time. A worker's entry point."""
    from medflower.simulation.inprocess import simulate_inprocess  # here: `--help` and the planner need no torch

    t0 = time.time()
    simulate_inprocess(ExperimentConfig.from_json(exp_json), out_dir)
    return time.time() - t0


def _quiet_worker() -> None:
    """A process that runs sweep runs: Flower's per-round log lines would drown (or, with ``--jobs``,
    interleave) the progress lines; warnings still show."""
    import logging

    from medflower.runenv import quiet_flower_env

    quiet_flower_env()
    import medflower.server.app  # noqa: F401  (Flower configures its logger on import; quiet it afterwards)

    logging.getLogger("flwr").setLevel(logging.WARNING)


def run_sweep(
    sweep: Sweep, out_dir: str | Path, *, jobs: int = 1, echo: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Run every run of ``sweep`` without a ``summary.json`` under ``out_dir``; write the tables."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    todo = [r for r in sweep.runs if not (out / r.name / "summary.json").is_file()]
    echo(f"sweep: {len(sweep.runs)} run(s), {len(sweep.runs) - len(todo)} already done, {len(todo)} to run in {out}/")
    walls: dict[str, float] = {}

    def finished(run: Run, wall: float, i: int) -> None:
        walls[run.name] = wall
        (out / run.name / "wall_seconds.txt").write_text(f"{wall:.3f}\n")
        echo(f"[{i}/{len(todo)}] {run.name}: done in {wall:.1f}s")
        write_tables(sweep, out)  # after each run: a killed sweep still leaves current tables

    if jobs <= 1:
        from medflower.simulation.progress import RunProgress  # here: the planner needs no Flower

        _quiet_worker()  # this process is the worker: progress lines, not every round's
        for i, run in enumerate(todo, 1):
            with RunProgress(label=f"[{i}/{len(todo)}] {run.name}", num_rounds=run.exp.train.rounds):
                wall = run_one(run.exp.to_json(), str(out / run.name))
            finished(run, wall, i)
    elif todo:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # torch and Flower threads do not survive fork
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_quiet_worker) as pool:
            futures = {pool.submit(run_one, r.exp.to_json(), str(out / r.name)): r for r in todo}
            for i, fut in enumerate(as_completed(futures), 1):
                finished(futures[fut], fut.result(), i)
    return write_tables(sweep, out)


# ------------------------------------------------------------------------------------------ tables
def t_quantile(p: float, df: int) -> float:
    """Student's t quantile: SciPy's ``t.ppf`` when installed (Opacus requires it), else exact closed forms for
    1 and 2 degrees of freedom (tan(π(p-½)); (2p-1)/√(2p(1-p))) and, from 3, the Cornish-Fisher
    expansion in 1/df of Abramowitz & Stegun 26.7.5 (0.12 % low at df = 3 for p = 0.975, less above)."""
    try:
        from scipy.stats import t  # type: ignore[import-untyped]  # no stubs installed
    except ImportError:
        return _t_quantile_formula(p, df)
    return float(t.ppf(p, df))


def _t_quantile_formula(p: float, df: int) -> float:
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = statistics.NormalDist().inv_cdf(p)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict[str, float | int | None]:
    """n, mean, sd (n-1) and the two-sided t confidence interval of the mean (None where undefined)."""
    v = [float(x) for x in values if math.isfinite(float(x))]
    n = len(v)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci_low": None, "ci_high": None}
    mean = statistics.fmean(v)
    if n == 1:
        return {"n": 1, "mean": mean, "sd": None, "ci_low": None, "ci_high": None}
    sd = statistics.stdev(v)
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half}


def run_record(run: Run, summary: dict[str, Any], varying: Sequence[str], wall: float | None) -> dict[str, Any]:
    """``runs.jsonl``'s line for one run."""
    rec: dict[str, Any] = {"run": run.name, "keys": {k: run.values.get(k) for k in varying}}
    for prefix, key in SUMMARY_PARTS.items():
        part = summary.get(key) or {}
        rec[prefix] = {k: v for k, v in part.items() if not isinstance(v, list)}  # scalars (no confusion matrix)
    rec["selected_round"] = summary.get("selected_round")
    rec["selected_threshold"] = summary.get("selected_threshold")
    rec["warnings"] = summary.get("warnings", [])
    rec["reproducible"] = summary.get("reproducible")
    rec["wall_seconds"] = wall if wall is not None else summary.get("wall_seconds")
    return rec


def _wall(run_dir: Path) -> float | None:
    path = run_dir / "wall_seconds.txt"
    return float(path.read_text()) if path.is_file() else None


def collect(sweep: Sweep, out: Path) -> list[dict[str, Any]]:
    """The records of the finished runs, in grid order."""
    recs = []
    for run in sweep.runs:
        path = out / run.name / "summary.json"
        if path.is_file():
            recs.append(run_record(run, json.loads(path.read_text()), sweep.varying, _wall(out / run.name)))
    return recs


def columns(sweep: Sweep) -> list[tuple[str, str]]:
    """(summary part, metric) pairs the tables show: final, selected and (binary) at-threshold."""
    cols = [(part, m) for part in ("final", "selected") for m in sweep.metrics]
    if sweep.runs and sweep.runs[0].exp.task == "classification":
        cols += [("at-threshold", m) for m in ("balanced-accuracy", "sensitivity", "specificity")]
    return cols


def cells(sweep: Sweep, recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per cell (varying keys other than ``seed``): each column's mean, sd and 95 % CI over seeds."""
    group_keys = [k for k in sweep.varying if k != "seed"]
    groups: dict[str, list[dict[str, Any]]] = {}
    for rec in recs:
        groups.setdefault(json.dumps([rec["keys"][k] for k in group_keys]), []).append(rec)
    rows = []
    for members in groups.values():
        row: dict[str, Any] = {k: members[0]["keys"][k] for k in group_keys}
        row["runs"] = len(members)
        for part, metric in columns(sweep):
            row[f"{part} {metric}"] = mean_ci([m[part].get(metric) for m in members if m[part].get(metric) is not None])
        row["wall_seconds"] = statistics.fmean(m["wall_seconds"] or 0.0 for m in members)
        rows.append(row)
    return rows


def _fmt(v: float | int | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def write_tables(sweep: Sweep, out: Path) -> list[dict[str, Any]]:
    """``runs.jsonl``, ``table.md`` and ``table.csv`` from the finished runs; returns the records."""
    recs = collect(sweep, out)
    atomic_write_text(out / "runs.jsonl", "".join(json.dumps(r) + "\n" for r in recs))
    rows = cells(sweep, recs)
    group_keys = [k for k in sweep.varying if k != "seed"]
    cols = [f"{p} {m}" for p, m in columns(sweep)]
    md = [
        f"Sweep {sweep.path.name}: {len(recs)} of {len(sweep.runs)} run(s) finished. Each cell: mean ± sd over seeds, "
        "[95 % CI of the mean, t distribution], global test metrics (final round, the round selected on "
        "validation, and at the threshold chosen on validation).",
        "",
        "| " + " | ".join([*group_keys, "runs", *cols, "wall (s)"]) + " |",
        "|" + "---|" * (len(group_keys) + len(cols) + 2),
    ]
    for row in rows:
        cells_md = []
        for c in cols:
            s = row[c]
            text = f"{_fmt(s['mean'])} ± {_fmt(s['sd'])}" if s["n"] else "-"
            if s["ci_low"] is not None:
                text += f" [{_fmt(s['ci_low'])}, {_fmt(s['ci_high'])}]"
            cells_md.append(text)
        md.append(
            "| "
            + " | ".join(
                [*(show(row[k]) for k in group_keys), str(row["runs"]), *cells_md, f"{row['wall_seconds']:.0f}"]
            )
            + " |"
        )
    atomic_write_text(out / "table.md", "\n".join(md) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf)
    stats = ("n", "mean", "sd", "ci_low", "ci_high")
    writer.writerow([*group_keys, "runs", *(f"{c} {s}" for c in cols for s in stats), "wall_seconds"])
    for row in rows:
        writer.writerow(
            [
                *(show(row[k]) for k in group_keys),
                row["runs"],
                *("" if row[c][s] is None else row[c][s] for c in cols for s in stats),
                f"{row['wall_seconds']:.3f}",
            ]
        )
    atomic_write_text(out / "table.csv", buf.getvalue())
    return recs


def sweep_to_yaml(base: dict[str, Any], grid: dict[str, list[Any]], **extra: Any) -> str:
    """A sweep file's text (for scripts that build one)."""
    return yaml.safe_dump({"base": base, "grid": grid, **extra}, sort_keys=False)
