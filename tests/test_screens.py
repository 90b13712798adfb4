"""Each screen of the round, alone, on hand-made replies."""

from __future__ import annotations

import numpy as np
import pytest

from medflower import keys
from medflower.server.screens import (
    FiniteMetrics,
    LedgerRefusals,
    NormBound,
    RoundView,
    UpdateShape,
    run_screens,
    spec_of,
)
from medflower.strategies.testing import arrays_of, make_reply

G = {"w": np.zeros((2, 2), np.float32), "step": np.zeros((), np.int64)}


def view(expected=None) -> RoundView:
    g = arrays_of(G)
    return RoundView(1, g, expected if expected is not None else {keys.ARRAYS: spec_of(g)})


def test_update_shape_passes_a_good_reply_and_names_what_is_wrong():
    s = UpdateShape()
    assert s.check(make_reply(G, num_examples=3, site="a"), view()) is None
    bad = make_reply({**G, "w": np.full((2, 2), np.nan, np.float32)}, num_examples=3, site="a")
    v = s.check(bad, view())
    assert v.action == "reject" and "array 'w' is not finite (4 NaN, 0 Inf of 4 values)" in v.reason
    no_records = make_reply(None, num_examples=3, site="a")
    assert "carries ArrayRecord(s) none, expected arrays" in s.check(no_records, view()).reason


@pytest.mark.parametrize("norm, passes", [(0.8, True), (1.0, True), (1.2, False)])
def test_norm_bound_by_hand(norm, passes):
    # 4 entries moved by x: L2 norm 2x
    reply = make_reply({**G, "w": np.full((2, 2), norm / 2, np.float32)}, num_examples=1, site="a")
    v = NormBound(max_norm=1.0).check(reply, view())
    assert (v is None) == passes
    if not passes:
        assert "update L2 norm 1.2 exceeds strategy.max_update_norm=1" in v.reason


def test_norm_bound_needs_a_positive_bound():
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        NormBound(max_norm=0.0)


def test_ledger_refusal_is_set_aside_with_the_numbers():
    refusal = make_reply(
        None,
        num_examples=0.5,
        site="a",
        metrics={
            keys.DP_EXHAUSTED: 1,
            keys.DP_EPSILON: 7.5,
            keys.DP_TARGET_EPSILON: 8.0,
            keys.DP_DELTA: 1e-5,
            keys.DP_EPSILON_NEXT: 8.3,
        },
    )
    v = LedgerRefusals().check(refusal, view())
    assert v.action == "set-aside"
    assert v.reason == (
        "privacy budget exhausted (epsilon 7.5000 of 8.0000 spent at delta 1e-05; one more round would reach 8.3000)"
    )
    assert LedgerRefusals().check(make_reply(G, num_examples=3, site="a"), view()) is None


def test_finite_metrics_allows_undefined_but_not_infinite():
    ok = make_reply(None, num_examples=3, site="a", metrics={"val-auc": float("nan")}, message_type="evaluate")
    assert FiniteMetrics().check(ok, view({})) is None
    bad = make_reply(None, num_examples=3, site="a", metrics={"val-auc": float("inf")}, message_type="evaluate")
    assert "metric 'val-auc' is not finite (inf)" in FiniteMetrics().check(bad, view({})).reason


def test_run_screens_applies_the_first_verdict_once_per_reply(caplog):
    calls = []

    class Counting:
        def check(self, msg, v):
            calls.append(msg.metadata.src_node_id)

    good = make_reply(G, num_examples=3, site="a", node_id=1)
    refusal = make_reply(None, num_examples=1, site="b", node_id=2, metrics={keys.DP_EXHAUSTED: 1})
    bad = make_reply({**G, "w": np.full((2, 2), np.inf, np.float32)}, num_examples=3, site="c", node_id=3)
    with caplog.at_level("WARNING"):
        out = run_screens(
            [LedgerRefusals(), UpdateShape(), Counting()],
            [good, refusal, bad],
            view(),
            site_of={1: "a", 2: "b", 3: "c"},
            what="update",
        )
    assert [m.metadata.src_node_id for m in out.valid] == [1]
    assert [m.metadata.src_node_id for m, _ in out.set_aside] == [2]
    assert [m.metadata.src_node_id for m, _ in out.rejected] == [3]
    assert calls == [1]  # later screens never see a reply an earlier one judged
    assert "rejected the update from c" in caplog.text and "b sent no update" in caplog.text


def test_a_site_refusal_is_set_aside_with_its_rule():
    from medflower.server.screens import SiteRefusals

    refusal = make_reply(None, num_examples=0, site="a")
    refusal.content[keys.SITE][keys.REFUSAL] = "policy.max_rounds: round 6 exceeds this site's limit of 5"
    v = SiteRefusals().check(refusal, view())
    assert v.action == "set-aside" and v.reason == "refused: policy.max_rounds: round 6 exceeds this site's limit of 5"
    assert SiteRefusals().check(make_reply(G, num_examples=3, site="a"), view()) is None


@pytest.mark.parametrize(
    "metrics, reason",
    [
        ({"val-auc": 1.5}, "metric 'val-auc' is 1.5, outside its range [0, 1]"),
        ({"personal-test-balanced-accuracy": -0.1}, "outside its range [0, 1]"),
        ({"eval-loss": -2.0}, "metric 'eval-loss' is -2.0, outside its range [0, inf]"),
        ({"val-dice": 0.7, "val-hd95": 3.0, "val-accuracy": 1.0}, None),
    ],
)
def test_evaluation_metrics_must_lie_in_their_range(metrics, reason):
    reply = make_reply(None, num_examples=3, site="a", metrics=metrics, message_type="evaluate")
    v = FiniteMetrics().check(reply, view({}))
    assert (v is None) if reason is None else (reason in v.reason)
