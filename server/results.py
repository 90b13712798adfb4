"""``summary.json``: what a run produced, in one file a researcher can load and compare."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from medflower.config import ExperimentConfig
from medflower.fileio import atomic_write_text
from medflower.keys import EVAL_LOSS
from medflower.server.loop import History


def _clean(obj: Any) -> Any:
    """JSON has no NaN: write undefined metrics (e.g. AUC on a one-class split) as null."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


SELECTION = {"classification": ("val-auc", max), "segmentation": ("val-dice", max)}


def select_round(hist: History, task: str = "classification") -> int | None:
    """The round whose global model the sites' own validation liked best.

    Model selection on federated validation, never on the test split (NVFlare's
    ``IntimeModelSelector`` does the same): the aggregated validation AUC (classification) or Dice
    (segmentation), falling back to the lowest validation loss. Its round's test metrics are
    reported beside the final round's, because one last round fluctuates with the sites' last
    local steps.
    """
    key, best = SELECTION.get(task, (EVAL_LOSS, min))
    for k, pick in ((key, best), (EVAL_LOSS, min)):
        scored = [
            (r.evaluate[k], r.round)
            for r in hist.rounds
            if k in r.evaluate and math.isfinite(r.evaluate[k]) and r.global_test
        ]
        if scored:
            value = pick(v for v, _ in scored)
            return next(rnd for v, rnd in scored if v == value)  # the earliest round with the best value
    return None


def summary_dict(exp: ExperimentConfig, hist: History, *, wall_seconds: float) -> dict[str, Any]:
    rounds = [asdict(r) for r in hist.rounds]
    final = hist.rounds[-1].global_test if hist.rounds else {}
    best = select_round(hist, exp.task)
    return _clean(
        {
            "selected_round": best,
            "selected_global_test": next((r.global_test for r in hist.rounds if r.round == best), {}),
            "experiment": exp.to_dict(),
            "initial_global_test": hist.initial_global_test,
            "rounds": rounds,
            "final_global_test": final,
            "global_test_note": hist.global_test_note,
            "sites_test": hist.sites_test,
            "sites_test_refusals": hist.test_refusals,
            "wall_seconds": wall_seconds,
        }
    )


def write_summary(out_dir: Path, exp: ExperimentConfig, hist: History, *, wall_seconds: float) -> Path:
    path = Path(out_dir) / "summary.json"
    atomic_write_text(path, json.dumps(summary_dict(exp, hist, wall_seconds=wall_seconds), indent=2))
    return path
