"""``summary.json``: what a run produced, in one file a researcher can load and compare."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.common.logger import log

from medflower.config import ExperimentConfig
from medflower.fileio import atomic_write_text
from medflower.keys import EVAL_LOSS, SCORE_HIST
from medflower.seeding import reproducibility
from medflower.server.loop import History
from medflower.threshold import collapse_warnings, metrics_at_threshold, youden_threshold


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


def _without_histograms(metrics: dict[str, Any]) -> dict[str, Any]:
    """A global-test dict without its score histograms: they are the threshold's input, not a result."""
    return {k: v for k, v in metrics.items() if not k.startswith(SCORE_HIST)}


def threshold_results(exp: ExperimentConfig, hist: History) -> dict[str, Any]:
    """Binary classification: the operating threshold chosen on the sites' validation splits (the final
    round's summed score histograms, Youden's J) and the final global test scored at it.

    The test split never chooses the threshold; its histograms only score the chosen one. Both keys
    are None when the task is not binary, or when the validation splits lack a class.
    """
    out: dict[str, Any] = {"selected_threshold": None, "final_global_test_at_threshold": None}
    if exp.task != "classification" or not hist.rounds:
        return out
    last = hist.rounds[-1]
    val, test = last.val_score_histograms, last.global_test
    neg, pos = f"{SCORE_HIST}0", f"{SCORE_HIST}1"
    if neg not in val or pos not in val:
        return out
    chosen = youden_threshold(val[neg], val[pos])
    if chosen is None:
        return out
    out["selected_threshold"], out["selected_threshold_youden_j"] = chosen
    if isinstance(test.get(neg), list) and isinstance(test.get(pos), list):
        out["final_global_test_at_threshold"] = metrics_at_threshold(test[neg], test[pos], chosen[0])
    return out


def run_warnings(exp: ExperimentConfig, hist: History) -> list[str]:
    """What a researcher must not miss: the final global model collapsing onto one class."""
    final = hist.rounds[-1].global_test if hist.rounds else {}
    confusion = final.get("confusion-matrix")
    if exp.task != "classification" or not isinstance(confusion, list):
        return []
    return collapse_warnings(confusion, class_names=exp.data.classes or (), what="the final global model")


def summary_dict(exp: ExperimentConfig, hist: History, *, wall_seconds: float) -> dict[str, Any]:
    rounds = [asdict(r) for r in hist.rounds]
    for r in rounds:  # histograms are the threshold's inputs, not results: the final round's are kept, once
        r["global_test"] = _without_histograms(r["global_test"])
        del r["val_score_histograms"]
    final = _without_histograms(hist.rounds[-1].global_test) if hist.rounds else {}
    best = select_round(hist, exp.task)
    return _clean(
        {
            "selected_round": best,
            "selected_global_test": next((r["global_test"] for r in rounds if r["round"] == best), {}),
            **threshold_results(exp, hist),
            "final_val_score_histograms": hist.rounds[-1].val_score_histograms if hist.rounds else {},
            "warnings": run_warnings(exp, hist),
            "experiment": exp.to_dict(),
            "initial_global_test": _without_histograms(hist.initial_global_test),
            "rounds": rounds,
            "final_global_test": final,
            # rows: true class, columns: predicted (also final_global_test["confusion-matrix"])
            "final_global_test_confusion": final.get("confusion-matrix"),
            "global_test_note": hist.global_test_note,
            **({"feature_stats": hist.feature_stats} if hist.feature_stats else {}),
            "sites_test": hist.sites_test,
            "sites_test_refusals": hist.test_refusals,
            "wall_seconds": wall_seconds,
            **reproducibility(exp),  # `reproducible` and, when false, why (medflower.seeding)
        }
    )


def write_summary(out_dir: Path, exp: ExperimentConfig, hist: History, *, wall_seconds: float) -> Path:
    path = Path(out_dir) / "summary.json"
    summary = summary_dict(exp, hist, wall_seconds=wall_seconds)
    atomic_write_text(path, json.dumps(summary, indent=2))
    for w in summary["warnings"]:  # at the end of every run, whichever engine (the CLI prints them again)
        log(WARNING, "%s", w)
    return path
