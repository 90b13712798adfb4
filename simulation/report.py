"""Readable tables of a run's summary (terminal)."""

from __future__ import annotations

from typing import Any

MAIN = ("accuracy", "balanced-accuracy", "auc", "dice", "loss")


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def print_summary(summary: dict[str, Any]) -> None:
    rounds = summary.get("rounds", [])
    names = [m for m in MAIN if any(m in (r.get("global_test") or {}) for r in rounds)]
    print("\nround  sites  train-loss  " + "  ".join(f"{'test-' + n:>14}" for n in names) + "   seconds")
    for r in rounds:
        ok = len(r.get("sites_train", {}))
        print(f"{r['round']:>5}  {ok:>5}  {_f(r.get('train', {}).get('train-loss')):>10}  "
              + "  ".join(f"{_f(r.get('global_test', {}).get(n)):>14}" for n in names)
              + f"   {r.get('seconds', 0):7.1f}")
    sites = summary.get("sites_test", {})
    if sites:
        cols = [m for m in MAIN if any(f"test-{m}" in v for v in sites.values())]
        print("\nsite          n  " + "  ".join(f"{n:>17}" for n in cols))
        for name, m in sorted(sites.items()):
            print(f"{name:<10} {int(m.get('num-examples', 0)):>4}  " + "  ".join(f"{_f(m.get('test-' + n)):>17}" for n in cols))
    print(f"\nwall time: {summary.get('wall_seconds', 0):.1f}s")
