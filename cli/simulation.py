"""The simulator's subcommands: ``medflower simulate``, ``partition``, ``compare``, ``sweep`` and ``prior``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medflower.runenv import default_output_dir
from medflower.simulation.report import print_summary


def _out_dir(args: argparse.Namespace, name: str, *what: str) -> Path:
    return Path(args.output) if args.output else default_output_dir(name, *what)


def _simulate(args: argparse.Namespace) -> int:
    # here, not at the top: the config validates strategies against the method registry, which loads
    # Flower and torch; so do the runner, preview and compare (--help speed)
    from medflower.config import load_experiment, quickstart_experiment
    from medflower.simulation.runner import simulate

    exp = load_experiment(args.experiment) if args.experiment else quickstart_experiment()
    out = _out_dir(args, exp.name)
    engine = args.engine or ("ray" if args.ray_address else exp.simulation.engine)
    print(
        f"medflower: simulating {exp.name!r}: {exp.partition.num_sites} sites, {exp.train.rounds} rounds, "
        f"model {exp.model.name}, strategy {exp.strategy.name}, engine {engine}; results in {out}/",
        flush=True,
    )
    from medflower.report import write_report
    from medflower.simulation.progress import RunProgress

    with RunProgress(label=exp.name, num_rounds=exp.train.rounds):
        summary = simulate(exp, out, verbose=args.verbose, engine=engine, ray_address=args.ray_address)
    print_summary(summary)
    print(f"\nsummary: {out / 'summary.json'}\nreport: {write_report(out)}")
    return 0


def _partition(args: argparse.Namespace) -> int:
    from medflower.config import load_experiment  # here: see _simulate
    from medflower.simulation.preview import preview

    exp = load_experiment(args.experiment)
    preview(
        exp, _out_dir(args, exp.name, "partition"), identifiability=not args.no_identifiability, plots=not args.no_plots
    )
    return 0


def _compare(args: argparse.Namespace) -> int:
    from medflower.config import load_experiment  # here: see _simulate
    from medflower.report import write_report
    from medflower.simulation.compare import run_compare
    from medflower.simulation.progress import RunProgress

    exp = load_experiment(args.experiment)
    out = _out_dir(args, exp.name, "compare")
    with RunProgress(label=f"{exp.name} federated", num_rounds=exp.train.rounds):
        run_compare(
            exp, out, verbose=args.verbose, federated=not args.no_federated, identifiability=not args.no_identifiability
        )
    print(f"report: {write_report(out)}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from medflower.simulation.sweep import load_sweep, run_sweep  # here: see _simulate

    sweep = load_sweep(args.sweep, allow_many=args.yes)  # every combination validated before any run
    out = Path(args.output) if args.output else default_output_dir(Path(args.sweep).stem, "sweep")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    recs = run_sweep(sweep, out, jobs=args.jobs)
    print((out / "table.md").read_text())
    print(f"{len(recs)} run(s): {out / 'runs.jsonl'}, {out / 'table.md'}, {out / 'table.csv'}")
    from medflower.report import write_report

    print(f"report: {write_report(out)}")
    return 0


def _prior(args: argparse.Namespace) -> int:
    import time

    import torch

    from medflower.config import load_experiment  # here: see _simulate
    from medflower.modelspec import build_experiment_model
    from medflower.prior import pretrain_prior, print_progress, trunk_prefixes

    exp = load_experiment(args.experiment)
    out = Path(args.output)
    init = None
    if args.init is not None:
        try:
            init = torch.load(args.init, map_location="cpu", weights_only=True)
        except Exception as err:  # a corrupt or non-torch file: torch raises several kinds
            print(f"medflower prior: --init {args.init}: cannot read it as a torch state dict: {err}", file=sys.stderr)
            return 2
        if not isinstance(init, dict):
            print(f"medflower prior: --init {args.init}: holds no state dict", file=sys.stderr)
            return 2
    print(
        f"medflower: pretraining the trunk of model {exp.model.name!r} on synthetic dead-leaves images "
        f"({args.steps} steps of {args.batch_size}) in the intensities data.kind {exp.data.kind!r} gives real "
        "images; no image is read, the data set gives only the image size and channels",
        flush=True,
    )
    state = pretrain_prior(
        exp,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        textured=args.textured,
        init=init,
        whiten_samples=args.whiten_samples,
        whiten_shrinkage=args.whiten_shrinkage,
        progress=print_progress(time.time()),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    trunk = trunk_prefixes(build_experiment_model(exp))
    if exp.model.whiten_features:
        print(f"the head's whitening (model.whiten_features) is fitted on {args.whiten_samples} synthetic images")
    print(
        f"wrote {out}. In the experiment: model.init: <this file> (absolute, or relative to the YAML); "
        f"to train only the head under DP-SGD (linear probing), also model.freeze: {trunk}"
    )
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``simulate``, ``partition`` and ``compare``."""
    p = sub.add_parser("simulate", help="simulate a federation of hospitals on this machine")
    p.add_argument("experiment", nargs="?", help="experiment YAML (default: the embedded quick start)")
    p.add_argument("--output", "-o", help="output folder (default: runs/<name>-<time>)")
    p.add_argument("--verbose", action="store_true", help="show the clients' logs")
    p.add_argument(
        "--engine", choices=("local", "ray"), help="override simulation.engine (local: in this process; ray: Flower's)"
    )
    p.add_argument(
        "--ray-address",
        help="join this Ray cluster (e.g. 10.0.0.5:6379; implies --engine ray; default: RAY_ADDRESS if set, "
        "else a new Ray on this machine)",
    )
    p.set_defaults(func=_simulate)

    p = sub.add_parser(
        "partition",
        help="preview the simulated hospitals of an experiment (no training)",
        description="Build the experiment's sites (partition and scanner shift), print their sizes, "
        "label mix, intensity statistics and site identifiability, and write PNG plots.",
    )
    p.add_argument("experiment", help="experiment YAML")
    p.add_argument("--output", "-o", help="output folder (default: runs/<name>-partition-<time>)")
    p.add_argument(
        "--no-identifiability",
        action="store_true",
        help="skip the site-identifiability classifier (a few seconds of CPU)",
    )
    p.add_argument("--no-plots", action="store_true", help="tables and partition.json only")
    p.set_defaults(func=_partition)

    p = sub.add_parser(
        "compare",
        help="pooled vs local-only vs federated training, every model on every site",
        description="Train a pooled (centralised) model, one local-only model per site and the "
        "federated model (Flower simulation) with the same epoch budget, evaluate each on "
        "every site's test split and on the pooled test set, and write compare.json, "
        "compare.md and compare.png.",
    )
    p.add_argument("experiment", help="experiment YAML")
    p.add_argument("--output", "-o", help="output folder (default: runs/<name>-compare-<time>)")
    p.add_argument("--verbose", action="store_true", help="show the federated clients' logs")
    p.add_argument("--no-federated", action="store_true", help="baselines only (no Flower simulation)")
    p.add_argument("--no-identifiability", action="store_true", help="skip the site-identifiability classifier")
    p.set_defaults(func=_compare)

    p = sub.add_parser(
        "sweep",
        help="a grid of experiments (seeds, strategies, ...) with mean, sd and 95% CI tables",
        description="Run every combination of a sweep file's grid (base experiment + dotted keys), "
        "validated before any run, on the in-process engine; resumable (a run with a summary.json is "
        "never redone: rerun with the same -o to continue). Writes runs.jsonl, table.md and table.csv.",
    )
    p.add_argument("sweep", help="sweep YAML: base (experiment YAML or mapping) and grid (dotted key: [values])")
    p.add_argument("--output", "-o", help="output folder (default: runs/<sweep>-sweep-<time>); reuse it to resume")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel, one process each (default 1)")
    p.add_argument("--yes", action="store_true", help="allow grids of more than 1,000 runs")
    p.set_defaults(func=_sweep)

    p = sub.add_parser(
        "prior",
        help="pretrain a classifier's trunk on synthetic images: a data-free start for DP-SGD (model.init)",
        description="Build the experiment's network and pretrain everything but its last linear layer by "
        "contrastive learning on synthetic dead-leaves images (no data, no privacy cost; Tang et al. 2023). "
        "Use the file as model.init, and model.freeze to train only the head (docs/privacy.md).",
    )
    p.add_argument("experiment", help="experiment YAML (its model, and its data for the image size and channels)")
    p.add_argument("--output", "-o", required=True, help="state-dict file to write")
    p.add_argument("--steps", type=int, default=1500, help="Adam steps (default 1500: ~5 min of 2 CPU cores, 2D cnn)")
    p.add_argument("--batch-size", type=int, default=256, help="synthetic images per step (default 256)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="initial weights and images (default 0)")
    p.add_argument("--textured", action="store_true", help="dead leaves with oriented gratings")
    p.add_argument(
        "--init",
        help="start from this earlier prior's trunk (same network; its head is not used); with --steps 0 only adds "
        "what the experiment asks for now, e.g. model.whiten_features",
    )
    p.add_argument(
        "--whiten-samples",
        type=int,
        default=2048,
        help="synthetic images the whitening of model.whiten_features is fitted on (default 2048)",
    )
    p.add_argument(
        "--whiten-shrinkage",
        type=float,
        default=0.1,
        help="added to the whitening's eigenvalues, as a fraction of their mean (default 0.1; 0: full whitening)",
    )
    p.set_defaults(func=_prior)
