"""``medflower site ...``: a hospital's own tools (its site YAML, its audit log, its privacy ledgers).

* ``site check SITE.yaml [--experiment EXP.yaml]``: read every file once and report problems;
* ``site audit STATE_DIR``: print the node's audit log and verify its hash chain (exit 0: intact);
* ``site ledger STATE_DIR [--reset --reason TEXT [--key PREFIX]]``: list the privacy ledgers kept in
  the state folder; ``--reset`` archives them (a deliberate, audited reset of epsilon to 0).
"""

from __future__ import annotations

import argparse
import sys


def _check(args: argparse.Namespace) -> int:
    from medflower.client.site import run_check  # here, not at the top: it imports torch (--help speed)

    return run_check(args.site, args.experiment)


def _audit(args: argparse.Namespace) -> int:
    from medflower.client.audit import run_audit  # here, not at the top: --help speed

    return run_audit(args.state_dir, out=sys.stdout, quiet=args.quiet)


def _ledger(args: argparse.Namespace) -> int:
    from medflower.client.state import list_ledgers, reset_ledger  # here: it imports torch and Opacus

    ledgers = list_ledgers(args.state_dir)
    if args.key:
        ledgers = [led for led in ledgers if led.data_key.startswith(args.key)]
    if not ledgers:
        print(f"no privacy ledger in {args.state_dir}" + (f" with data key {args.key}" if args.key else ""))
        return 1 if args.reset else 0
    for led in ledgers:
        eps = (
            f"epsilon {led.epsilon:.4f} at delta {led.delta:g}"
            if led.epsilon is not None
            else "epsilon: no delta recorded"
        )
        runs = ", ".join(str(r) for r in led.runs) or "-"
        print(
            f"{led.path.name}: site {led.site}, data key {led.data_key[:16]}, {led.mechanism}, {led.steps} steps "
            f"in {led.rounds} round(s), runs {runs}; {eps}"
        )
    if not args.reset:
        return 0
    if not args.reason:
        print("medflower: error: --reset needs --reason TEXT (it is recorded in the audit log)", file=sys.stderr)
        return 2
    for led in ledgers:
        archived = reset_ledger(args.state_dir, led, reason=args.reason)
        print(f"reset {led.path.name}: archived as {archived} (recorded in the audit log); its next round starts at 0")
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``site check``, ``site audit`` and ``site ledger``."""
    p = sub.add_parser("site", help="a hospital's own data (site YAML), audit log and privacy ledgers")
    site_sub = p.add_subparsers(dest="site_command", required=True)
    c = site_sub.add_parser("check", help="read every file once and report problems before joining")
    c.add_argument("site", help="the site YAML")
    c.add_argument("--experiment", "-e", help="experiment YAML whose data preparation to apply (optional)")
    c.set_defaults(func=_check)

    a = site_sub.add_parser("audit", help="print the node's audit log and verify its hash chain")
    a.add_argument("state_dir", metavar="STATE_DIR", help="the node's state folder (state-dir / state_dir)")
    a.add_argument("--quiet", "-q", action="store_true", help="only the verdict, not the table")
    a.set_defaults(func=_audit)

    g = site_sub.add_parser("ledger", help="list the privacy ledgers in the state folder, or reset them")
    g.add_argument("state_dir", metavar="STATE_DIR", help="the node's state folder (state-dir / state_dir)")
    g.add_argument("--reset", action="store_true", help="archive the ledger(s): epsilon starts again at 0 (audited)")
    g.add_argument("--key", help="only the ledger whose data key starts with this (as listed)")
    g.add_argument("--reason", help="why the ledger is reset (required with --reset; kept in the audit log)")
    g.set_defaults(func=_ledger)
