"""``medflower site check SITE.yaml [--experiment EXP.yaml]``: a hospital's own data."""

from __future__ import annotations

import argparse


def _check(args: argparse.Namespace) -> int:
    from medflower.client.site import run_check  # here, not at the top: it imports torch (--help speed)

    return run_check(args.site, args.experiment)


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``site check``."""
    p = sub.add_parser("site", help="a hospital's own data (site YAML)")
    site_sub = p.add_subparsers(dest="site_command", required=True)
    c = site_sub.add_parser("check", help="read every file once and report problems before joining")
    c.add_argument("site", help="the site YAML")
    c.add_argument("--experiment", "-e", help="experiment YAML whose data preparation to apply (optional)")
    c.set_defaults(func=_check)
