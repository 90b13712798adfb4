"""Strategy selection in YAML, update screening in every strategy, and the sites' half of them."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from roundkit import configure, run_round, screen
from torch import nn

from medflower import keys
from medflower.client.strategy_hooks import SiteStrategy
from medflower.client.train import LocalHooks, TrainStats, make_loader, train_epochs
from medflower.config import ConfigError, load_experiment, quickstart_experiment
from medflower.config.attack import AttackConfig
from medflower.config.strategy import STRATEGY_NAMES, StrategyConfig
from medflower.modelspec import build_experiment_model
from medflower.server.build import build_round, build_strategy
from medflower.server.loop import RoundAborted, aggregate_evaluate, aggregate_train, run_rounds
from medflower.server.screens import spec_of
from medflower.simulation.attack import poison
from medflower.simulation.clientapp import app as simulation_app
from medflower.simulation.inprocess import InProcessGrid
from medflower.strategies.methods.ditto import DITTO_EPOCHS, DITTO_LAMBDA, DITTO_LR, STATE_PERSONAL
from medflower.strategies.methods.fedbn import LOCAL_KEYS, STATE_LOCAL
from medflower.strategies.methods.fedprox import PROXIMAL_MU, proximal_term
from medflower.strategies.methods.scaffold import SCAFFOLD_C, SCAFFOLD_DC, STATE_CI, effective_steps
from medflower.strategies.state import load_strategy_state, strategy_state_dict
from medflower.strategies.testing import StubGrid, arrays_of, make_reply, numpy_of


def exp_with(name: str, **params):
    exp = quickstart_experiment()
    return replace(
        exp, data=replace(exp.data, synthetic_samples=200), strategy=StrategyConfig(name=name, params=params)
    )


# ---- configuration -----------------------------------------------------------------------------


def _yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def test_unknown_param_names_the_key_and_lists_valid_ones(tmp_path):
    p = _yaml(tmp_path, "strategy:\n  name: fedadam\n  params: {etaa: 0.1}\n")
    with pytest.raises(
        ConfigError,
        match=r"exp\.yaml: strategy\.params\.etaa: not a parameter of 'fedadam'; "
        r"valid parameters are eta, beta_1, beta_2, tau",
    ):
        load_experiment(p)
    with pytest.raises(
        ConfigError,
        match=r"strategy\.params\.beta: not a parameter of 'fedavg'; 'fedavg' takes "
        r"no parameters",
    ):
        load_experiment(_yaml(tmp_path, "strategy: {name: fedavg, params: {beta: 0.1}}\n"))


def test_bad_name_lists_valid_names(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"strategy\.name: invalid value 'fedsgd'; valid choices are .*'ditto'.*'fedavg'.*"
        r"'scaffold'",
    ):
        load_experiment(_yaml(tmp_path, "strategy: {name: fedsgd}\n"))


@pytest.mark.parametrize(
    "params, message",
    [
        ("{name: fedtrimmedavg, params: {beta: 0.7}}", r"strategy\.params\.beta: must be <= 0.499"),
        ("{name: fedprox, params: {proximal_mu: high}}", r"strategy\.params\.proximal_mu: expected a number"),
        ("{name: krum, params: {num_malicious_nodes: -1}}", r"strategy\.params\.num_malicious_nodes: must be >= 0"),
        ("{name: fedavg, max_update_norm: 0}", r"strategy\.max_update_norm: must be > 0"),
    ],
)
def test_param_values_are_validated(tmp_path, params, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(_yaml(tmp_path, f"strategy: {params}\n"))


def test_params_reach_flowers_strategy():
    s = build_strategy(exp_with("fedadam", eta=0.02, tau=1e-4), num_sites=3)
    assert (s.eta, s.tau, s.beta_1) == (0.02, 1e-4, 0.9)
    assert build_strategy(exp_with("fedprox", proximal_mu=0.5), num_sites=3).proximal_mu == 0.5


def test_train_messages_carry_what_the_sites_need():
    _exp, g, params = _global_and_layout("scaffold")

    def first_message(name, **kw):
        s = build_strategy(replace(exp_with(name, **kw)), num_sites=2)
        return next(iter(s.configure_train(1, arrays_of(g), ConfigRecord(), StubGrid(2)))).content

    assert first_message("fedprox", proximal_mu=0.5)[keys.CONFIG][PROXIMAL_MU] == 0.5
    c = first_message("scaffold")[SCAFFOLD_C]
    assert list(c.keys()) == params and all(not a.numpy().any() for a in c.values())  # c starts at zero
    local = first_message("fedbn")[keys.CONFIG][LOCAL_KEYS]
    assert local and all(k in g for k in local) and not any(k.startswith("head.") for k in local)
    cfg = first_message("ditto", lam=0.3, personal_epochs=2)[keys.CONFIG]
    assert (cfg[DITTO_LAMBDA], cfg[DITTO_EPOCHS]) == (0.3, 2)
    assert PROXIMAL_MU not in first_message("fedavg")[keys.CONFIG]


def test_site_count_checks_name_the_param():
    with pytest.raises(ConfigError, match=r"strategy\.params\.num_malicious_nodes: Bulyan needs at least 4\*f\+3 = 7"):
        build_strategy(exp_with("bulyan", num_malicious_nodes=1), num_sites=5)
    with pytest.raises(ConfigError, match=r"strategy\.params\.num_nodes_to_select: 4 exceeds the 3 sites"):
        build_strategy(exp_with("multikrum", num_nodes_to_select=4), num_sites=3)


def test_attack_config_needs_sites(tmp_path):
    with pytest.raises(ConfigError, match=r"attack\.sites: name at least one site"):
        load_experiment(_yaml(tmp_path, "attack: {kind: sign_flip}\n"))


# ---- update screening in every strategy --------------------------------------------------------


def _global_and_layout(name: str):
    exp = exp_with(name, **({"num_malicious_nodes": 0} if name == "bulyan" else {}))
    model = build_experiment_model(exp)
    g = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return exp, g, [n for n, _ in model.named_parameters()]


def _good_reply(name, g, params, parts, i, rng):
    local = set(getattr(parts.base, "local_keys", []))
    arrays = {k: (v + rng.normal(scale=0.01, size=v.shape)).astype(v.dtype) for k, v in g.items() if k not in local}
    extra = {SCAFFOLD_DC: arrays_of({k: np.zeros_like(g[k]) for k in params})} if name == "scaffold" else {}
    return make_reply(
        arrays, num_examples=20 + i, site=f"site-{i}", extra_records=extra, metrics={keys.TRAIN_LOSS: 0.5}
    )


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_every_strategy_rejects_nonfinite_and_misshapen_updates(name, caplog):
    exp, g, params = _global_and_layout(name)
    parts = build_round(exp, num_sites=6)
    rng = np.random.default_rng(0)
    replies = [_good_reply(name, g, params, parts, i, rng) for i in range(6)]
    first = next(iter(replies[4].content[keys.ARRAYS].keys()))
    bad_nan = numpy_of(replies[4].content[keys.ARRAYS])
    bad_nan[first] = np.full_like(bad_nan[first], np.nan)
    replies[4].content[keys.ARRAYS] = arrays_of(bad_nan)
    bad_shape = numpy_of(replies[5].content[keys.ARRAYS])
    bad_shape[first] = bad_shape[first].reshape(-1)[:-1].copy()
    replies[5].content[keys.ARRAYS] = arrays_of(bad_shape)
    configure(parts, g, nodes=6)
    with caplog.at_level("WARNING"):
        screened = screen(parts, g, replies)
        result = aggregate_train(parts, 1, screened.valid, spec_of(arrays_of(g)))
    assert result.arrays is not None, f"{name}: the round must complete with the 4 valid updates"
    out = numpy_of(result.arrays)
    assert list(out) == list(g)
    for k, v in out.items():
        assert v.dtype == g[k].dtype and v.shape == g[k].shape, k
        assert np.isfinite(v).all(), f"{name}: global array {k} is not finite"
    rejected = [(m.content[keys.SITE][keys.SITE_NAME], why) for m, why in screened.rejected]
    assert [site for site, _ in rejected] == ["site-4", "site-5"]
    assert "is not finite" in rejected[0][1]
    assert "has shape" in rejected[1][1]
    assert "rejected the update from site-4" in caplog.text and "rejected the update from site-5" in caplog.text


G = {"w": np.zeros((2, 2), np.float32), "step": np.zeros((), np.int64)}


@pytest.mark.parametrize(
    "arrays, weight, metrics, reason",
    [
        ({"w": np.full((2, 2), np.inf, np.float32), "step": np.zeros((), np.int64)}, 5, {}, "not finite (0 NaN, 4 Inf"),
        ({"w": np.zeros((2, 2), np.float64), "step": np.zeros((), np.int64)}, 5, {}, "dtype float64"),
        ({"w": np.zeros((2, 2), np.float32)}, 5, {}, "missing array(s) step"),
        ({**G, "extra": np.zeros(1, np.float32)}, 5, {}, "unexpected array(s) extra"),
        (G, 0, {}, "must be a finite number > 0"),
        (G, float("nan"), {}, "must be a finite number > 0"),
        (G, 5, {keys.TRAIN_LOSS: float("nan")}, "metric 'train-loss' is not finite"),
    ],
)
def test_rejection_reasons(arrays, weight, metrics, reason):
    parts = build_round(exp_with("fedavg"), num_sites=1)
    screened = screen(parts, G, [make_reply(arrays, num_examples=weight, site="hospital-a", metrics=metrics)])
    assert not screened.valid and screened.rejected[0][0].content[keys.SITE][keys.SITE_NAME] == "hospital-a"
    assert reason in screened.rejected[0][1]


def test_max_update_norm_rejects_large_updates():
    parts = build_round(replace(exp_with("fedavg"), strategy=StrategyConfig(max_update_norm=1.0)), num_sites=2)
    near = make_reply({**G, "w": np.full((2, 2), 0.4, np.float32)}, num_examples=1, site="a")  # norm 0.8
    far = make_reply({**G, "w": np.full((2, 2), 0.6, np.float32)}, num_examples=1, site="b")  # norm 1.2
    configure(parts, G, nodes=2)
    screened = screen(parts, G, [near, far])
    assert "update L2 norm 1.2 exceeds strategy.max_update_norm=1" in screened.rejected[0][1]
    out, _ = run_round(parts, G, [near, far])
    np.testing.assert_allclose(out["w"], 0.4)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_nonfinite_aggregate_is_discarded_and_server_state_rolled_back(caplog):
    # FedAvgM with an absurd server learning rate overflows float32: the aggregate is +-inf
    parts = build_round(exp_with("fedavgm", server_learning_rate=1e38, server_momentum=0.5), num_sites=1)
    g = {"w": np.ones(3, np.float32)}
    configure(parts, g)
    before = strategy_state_dict(parts.strategy)
    with caplog.at_level("ERROR"):
        out, _ = run_round(parts, g, [make_reply({"w": np.full(3, -1e3, np.float32)}, num_examples=1, site="a")])
    assert out is None and "discarded the aggregated model" in caplog.text
    after = strategy_state_dict(parts.strategy)
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    load_strategy_state(parts.strategy, after)  # and the rolled-back state is still loadable


def test_inconsistent_evaluate_metrics_do_not_crash():
    parts = build_round(exp_with("fedavg"), num_sites=2)
    replies = [
        make_reply(None, num_examples=3, site="a", metrics={"val-accuracy": 0.5}, message_type="evaluate"),
        make_reply(None, num_examples=3, site="b", metrics={"other": 0.5}, message_type="evaluate"),
    ]
    assert aggregate_evaluate(parts, 1, replies) == {}


# ---- the round loop counts rejected updates as failures ----------------------------------------


def _fake_app(bad_site: int) -> ClientApp:
    """Sites that 'train' instantly: site ``bad_site`` sends NaN weights."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config[keys.NODE_PARTITION_ID])
        w = msg.content[keys.ARRAYS]["w"].numpy() + 1.0
        if pid == bad_site:
            w = w * np.nan
        content = RecordDict(
            {
                keys.ARRAYS: arrays_of({"w": w.astype(np.float32)}),
                keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 10, keys.TRAIN_LOSS: 0.1}),
                keys.SITE: ConfigRecord({keys.SITE_NAME: f"site-{pid}"}),
            }
        )
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        pid = int(context.node_config[keys.NODE_PARTITION_ID])
        content = RecordDict(
            {
                keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 10, "val-accuracy": 0.5}),
                keys.SITE: ConfigRecord({keys.SITE_NAME: f"site-{pid}"}),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


def _loop(min_sites, on_too_few, rounds=2):
    grid = InProcessGrid(_fake_app(bad_site=1), num_sites=3)
    parts = build_round(exp_with("fedavg"), num_sites=3)
    return run_rounds(
        grid,
        parts,
        initial_arrays=arrays_of({"w": np.zeros(2, np.float32)}),
        num_rounds=rounds,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        timeout=10,
        min_sites=min_sites,
        on_too_few=on_too_few,
        final_site_test=False,
    )


def test_round_loop_records_rejections_and_completes_with_the_others():
    hist = _loop(min_sites=2, on_too_few="continue")
    for rec in hist.rounds:
        assert rec.aggregated and set(rec.sites_train) == {"site-0", "site-2"}
        assert [f["site"] for f in rec.failures] == ["site-1"]
        assert rec.failures[0]["reason"].startswith("rejected update: arrays: array 'w' is not finite")
    np.testing.assert_allclose(hist.arrays["w"].numpy(), [2.0, 2.0])  # +1 per round from the valid sites


def test_too_few_valid_replies_is_reported_and_policy_followed(caplog):
    with caplog.at_level("WARNING"):
        hist = _loop(min_sites=3, on_too_few="continue")
    assert [r.aggregated for r in hist.rounds] == [False, False]
    assert "2 valid replies, 3 required; global model unchanged" in caplog.text
    np.testing.assert_array_equal(hist.arrays["w"].numpy(), [0.0, 0.0])
    with pytest.raises(RoundAborted, match="round 1: 2 valid replies, participation.min_sites=3"):
        _loop(min_sites=3, on_too_few="stop")


# ---- the sites' half ---------------------------------------------------------------------------


def _message(exp, model, kind="train", config=None, extra=None) -> Message:
    cfg = ConfigRecord({keys.EXPERIMENT: exp.to_json(), keys.SERVER_ROUND: 1, **(config or {})})
    content = RecordDict({keys.ARRAYS: ArrayRecord(model.state_dict()), keys.CONFIG: cfg, **(extra or {})})
    return Message(content=content, dst_node_id=1, message_type=kind)


def _context(pid: int, exp, **node) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config={keys.NODE_PARTITION_ID: pid, keys.NODE_NUM_PARTITIONS: exp.partition.num_sites, **node},
        state=RecordDict(),
        run_config={},
    )


def test_fedprox_proximal_term_gradient(flower_identity):
    exp = exp_with("fedprox")
    model = nn.Linear(3, 2)
    msg = _message(exp, model, config={PROXIMAL_MU: 0.5})
    local = SiteStrategy.for_message(msg, _context(0, exp), exp, model)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.weight.add_(1.0)
    local.hooks.extra_loss(model).backward()
    np.testing.assert_allclose(model.weight.grad.numpy(), 0.5 * (model.weight.detach() - w0["weight"]).numpy())
    assert float(proximal_term(model, w0).detach()) == pytest.approx(6.0)  # 6 weights moved by 1
    none = SiteStrategy.for_message(_message(exp, model), _context(0, exp), exp, model)
    assert none.hooks.extra_loss is None and none.hooks.after_backward is None


def test_scaffold_client_control_variate_is_option_ii(flower_identity):
    """One SGD step: y = x - lr (g + c - c_i); with c_i = 0, c_i+ = -c + (x - y)/lr = g."""
    exp = replace(
        exp_with("scaffold"), train=replace(exp_with("scaffold").train, optimizer="sgd", momentum=0.0, lr=0.1)
    )
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    c = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    msg = _message(exp, model, extra={SCAFFOLD_C: ArrayRecord(dict(c.items()))})
    ctx = _context(0, exp)
    local = SiteStrategy.for_message(msg, ctx, exp, model)
    x = {n: p.detach().clone() for n, p in model.named_parameters()}
    xb, yb = torch.randn(8, 4), torch.randint(0, 2, (8,))
    g = torch.autograd.grad(nn.functional.cross_entropy(model(xb), yb), list(model.parameters()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    nn.functional.cross_entropy(model(xb), yb).backward()
    local.hooks.after_backward(model)
    opt.step()
    for (n, p), gn in zip(model.named_parameters(), g, strict=True):
        torch.testing.assert_close(p.detach(), x[n] - 0.1 * (gn + c[n]))
    _, extra, _ = local.after_train(
        model, TrainStats(num_examples=8, num_steps=1, loss=0.1), site=type("S", (), {"name": "site-0"})(), seed=0
    )
    dc = extra[SCAFFOLD_DC]
    for (n, _), gn in zip(model.named_parameters(), g, strict=True):
        torch.testing.assert_close(torch.from_numpy(dc[n].numpy()), gn, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(ctx.state[STATE_CI][n].numpy()), gn, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("steps", "mu", "expected"),
    [
        (4, 0.0, 4.0),  # plain SGD: K
        (1, 0.9, 1.0),  # the first step has no history
        (3, 0.9, 5.61),  # 1 + 1.9 + 2.71
        (4, 0.9, 9.049),  # + 3.439: 2.26 times K, where dividing by K made SCAFFOLD diverge
        (4, 0.5, 6.125),  # 1 + 1.5 + 1.75 + 1.875
        (3, 1.0, 6.0),  # K (K + 1) / 2
        (0, 0.9, 0.0),
    ],
)
def test_scaffold_effective_steps_by_hand(steps, mu, expected):
    assert effective_steps(steps, mu) == pytest.approx(expected)


def test_scaffold_control_variate_with_momentum_is_the_gradient(flower_identity):
    """Three SGD steps with momentum 0.9 on a loss of constant gradient ``g`` (linear in the weights):
    each step adds ``c - c_i`` to ``g``, so y = x - lr (g + c) 5.61 and c_i+ = -c + (x - y)/(5.61 lr) = g
    exactly; dividing by K lr = 3 lr (the diverging estimate) would give 1.87 g + 0.87 c."""
    exp = replace(
        exp_with("scaffold"), train=replace(exp_with("scaffold").train, optimizer="sgd", momentum=0.9, lr=0.1)
    )
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    g = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    c = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    ctx = _context(0, exp)
    local = SiteStrategy.for_message(
        _message(exp, model, extra={SCAFFOLD_C: ArrayRecord(dict(c.items()))}), ctx, exp, model
    )
    x = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        sum((p * g[n]).sum() for n, p in model.named_parameters()).backward()
        local.hooks.after_backward(model)
        opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), x[n] - 0.1 * 5.61 * (g[n] + c[n]))
    _, extra, _ = local.after_train(
        model, TrainStats(num_examples=24, num_steps=3, loss=0.1), site=type("S", (), {"name": "site-0"})(), seed=0
    )
    for n in g:
        torch.testing.assert_close(torch.from_numpy(extra[SCAFFOLD_DC][n].numpy()), g[n], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(ctx.state[STATE_CI][n].numpy()), g[n], rtol=1e-4, atol=1e-5)
    adam = replace(exp, train=replace(exp.train, optimizer="adam"))
    assert SiteStrategy.for_message(_message(adam, model), _context(0, adam), adam, model).runtime.sgd_momentum == 0


def test_fedbn_site_keeps_its_norm_layers(flower_identity):
    exp = exp_with("fedbn")
    model = build_experiment_model(exp)
    norm = [k for k in model.state_dict() if ".1." in k]  # GroupNorm layers of the CNN's first block
    assert norm
    ctx = _context(0, exp)
    cfg = {LOCAL_KEYS: norm}
    reply = simulation_app(_message(exp, model, config=cfg), ctx)
    sent = set(reply.content[keys.ARRAYS].keys())
    assert sent.isdisjoint(norm) and sent | set(norm) == set(model.state_dict())
    kept = {k: a.numpy() for k, a in ctx.state[STATE_LOCAL].items()}
    assert set(kept) == set(norm)
    # the next global model (with fresh norm values) gets the site's own norm layers back
    fresh = build_experiment_model(exp)
    local_model = build_experiment_model(exp)
    local_model.load_state_dict(fresh.state_dict())
    SiteStrategy.for_message(_message(exp, fresh, config=cfg), ctx, exp, local_model)
    for k in norm:
        np.testing.assert_array_equal(local_model.state_dict()[k].numpy(), kept[k])
    assert any(not np.array_equal(fresh.state_dict()[k].numpy(), kept[k]) for k in norm)


def test_ditto_site_keeps_a_personal_model_and_reports_both(flower_identity):
    exp = exp_with("ditto")
    model = build_experiment_model(exp)
    cfg = {DITTO_LAMBDA: 0.1, DITTO_EPOCHS: 1, DITTO_LR: 0.003}
    ctx = _context(1, exp)
    reply = simulation_app(_message(exp, model, config=cfg), ctx)
    assert STATE_PERSONAL in ctx.state
    assert math.isfinite(reply.content[keys.METRICS][f"personal-{keys.TRAIN_LOSS}"])
    ev = simulation_app(_message(exp, model, kind="evaluate", config=cfg), ctx)
    m = ev.content[keys.METRICS]
    assert {"val-accuracy", "personal-val-accuracy", "personal-val-auc", f"personal-{keys.EVAL_LOSS}"} <= set(m)
    assert m[f"personal-{keys.EVAL_LOSS}"] != m[keys.EVAL_LOSS]  # the personal model is another model


def test_sign_flip_attack_formula_and_only_named_sites_are_poisoned(flower_identity):
    g = arrays_of({"w": np.array([1.0, 2.0], np.float32), "n": np.array(3, np.int64)})
    local = arrays_of({"w": np.array([1.5, 1.0], np.float32), "n": np.array(4, np.int64)})
    out = numpy_of(poison(local, g, AttackConfig(kind="sign_flip", sites=("site-0",), scale=10.0)))
    np.testing.assert_allclose(out["w"], [1.0 - 5.0, 2.0 + 10.0])
    assert out["n"] == 4
    exp = replace(exp_with("fedavg"), attack=AttackConfig(kind="nonfinite", sites=("site-0",)))
    model = build_experiment_model(exp)
    simulated = simulation_app(_message(exp, model), _context(0, exp))
    assert any(not np.isfinite(a.numpy()).all() for a in simulated.content[keys.ARRAYS].values())
    other_site = simulation_app(_message(exp, model), _context(1, exp))
    assert all(np.isfinite(a.numpy()).all() for a in other_site.content[keys.ARRAYS].values())


def test_scaffold_site_state_persists_between_rounds(flower_identity):
    exp = replace(exp_with("scaffold"), train=replace(exp_with("scaffold").train, optimizer="sgd", lr=0.05))
    model = build_experiment_model(exp)
    c = ArrayRecord({n: torch.zeros_like(p) for n, p in model.named_parameters()})
    ctx = _context(0, exp)
    r1 = simulation_app(_message(exp, model, extra={SCAFFOLD_C: c}), ctx)
    ci1 = numpy_of(ctx.state[STATE_CI])
    dc1 = numpy_of(r1.content[SCAFFOLD_DC])
    for k in ci1:
        np.testing.assert_allclose(ci1[k], dc1[k], rtol=1e-6)  # c_i started at zero
    simulation_app(_message(exp, model, extra={SCAFFOLD_C: c}), ctx)
    assert any(not np.allclose(numpy_of(ctx.state[STATE_CI])[k], ci1[k]) for k in ci1)


def test_local_hooks_plug_into_train_epochs():
    """The hooks are what train_epochs calls: a huge proximal pull keeps the weights at home."""
    torch.manual_seed(0)
    exp = exp_with("fedprox")
    from medflower.simulation.sites import build_sites

    site = build_sites(exp)[0]
    model = build_experiment_model(exp)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    hooks = LocalHooks(extra_loss=lambda m: 0.5 * 1e4 * proximal_term(m, w0))
    opt = torch.optim.SGD(model.parameters(), lr=1e-5)
    train_epochs(model, make_loader(site.train, 32, 0), opt, epochs=1, task="classification", hooks=hooks)
    moved = sum(float(((p.detach() - w0[n]) ** 2).sum()) for n, p in model.named_parameters())
    model2 = build_experiment_model(exp)
    model2.load_state_dict({**model2.state_dict(), **w0})
    opt2 = torch.optim.SGD(model2.parameters(), lr=1e-5)
    train_epochs(model2, make_loader(site.train, 32, 0), opt2, epochs=1, task="classification")
    moved_free = sum(float(((p.detach() - w0[n]) ** 2).sum()) for n, p in model2.named_parameters())
    assert moved < moved_free
