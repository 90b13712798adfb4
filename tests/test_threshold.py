"""The federated operating threshold (Youden's J from score histograms) and the collapse warning.

Every expected number below is computed by hand in the comments.
"""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict

from medflower import keys
from medflower.config import quickstart_experiment
from medflower.server.loop import History, RoundRecord, summed_histograms
from medflower.server.results import summary_dict
from medflower.server.screens import FiniteMetrics, RoundView
from medflower.threshold import (
    BINS,
    LOGIT_RANGE,
    bin_edges,
    collapse_warnings,
    confusion_matrix,
    metrics_at_threshold,
    score_histograms,
    youden_threshold,
)

# 4 bins: log-odds edges -8, -4, 0, 4, 8, i.e. probability edges 0, sigmoid(-4), .5, sigmoid(4), 1
# (the outer edges are 0 and 1: the outer bins hold everything beyond); negatives' and positives' counts per bin
NEG, POS = [1, 3, 1, 0], [0, 1, 0, 3]
E = bin_edges(4)


def test_bin_edges_are_even_in_log_odds() -> None:
    assert LOGIT_RANGE == 8.0 and BINS == 160
    assert E[0] == 0.0 and E[2] == 0.5 and E[4] == 1.0
    assert E[1] == pytest.approx(1 / (1 + math.exp(4))) and E[3] == pytest.approx(1 / (1 + math.exp(-4)))
    edges = bin_edges()
    assert len(edges) == BINS + 1 and edges[80] == 0.5  # 0.1 log-odds per bin: edge 80 is z = 0
    assert edges[110] == pytest.approx(1 / (1 + math.exp(-3.0)))  # z = -8 + 110 * 0.1 = 3: p 0.9526


def test_youden_picks_the_edge_with_the_largest_j() -> None:
    # edge 1: sens 4/4, spec 1/5 -> J .20;  edge 2: sens 3/4, spec 4/5 -> J .55
    # edge 3: sens 3/4, spec 5/5 -> J .75 (the largest)
    threshold, j = youden_threshold(NEG, POS)  # type: ignore[misc]
    assert threshold == E[3] and j == pytest.approx(0.75)


def test_youden_ties_go_to_the_edge_closest_to_one_half() -> None:
    # edge 1: sens 4/4 spec 3/4 -> .75;  edge 2: sens 3/4 spec 4/4 -> .75;  edge 3: sens 2/4 -> .5
    assert youden_threshold([3, 1, 0, 0], [0, 1, 1, 2]) == (0.5, pytest.approx(0.75))


def test_youden_is_undefined_without_both_classes() -> None:
    assert youden_threshold([2, 1, 0, 0], [0, 0, 0, 0]) is None
    with pytest.raises(ValueError, match="equal-length"):
        youden_threshold([1, 2], [1, 2, 3])


def test_metrics_at_threshold_from_counts() -> None:
    # at edge 3: TP 3, FN 1, TN 5, FP 0 -> accuracy 8/9, sensitivity .75, specificity 1, balanced .875
    m = metrics_at_threshold(NEG, POS, float(E[3]))
    assert m["accuracy"] == pytest.approx(8 / 9)
    assert (m["sensitivity"], m["specificity"], m["balanced-accuracy"]) == (0.75, 1.0, 0.875)
    with pytest.raises(ValueError, match="not an edge"):
        metrics_at_threshold(NEG, POS, 0.3)


def test_score_histograms_bin_the_log_odds() -> None:
    # log-odds z = logit_1 - logit_0; bin = floor((z + 8) / 0.1), clipped to 0..159:
    # -0.8 -> 72;  2.31 -> 103;  3.0 -> 110;  3.09 -> 110;  20 (p ~ 1) -> 159 (the last);  -6.85 -> 11;  -30 -> 0
    z = torch.tensor([-0.8, -0.8, 2.31, 3.0, 3.09, 20.0, -6.85, -30.0], dtype=torch.float64)
    logits = torch.stack([torch.zeros(8, dtype=torch.float64), z], dim=1)
    h = score_histograms(logits, torch.tensor([0, 1, 1, 1, 1, 1, 0, 0]))
    assert len(h["score-hist-0"]) == len(h["score-hist-1"]) == BINS
    assert {i: c for i, c in enumerate(h["score-hist-0"]) if c} == {72: 1, 11: 1, 0: 1}
    assert {i: c for i, c in enumerate(h["score-hist-1"]) if c} == {72: 1, 103: 1, 110: 2, 159: 1}
    # p 0.9526 and 0.9565 (z 3.0, 3.09) share a bin; p 0.91 (z 2.31) does not: 0.02-wide bins of p held all three


def test_confusion_matrix_and_collapse_warning() -> None:
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    assert confusion_matrix(logits, torch.tensor([0, 1, 1])) == [[1, 0], [1, 1]]
    # predicted counts 96 vs 4 of 100: 96 % > 95 % -> flagged, naming the class and the share
    (w,) = collapse_warnings([[40, 1], [56, 3]], class_names=("benign", "malignant"))
    assert "'benign'" in w and "96.0%" in w
    assert collapse_warnings([[40, 2], [55, 3]]) == []  # exactly 95 %: not more than 95 %


def _hist_round(rnd: int, test_hist: dict, val_hist: dict, confusion: list) -> RoundRecord:
    gt = {"accuracy": 0.6, "auc": 0.9, "confusion-matrix": confusion, **test_hist}
    return RoundRecord(round=rnd, global_test=gt, evaluate={"val-auc": 0.9}, val_score_histograms=val_hist)


def test_summary_reports_threshold_and_one_class_collapse() -> None:
    """A synthetic final round whose model calls every test image class 1: the summary says so, and
    scores the test split at the threshold the validation histograms chose (never the test's own)."""
    exp = quickstart_experiment()
    pad = [0] * (BINS - 4)
    val = {"score-hist-0": NEG + pad, "score-hist-1": POS + pad}  # Youden on these: bin edge 3 of BINS
    # test: negatives in bins 0-3 (edge 3/50 calls 2 of them negative), positives all above
    test = {"score-hist-0": [1, 1, 1, 1, *pad], "score-hist-1": [0, 0, 0, 6, *pad]}
    hist = History(rounds=[_hist_round(1, test, val, [[0, 4], [0, 6]])])
    s = summary_dict(exp, hist, wall_seconds=1.0)
    assert s["selected_threshold"] == bin_edges()[3]
    at = s["final_global_test_at_threshold"]
    # TN 3 (bins 0-2), FP 1, TP 6, FN 0: accuracy 9/10, sensitivity 1, specificity 3/4
    assert (at["accuracy"], at["sensitivity"], at["specificity"]) == (pytest.approx(0.9), 1.0, 0.75)
    assert len(s["warnings"]) == 1 and "class 1" in s["warnings"][0] and "100.0%" in s["warnings"][0]
    assert s["final_global_test"]["confusion-matrix"] == s["final_global_test_confusion"] == [[0, 4], [0, 6]]
    assert not any(k.startswith("score-hist") for k in s["final_global_test"])  # inputs, not results
    assert s["reproducible"] is True
    assert s["final_val_score_histograms"] == val and "val_score_histograms" not in s["rounds"][0]


def _eval_reply(flower_identity, metrics: dict) -> Message:
    return Message(RecordDict({keys.METRICS: MetricRecord(metrics)}), dst_node_id=1, message_type="evaluate")


def test_screen_accepts_histograms_and_the_server_sums_them(flower_identity) -> None:
    good = {keys.NUM_EXAMPLES: 3, "val-score-hist-0": [1] * BINS, "val-score-hist-1": [0, 2] + [0] * (BINS - 2)}
    view = RoundView(1, None, {})  # type: ignore[arg-type]  # FiniteMetrics looks at no model
    replies = [_eval_reply(flower_identity, good), _eval_reply(flower_identity, good)]
    assert all(FiniteMetrics().check(m, view) is None for m in replies)
    summed = summed_histograms(replies, prefix="val-")
    assert summed["score-hist-0"] == [2] * BINS and summed["score-hist-1"][:2] == [0, 4]
    short = _eval_reply(flower_identity, {keys.NUM_EXAMPLES: 3, "val-score-hist-0": [1, 2]})
    verdict = FiniteMetrics().check(short, view)
    assert verdict is not None and "val-score-hist-0" in verdict.reason and str(BINS) in verdict.reason
    negative = _eval_reply(flower_identity, {keys.NUM_EXAMPLES: 3, "val-score-hist-0": [-1] * BINS})
    assert FiniteMetrics().check(negative, view) is not None


def test_binary_evaluation_reports_histograms_and_confusion() -> None:
    from medflower.data.base import ArraySplit
    from medflower.tasks import evaluate

    images = torch.zeros(4, 1, 4, 4).numpy()
    split = ArraySplit(images, torch.tensor([0, 1, 0, 1]).numpy())
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    m = evaluate(model, split, task="classification", histograms=True, confusion=True)
    assert sum(m["score-hist-0"]) == 2 and sum(m["score-hist-1"]) == 2
    assert sum(map(sum, m["confusion-matrix"])) == 4 and math.isfinite(m["balanced-accuracy"])


def test_multiclass_evaluation_reports_confusion_and_no_histograms() -> None:
    from medflower.data.base import ArraySplit
    from medflower.tasks import evaluate

    split = ArraySplit(torch.zeros(6, 1, 4, 4).numpy(), torch.tensor([0, 1, 2, 0, 1, 2]).numpy())
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    m = evaluate(model, split, task="classification", histograms=True, confusion=True)
    assert not any(k.startswith("score-hist") for k in m)  # a threshold is for binary tasks only
    cm = m["confusion-matrix"]
    assert [sum(row) for row in cm] == [2, 2, 2]  # rows: true classes
    # one input image for all six: one predicted column holds everything, balanced accuracy 1/3
    assert sorted(sum(col) for col in zip(*cm, strict=True)) == [0, 0, 6] and m["balanced-accuracy"] == pytest.approx(
        1 / 3
    )
    assert collapse_warnings(cm)  # 100 % one class
