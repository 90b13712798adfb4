"""Readable tables of a run's summary (terminal)."""

from __future__ import annotations

from typing import Any

MAIN = ("accuracy", "balanced-accuracy", "auc", "dice", "hd95", "loss")


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def print_summary(summary: dict[str, Any]) -> None:
    rounds = summary.get("rounds", [])
    names = [m for m in MAIN if any(m in (r.get("global_test") or {}) for r in rounds)]
    print("\nround  sites  train-loss  " + "  ".join(f"{'test-' + n:>14}" for n in names) + "   seconds")
    for r in rounds:
        ok = len(r.get("sites_train", {}))
        print(
            f"{r['round']:>5}  {ok:>5}  {_f(r.get('train', {}).get('train-loss')):>10}  "
            + "  ".join(f"{_f(r.get('global_test', {}).get(n)):>14}" for n in names)
            + f"   {r.get('seconds', 0):7.1f}"
        )
    sites = summary.get("sites_test", {})
    if sites:
        cols = [m for m in MAIN if any(f"test-{m}" in v for v in sites.values())]
        print("\nsite          n  " + "  ".join(f"{n:>17}" for n in cols))
        for name, m in sorted(sites.items()):
            print(
                f"{name:<10} {int(m.get('num-examples', 0)):>4}  "
                + "  ".join(f"{_f(m.get('test-' + n)):>17}" for n in cols)
            )
    print_privacy(summary)
    print_threshold(summary)
    print(f"\nwall time: {summary.get('wall_seconds', 0):.1f}s")
    for w in summary.get("warnings") or []:
        print(f"WARNING: {w}")


def print_privacy(summary: dict[str, Any]) -> None:
    """The privacy ledgers: each site's epsilon spent (mode sample) or the federation's (mode client)."""
    rounds = summary.get("rounds", [])
    last: dict[str, dict[str, Any]] = {}
    refused: dict[str, int] = {}
    for r in rounds:
        for site, m in (r.get("sites_train") or {}).items():
            if m.get("dp-epsilon") is not None:
                last[site] = m
                refused[site] = refused.get(site, 0) + int(m.get("dp-budget-exhausted") or 0)
    if last:
        print("\nprivacy ledger  epsilon spent  budget   delta   steps  rounds refused")
        for site, m in sorted(last.items()):
            print(
                f"{site:<14}  {_f(m.get('dp-epsilon')):>13}  {_f(m.get('dp-target-epsilon')):>6}  "
                f"{m.get('dp-delta', 0):6.0e}  {int(m.get('dp-steps') or 0):>6}  {refused[site]:>14}"
            )
        return
    eps = [
        (r["round"], r["train"]["dp-epsilon"]) for r in rounds if (r.get("train") or {}).get("dp-epsilon") is not None
    ]
    if eps:
        print(
            f"\nclient-level DP: epsilon {_f(eps[-1][1])} spent after round {eps[-1][0]} "
            f"(delta {rounds[-1]['train'].get('dp-delta', 0):.0e})"
        )


def print_threshold(summary: dict[str, Any]) -> None:
    """Binary tasks: the threshold chosen on the sites' validation splits and the test metrics at it."""
    at = summary.get("final_global_test_at_threshold")
    if summary.get("selected_threshold") is None or not at:
        return
    print(
        f"\nthreshold {summary['selected_threshold']:.2f} (Youden's J on the sites' validation): test "
        + "  ".join(f"{n} {_f(at.get(n))}" for n in ("accuracy", "balanced-accuracy", "sensitivity", "specificity"))
    )
