"""summary.json: model selection uses the sites' validation loss, never the test split."""

from __future__ import annotations

import json
import math

from medflower.config import quickstart_experiment
from medflower.server.loop import History, RoundRecord
from medflower.server.results import select_round, summary_dict, write_summary


def _hist() -> History:
    return History(
        rounds=[
            RoundRecord(round=1, evaluate={"eval-loss": 0.50}, global_test={"auc": 0.70, "loss": 0.1}),
            RoundRecord(round=2, evaluate={"eval-loss": 0.30}, global_test={"auc": 0.80, "loss": 0.9}),
            RoundRecord(round=3, evaluate={"eval-loss": math.nan}, global_test={"auc": 0.99, "loss": 0.0}),
            RoundRecord(round=4, evaluate={"eval-loss": 0.40}, global_test={"auc": math.nan}),
        ]
    )


def test_selects_lowest_validation_loss_not_best_test() -> None:
    assert select_round(_hist()) == 2  # no val-auc reported: falls back to the validation loss


def test_selects_best_validation_auc_for_classification() -> None:
    hist = _hist()
    hist.rounds[0].evaluate["val-auc"] = 0.9
    hist.rounds[1].evaluate["val-auc"] = 0.6
    assert select_round(hist, "classification") == 1
    hist.rounds[3].evaluate["val-dice"] = 0.7
    assert select_round(hist, "segmentation") == 4


def test_no_validation_no_selection() -> None:
    assert select_round(History(rounds=[RoundRecord(round=1, global_test={"auc": 0.5})])) is None


def test_summary_is_strict_json(tmp_path) -> None:
    path = write_summary(tmp_path, quickstart_experiment(), _hist(), wall_seconds=1.5)
    text = path.read_text()
    assert "NaN" not in text
    s = json.loads(text)
    assert s["selected_round"] == 2 and s["selected_global_test"]["auc"] == 0.80
    assert s["final_global_test"] == {"auc": None}
    assert s == summary_dict(quickstart_experiment(), _hist(), wall_seconds=1.5)
