"""Aggregation maths: numbers computed by hand, Hypothesis properties, and equality with Flower.

Replies are built directly as Flower Messages (strategies.testing.make_reply) and go through the
round's own screen and guarded aggregation stages (tests/roundkit.py), so these tests need no
site, no model and no Ray: each runs in milliseconds.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
from flwr.serverapp import strategy as fl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from roundkit import parts_of, run_round, screen

from medflower import keys
from medflower.config import quickstart_experiment
from medflower.config.strategy import StrategyConfig
from medflower.server.build import build_round, build_strategy
from medflower.strategies.methods.fedbn import FedBN
from medflower.strategies.methods.scaffold import SCAFFOLD_DC, Scaffold
from medflower.strategies.state import load_strategy_state, strategy_state_dict
from medflower.strategies.testing import arrays_of, make_reply

FLOWER_COMMON = {"min_train_nodes": 1, "min_evaluate_nodes": 1, "min_available_nodes": 1}


def exp_with(name: str, **params):
    return replace(quickstart_experiment(), strategy=StrategyConfig(name=name, params=params))


def replies_from(models: list[dict[str, np.ndarray]], weights: list[float]):
    return [
        make_reply(m, num_examples=w, site=f"site-{i}") for i, (m, w) in enumerate(zip(models, weights, strict=True))
    ]


G1 = {"w": np.zeros((2,), np.float32)}


# ---- numbers computed by hand ------------------------------------------------------------------


def test_fedavg_weighted_mean_by_hand():
    s = build_round(exp_with("fedavg"), num_sites=2)
    replies = replies_from([{"w": np.array([1, 2], np.float32)}, {"w": np.array([5, 6], np.float32)}], [1, 3])
    out, _metrics = run_round(s, G1, replies)
    np.testing.assert_allclose(out["w"], [4.0, 5.0])  # (1*1 + 3*5)/4 = 4, (2 + 18)/4 = 5
    assert out["w"].dtype == np.float32


def test_fedmedian_and_trimmed_mean_by_hand():
    vals = [1.0, 2.0, 3.0, 4.0, 100.0]
    models = [{"w": np.array([v, -v], np.float32)} for v in vals]
    med, _ = run_round(build_round(exp_with("fedmedian"), num_sites=5), G1, replies_from(models, [1] * 5))
    np.testing.assert_allclose(med["w"], [3.0, -3.0])
    trim, _ = run_round(
        build_round(exp_with("fedtrimmedavg", beta=0.2), num_sites=5), G1, replies_from(models, [1] * 5)
    )
    np.testing.assert_allclose(trim["w"], [3.0, -3.0])  # drops 1 and 100: mean(2, 3, 4)
    vals = [0.0, 1.0, 2.0, 4.0, 100.0]
    trim, _ = run_round(
        build_round(exp_with("fedtrimmedavg", beta=0.2), num_sites=5),
        G1,
        replies_from([{"w": np.array([v, v], np.float32)} for v in vals], [1] * 5),
    )
    np.testing.assert_allclose(trim["w"], [7 / 3, 7 / 3], rtol=1e-6)


def test_krum_picks_the_central_update_by_hand():
    # scores (f=1, n=5: sum of squared distances to the n-f-2 = 2 nearest): the point 1.0 has
    # neighbours 0.9 and 1.2 (0.01 + 0.04 = 0.05), the lowest; the outlier 50 is never picked
    vals = [0.9, 1.0, 1.2, 1.6, 50.0]
    models = [{"w": np.array([v, 0.0], np.float32)} for v in vals]
    out, _ = run_round(
        build_round(exp_with("krum", num_malicious_nodes=1), num_sites=5), G1, replies_from(models, [10, 1, 1, 1, 1])
    )
    np.testing.assert_allclose(out["w"], [1.0, 0.0])


def test_fedadam_first_round_by_hand():
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    s = build_round(exp_with("fedadam", eta=eta, beta_1=b1, beta_2=b2, tau=tau), num_sites=2)
    g = {"w": np.array([1.0, -1.0], np.float32)}
    replies = replies_from([{"w": np.array([1.5, -1.0], np.float32)}, {"w": np.array([0.5, -3.0], np.float32)}], [1, 1])
    out, _ = run_round(s, g, replies)
    delta = np.array([0.0, -1.0])  # mean(1.5, 0.5) - 1, mean(-1, -3) + 1
    m = (1 - b1) * delta
    v = (1 - b2) * delta**2
    eta_norm = eta * np.sqrt(1 - b2**2) / (1 - b1**2)  # Flower's bias correction at round 1
    np.testing.assert_allclose(out["w"], g["w"] + eta_norm * m / (np.sqrt(v) + tau), rtol=1e-6)


def test_fedavgm_momentum_two_rounds_by_hand():
    s = build_round(exp_with("fedavgm", server_learning_rate=1.0, server_momentum=0.5), num_sites=1)
    g0 = {"w": np.array([1.0], np.float32)}
    out1, _ = run_round(s, g0, replies_from([{"w": np.array([0.8], np.float32)}], [1]))
    np.testing.assert_allclose(out1["w"], [0.8])  # pseudo-gradient 0.2, momentum 0.2
    out2, _ = run_round(s, out1, replies_from([{"w": np.array([0.7], np.float32)}], [1]), rnd=2)
    np.testing.assert_allclose(out2["w"], [0.8 - (0.5 * 0.2 + 0.1)], rtol=1e-6)  # momentum 0.2


def test_scaffold_model_and_control_variate_by_hand():
    s = parts_of(Scaffold(param_keys=["w"], num_sites=4, server_learning_rate=0.5, **FLOWER_COMMON), "scaffold")
    g = {"w": np.array([2.0, 0.0], np.float32), "buf": np.array([1.0], np.float32)}
    replies = [
        make_reply(
            {"w": np.array([0.0, 2.0], np.float32), "buf": np.array([3.0], np.float32)},
            num_examples=1,
            site="a",
            extra_records={SCAFFOLD_DC: arrays_of({"w": np.array([1.0, 1.0], np.float32)})},
        ),
        make_reply(
            {"w": np.array([4.0, 6.0], np.float32), "buf": np.array([5.0], np.float32)},
            num_examples=3,
            site="b",
            extra_records={SCAFFOLD_DC: arrays_of({"w": np.array([3.0, -1.0], np.float32)})},
        ),
    ]
    out, _ = run_round(s, g, replies)
    # weighted avg w = (0*1 + 4*3)/4 = 3, (2 + 18)/4 = 5; x + 0.5*(avg - x) = (2.5, 2.5); buf: 1 + 0.5*(4.5-1)
    np.testing.assert_allclose(out["w"], [2.5, 2.5])
    np.testing.assert_allclose(out["buf"], [2.75])
    # c = 0 + (|S|/N) * mean(dc) = (2/4) * (2, 0)
    np.testing.assert_allclose(s.base.c["w"], [1.0, 0.0])


def test_fedbn_keeps_norm_arrays_and_averages_the_rest():
    s = parts_of(FedBN(local_keys=["norm.weight"], **FLOWER_COMMON), "fedbn")
    g = {"conv": np.array([0.0, 0.0], np.float32), "norm.weight": np.array([7.0], np.float32)}
    replies = replies_from(
        [{"conv": np.array([1.0, 3.0], np.float32)}, {"conv": np.array([3.0, 5.0], np.float32)}], [1, 1]
    )
    out, _ = run_round(s, g, replies)
    np.testing.assert_allclose(out["conv"], [2.0, 4.0])
    np.testing.assert_allclose(out["norm.weight"], [7.0])  # never averaged
    assert list(out) == ["conv", "norm.weight"]  # the global model's order
    # a site that sends its norm layers is rejected (they must stay at the site)
    bad = replies_from([{"conv": np.ones(2, np.float32), "norm.weight": np.ones(1, np.float32)}], [1])
    screened = screen(s, g, bad, rnd=2)
    assert not screened.valid and "unexpected array(s) norm.weight" in screened.rejected[0][1]


# ---- properties (Hypothesis) --------------------------------------------------------------------

finite = st.floats(min_value=-100, max_value=100, allow_nan=False, width=32)
site_models = st.lists(st.lists(finite, min_size=3, max_size=3), min_size=1, max_size=6)
weights_st = st.lists(st.integers(min_value=1, max_value=50), min_size=6, max_size=6)
ORDER_FREE = ["fedavg", "fedprox", "fedmedian", "fedtrimmedavg", "scaffold"]
HYP = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _build(name: str, n: int):
    if name == "scaffold":
        return parts_of(Scaffold(param_keys=["w"], num_sites=n, **FLOWER_COMMON), "scaffold")
    return build_round(exp_with(name), num_sites=n)


def _replies(name: str, models, weights):
    extra = (lambda: {SCAFFOLD_DC: arrays_of({"w": np.zeros(3, np.float32)})}) if name == "scaffold" else dict
    return [
        make_reply({"w": np.array(m, np.float32)}, num_examples=w, site=f"site-{i}", extra_records=extra())
        for i, (m, w) in enumerate(zip(models, weights, strict=True))
    ]


G3 = {"w": np.zeros(3, np.float32)}


@pytest.mark.parametrize("name", ORDER_FREE)
@HYP
@given(models=site_models, weights=weights_st, data=st.data())
def test_result_does_not_depend_on_reply_order(name, models, weights, data):
    order = data.draw(st.permutations(range(len(models))))
    a, _ = run_round(_build(name, len(models)), G3, _replies(name, models, weights[: len(models)]))
    b, _ = run_round(_build(name, len(models)), G3, [_replies(name, models, weights[: len(models)])[i] for i in order])
    np.testing.assert_allclose(a["w"], b["w"], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "scaffold", "fedavgm"])
@HYP
@given(models=site_models, w=st.integers(min_value=1, max_value=100))
def test_equal_weights_give_the_plain_mean(name, models, w):
    s = (
        _build(name, len(models))
        if name != "fedavgm"
        else build_round(exp_with("fedavgm", server_momentum=0.0), num_sites=len(models))
    )
    out, _ = run_round(s, G3, _replies(name, models, [w] * len(models)))
    np.testing.assert_allclose(out["w"], np.mean(np.array(models, np.float32), axis=0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "name", ["fedavg", "fedprox", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "scaffold", "ditto", "fedbn"]
)
@HYP
@given(model=st.lists(finite, min_size=3, max_size=3), w=st.integers(min_value=1, max_value=100))
def test_one_site_gives_that_sites_model(name, model, w):
    if name == "fedbn":
        s = parts_of(FedBN(local_keys=["n"], **FLOWER_COMMON), "fedbn")
        out, _ = run_round(s, {**G3, "n": np.ones(1, np.float32)}, _replies(name, [model], [w]))
    else:
        s = (
            _build(name, 1)
            if name not in ("krum", "multikrum")
            else build_round(
                exp_with(name, num_malicious_nodes=0, **({"num_nodes_to_select": 1} if name == "multikrum" else {})),
                num_sites=1,
            )
        )
        out, _ = run_round(s, G3, _replies(name, [model], [w]))
    np.testing.assert_allclose(out["w"], np.array(model, np.float32), rtol=1e-6)


# ---- our configured strategies == Flower's own aggregation --------------------------------------

FLOWER_EQUIVALENT = {
    "fedavg": ({}, lambda: fl.FedAvg(**FLOWER_COMMON)),
    "fedprox": ({"proximal_mu": 0.3}, lambda: fl.FedProx(proximal_mu=0.3, **FLOWER_COMMON)),
    "fedadam": (
        {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-2},
        lambda: fl.FedAdam(eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-2, **FLOWER_COMMON),
    ),
}


@pytest.mark.parametrize("name", sorted(FLOWER_EQUIVALENT))
def test_configured_strategy_equals_flowers_own(name):
    params, flower_factory = FLOWER_EQUIVALENT[name]
    ours, theirs = build_round(exp_with(name, **params), num_sites=3), parts_of(flower_factory(), name)
    rng = np.random.default_rng(0)
    g_ours = g_theirs = {
        "conv.weight": rng.normal(size=(4, 3)).astype(np.float32),
        "conv.bias": rng.normal(size=(4,)).astype(np.float32),
    }
    for rnd in (1, 2, 3):  # three rounds: FedAdam's moments carry over
        models = [
            {k: (v + rng.normal(scale=0.1, size=v.shape)).astype(np.float32) for k, v in g_ours.items()}
            for _ in range(3)
        ]
        weights = [10, 25, 7]
        a, ma = run_round(ours, g_ours, replies_from(models, weights), rnd=rnd)
        b, mb = run_round(theirs, g_theirs, copy.deepcopy(replies_from(models, weights)), rnd=rnd)
        for k in a:
            # Flower's FedAdam returns float64 for float32 weights; ours gives back the model's dtype
            assert a[k].dtype == np.float32
            np.testing.assert_array_equal(a[k], b[k].astype(np.float32))
        drop = (keys.NUM_EXAMPLES, keys.AGG_WEIGHT)  # the weight key: ours is set by the weighting stage
        assert {k: v for k, v in ma.items() if k not in drop} == {k: v for k, v in mb.items() if k not in drop}
        g_ours = g_theirs = a  # both start the next round from the same global model


def test_base_strategies_are_flowers_classes():
    for name, cls in [
        ("fedavg", fl.FedAvg),
        ("fedavgm", fl.FedAvgM),
        ("fedprox", fl.FedProx),
        ("fedadam", fl.FedAdam),
        ("fedyogi", fl.FedYogi),
        ("fedadagrad", fl.FedAdagrad),
        ("fedmedian", fl.FedMedian),
        ("fedtrimmedavg", fl.FedTrimmedAvg),
        ("krum", fl.Krum),
        ("multikrum", fl.MultiKrum),
        ("qfedavg", fl.QFedAvg),
    ]:
        assert type(build_strategy(exp_with(name), num_sites=5)) is cls, name


# ---- strategy state: save/load gives identical next-round aggregation ---------------------------


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedavgm", "scaffold"])
def test_state_round_trip_gives_identical_next_round(name, tmp_path):
    def build():
        if name == "scaffold":
            return parts_of(Scaffold(param_keys=["a", "b"], num_sites=3, **FLOWER_COMMON), "scaffold")
        return build_round(exp_with(name), num_sites=3)

    rng = np.random.default_rng(1)
    g = {"a": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=(2,)).astype(np.float32)}

    def round_replies():
        dc = (
            (lambda: {SCAFFOLD_DC: arrays_of({k: rng.normal(size=v.shape).astype(np.float32) for k, v in g.items()})})
            if name == "scaffold"
            else dict
        )
        return [
            make_reply(
                {k: (v + rng.normal(scale=0.2, size=v.shape)).astype(np.float32) for k, v in g.items()},
                num_examples=int(rng.integers(5, 50)),
                site=f"site-{i}",
                extra_records=dc(),
            )
            for i in range(3)
        ]

    first = build()
    for rnd in (1, 2):
        g, _ = run_round(first, g, round_replies(), rnd=rnd)
    state = strategy_state_dict(first.strategy)
    assert all(isinstance(v, (np.ndarray, int, float)) for v in state.values())
    assert len(state) > 1, "the strategy has state after two rounds"
    np.savez(tmp_path / "s.npz", **state)  # a checkpoint can store it as plain numpy
    restored = dict(np.load(tmp_path / "s.npz"))
    restored = {k: (v.item() if v.ndim == 0 and k in ("format",) else v) for k, v in restored.items()}
    second = build()
    load_strategy_state(second.strategy, restored)
    replies3 = round_replies()
    a, _ = run_round(first, g, replies3, rnd=3)
    b, _ = run_round(second, g, copy.deepcopy(replies3), rnd=3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    sa, sb = (
        strategy_state_dict(first.strategy),
        strategy_state_dict(second.strategy),
    )  # SCAFFOLD: the c sent next round
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k])
    fresh = build()  # without the state the next round differs: the test can fail
    c, _ = run_round(fresh, g, copy.deepcopy(replies3), rnd=3)
    sc = strategy_state_dict(fresh.strategy)
    assert any(not np.array_equal(a[k], c[k]) for k in a) or any(not np.array_equal(sa[k], sc[k]) for k in sa)


def test_loading_another_strategys_state_is_an_error():
    s = build_round(exp_with("fedadam"), num_sites=1)
    run_round(s, G3, replies_from([{"w": np.ones(3, np.float32)}], [1]))
    with pytest.raises(ValueError, match="does not belong to this strategy"):
        load_strategy_state(build_strategy(exp_with("fedavgm"), num_sites=1), strategy_state_dict(s.strategy))


# ---- the weighting stage: weights are set on the server ------------------------------------------


@pytest.mark.parametrize(
    "weighting, expected",
    [
        ("examples", (1 * 1 + 2 * 2 + 9 * 1000) / 1003),  # one site claims 1000 examples and dominates
        ("uniform", (1 + 2 + 9) / 3),
        ("capped", (1 * 1 + 2 * 2 + 9 * 6) / 9),  # cap = 3 x median(1, 2, 1000) = 6
    ],
)
def test_weighting_by_hand(weighting, expected):
    exp = exp_with("fedavg")
    exp = replace(exp, strategy=replace(exp.strategy, weighting=weighting, weight_cap_multiple=3.0))
    s = build_round(exp, num_sites=3)
    models = [{"w": np.full(2, v, np.float32)} for v in (1.0, 2.0, 9.0)]
    replies = replies_from(models, [1, 2, 1000])
    replies[0].content[keys.METRICS][keys.AGG_WEIGHT] = 1e9  # a site cannot set its own weight
    out, metrics = run_round(s, G1, replies)
    np.testing.assert_allclose(out["w"], [expected, expected], rtol=1e-6)
    assert keys.AGG_WEIGHT not in metrics


def test_capped_weighting_uses_the_size_declared_at_registration():
    exp = exp_with("fedavg")
    s = build_round(replace(exp, strategy=replace(exp.strategy, weighting="capped")), num_sites=2)
    replies = replies_from([{"w": np.full(2, 0.0, np.float32)}, {"w": np.full(2, 3.0, np.float32)}], [10, 10**9])
    s.declared_sizes = {int(replies[1].metadata.src_node_id): 20}  # the second site registered 20 images
    out, _ = run_round(s, G1, replies)
    np.testing.assert_allclose(out["w"], [3.0 * 20 / 30] * 2, rtol=1e-6)
