"""The ``medflower`` command. Each subcommand imports its implementation lazily (fast ``--help``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from medflower.schema import ConfigError


def _simulate(args: argparse.Namespace) -> int:
    from medflower.config import load_experiment, quickstart_experiment
    from medflower.simulation.report import print_summary
    from medflower.simulation.runner import simulate

    exp = load_experiment(args.experiment) if args.experiment else quickstart_experiment()
    out = Path(args.output) if args.output else Path("runs") / f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(
        f"medflower: simulating {exp.name!r}: {exp.partition.num_sites} sites, {exp.train.rounds} rounds, "
        f"model {exp.model.name}, strategy {exp.strategy.name}; results in {out}/",
        flush=True,
    )
    summary = simulate(exp, out, verbose=args.verbose)
    print_summary(summary)
    print(f"\nsummary: {out / 'summary.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medflower", description="Federated learning for medical imaging.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("simulate", help="simulate a federation of hospitals on this machine")
    p.add_argument("experiment", nargs="?", help="experiment YAML (default: the embedded quick start)")
    p.add_argument("--output", "-o", help="output folder (default: runs/<name>-<time>)")
    p.add_argument("--verbose", action="store_true", help="show the clients' logs")
    p.set_defaults(func=_simulate)
    from medflower.deploy.cli import add_parsers as add_deploy_parsers  # `deploy ...`, `node check`

    add_deploy_parsers(sub)
    from medflower.simulation.commands import add_parsers as add_shift_parsers  # `partition`, `compare`

    add_shift_parsers(sub)
    from medflower.client.site import add_parsers as add_site_parsers  # `site check`

    add_site_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"medflower: config error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"medflower: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
