"""The domain-shift simulator's subcommands: ``medflower partition`` and ``medflower compare``.

Registered by :func:`medflower.cli.build_parser`; the implementations are imported lazily so that
``medflower --help`` stays fast.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def _out_dir(args: argparse.Namespace, name: str, what: str) -> Path:
    return Path(args.output) if args.output else Path("runs") / f"{name}-{what}-{time.strftime('%Y%m%d-%H%M%S')}"


def _partition(args: argparse.Namespace) -> int:
    from medflower.config import load_experiment
    from medflower.simulation.preview import preview

    exp = load_experiment(args.experiment)
    preview(
        exp, _out_dir(args, exp.name, "partition"), identifiability=not args.no_identifiability, plots=not args.no_plots
    )
    return 0


def _compare(args: argparse.Namespace) -> int:
    from medflower.config import load_experiment
    from medflower.simulation.compare import run_compare

    exp = load_experiment(args.experiment)
    out = _out_dir(args, exp.name, "compare")
    run_compare(
        exp, out, verbose=args.verbose, federated=not args.no_federated, identifiability=not args.no_identifiability
    )
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
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
