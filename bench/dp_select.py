"""Pick a DP-SGD recipe from a ``medflower sweep`` folder on federated VALIDATION only.

    python bench/dp_select.py SWEEP_OUT_DIR [--keys train.optimizer train.lr ...]

For every run it reads ``summary.json`` and computes, from validation data only:

* ``val AUC (hist)``: the AUC of the pooled validation score histograms the sites sent in the last
  round (``final_val_score_histograms``: fixed bins per class, see medflower/threshold.py; ties inside
  a bin count one half), i.e. the federated validation AUC without any site revealing a score;
* ``val J``: Youden's J at the threshold the coordinator selected on those histograms;
* ``loss first -> last``: the aggregated training loss of the first and last round (does it learn?).

Cells (the varying keys other than ``seed``) are ranked by mean validation AUC; the test metrics are
printed beside them for the record but never used to rank. Histogram AUC is written here because the
sites send histograms, not scores (no library computes an AUC from binned counts with tie halves).
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
from pathlib import Path
from typing import Any


def hist_auc(neg: list[int], pos: list[int]) -> float | None:
    """AUC from per-class counts in the same ordered bins (a pair within one bin counts 1/2)."""
    n_neg, n_pos = sum(neg), sum(pos)
    if not n_neg or not n_pos:
        return None
    below, wins = 0, 0.0
    for c_neg, c_pos in zip(neg, pos, strict=True):
        wins += c_pos * (below + 0.5 * c_neg)
        below += c_neg
    return wins / (n_neg * n_pos)


def _train_loss(rnd: dict[str, Any]) -> float | None:
    train = rnd["train"]
    train = ast.literal_eval(train) if isinstance(train, str) else train
    return float(train["train-loss"]) if "train-loss" in train else None  # no site trained that round


def run_row(summary: dict[str, Any]) -> dict[str, float | None]:
    hist = summary.get("final_val_score_histograms") or {}
    auc = hist_auc(hist.get("score-hist-0", []), hist.get("score-hist-1", [])) if hist else None
    rounds = summary["rounds"]
    test = summary.get("final_global_test_at_threshold") or {}
    return {
        "val_auc": auc,
        "val_j": summary.get("selected_threshold_youden_j"),
        "loss_first": _train_loss(rounds[0]),
        "loss_last": _train_loss(rounds[-1]),
        "test_auc": summary["final_global_test"].get("auc"),
        "test_bacc_at_thr": test.get("balanced-accuracy"),
    }


def _mean(xs: list[float | None]) -> str:
    vals = [x for x in xs if x is not None]
    if not vals:
        return "–"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.fmean(vals):.3f} ± {sd:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the sweep's -o folder (with runs.jsonl)")
    args = ap.parse_args()
    cells: dict[str, list[dict[str, float | None]]] = {}
    for line in (args.out / "runs.jsonl").read_text(encoding="utf-8").splitlines():
        run = json.loads(line)
        keys = {k: v for k, v in run.get("values", run.get("keys", {})).items() if k != "seed"}
        name = run.get("name") or run.get("run")
        summary = json.loads((args.out / str(name) / "summary.json").read_text(encoding="utf-8"))
        cells.setdefault(json.dumps(keys, sort_keys=True), []).append(run_row(summary))
    ranked = sorted(
        cells.items(),
        key=lambda kv: -statistics.fmean([r["val_auc"] or 0.5 for r in kv[1]]),
    )
    print("| recipe | runs | val AUC (hist) | val J | train loss first → last | test AUC | test bal. acc. @thr |")
    print("|---|---|---|---|---|---|---|")
    for key, rows in ranked:
        recipe = ", ".join(f"{k}={v}" for k, v in json.loads(key).items() if v is not None) or "(base)"
        loss = f"{_mean([r['loss_first'] for r in rows])} → {_mean([r['loss_last'] for r in rows])}"
        print(
            f"| {recipe} | {len(rows)} | {_mean([r['val_auc'] for r in rows])} | {_mean([r['val_j'] for r in rows])} "
            f"| {loss} | {_mean([r['test_auc'] for r in rows])} | {_mean([r['test_bacc_at_thr'] for r in rows])} |"
        )


if __name__ == "__main__":
    main()
