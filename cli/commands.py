"""``medflower``: its parser and ``main`` (the console script reaches them through :mod:`medflower.cli`).

Subcommands live in :mod:`medflower.cli.simulation`, :mod:`medflower.cli.site` and
:mod:`medflower.cli.deploy`; each imports its heavy implementation inside its handler, so that
``medflower --help`` imports no torch, MONAI, Ray or Flower.
"""

from __future__ import annotations

import argparse
import sys

from medflower.cli import deploy, review, simulation, site
from medflower.schema import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medflower", description="Federated learning for medical imaging.")
    sub = parser.add_subparsers(dest="command", required=True)
    simulation.add_parsers(sub)  # `simulate`, `partition`, `compare`
    deploy.add_parsers(sub)  # `deploy ...`, `node check`
    site.add_parsers(sub)  # `site check`
    review.add_parsers(sub)  # `report`, `explain`
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
