"""The site's privacy ledger: equals an independent accountant, grows across rounds, survives restarts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from medflower import keys
from medflower.client.privacy import PrivacyLedger, RoundPrivacy, load_ledger, site_plan
from medflower.client.state import node_ledger_place
from medflower.config import ExperimentConfig
from medflower.modelspec import build_experiment_model
from medflower.simulation.clientapp import app as simulation_app
from medflower.simulation.sites import build_sites

DELTA = 1e-5


def _exp(**privacy) -> ExperimentConfig:
    return ExperimentConfig.from_dict(
        {
            "data": {"kind": "synthetic", "synthetic_samples": 240, "synthetic_size": 16},
            "partition": {"kind": "iid", "num_sites": 2},
            "train": {"rounds": 3, "batch_size": 16, "lr": 0.003},
            "privacy": {"mode": "sample", "target_epsilon": 4.0, "target_delta": DELTA, **privacy},
        }
    )


def _message(exp: ExperimentConfig, server_round: int) -> Message:
    cfg = ConfigRecord({keys.EXPERIMENT: exp.to_json(), keys.SERVER_ROUND: server_round})
    arrays = ArrayRecord(build_experiment_model(exp).state_dict())
    return Message(content=RecordDict({keys.ARRAYS: arrays, keys.CONFIG: cfg}), dst_node_id=1, message_type="train")


def _context(**node) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config={keys.NODE_PARTITION_ID: 0, keys.NODE_NUM_PARTITIONS: 2, **node},
        state=RecordDict(),
        run_config={},
    )


def _independent_epsilon(q: float, sigma: float, steps: int, delta: float = DELTA) -> float:
    """Google's dp-accounting RDP accountant: Poisson-subsampled Gaussian, composed ``steps`` times."""
    from dp_accounting import dp_event, rdp

    acc = rdp.RdpAccountant()
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), int(steps))
    return float(acc.get_epsilon(delta))


def test_reported_epsilon_equals_dp_accounting_and_grows(flower_identity) -> None:
    exp = _exp()
    plan = site_plan(exp, site="site-0", num_train=len(build_sites(exp)[0].train))
    ctx = _context()
    eps = []
    for rnd in (1, 2, 3):
        m = simulation_app(_message(exp, rnd), ctx).content[keys.METRICS]
        assert m[keys.DP_STEPS] == rnd * plan.steps_per_round  # the run-long history, not one round's
        assert m[keys.DP_NOISE_MULTIPLIER] == plan.noise_multiplier  # one sigma, planned for the whole run
        ref = _independent_epsilon(plan.sample_rate, plan.noise_multiplier, int(m[keys.DP_STEPS]))
        assert m[keys.DP_EPSILON] == pytest.approx(ref, rel=0.01)
        assert m[keys.DP_EXHAUSTED] == 0
        eps.append(m[keys.DP_EPSILON])
    assert eps[0] < eps[1] < eps[2] <= exp.privacy.target_epsilon
    # the noise was derived from all 3 rounds: the whole budget is (nearly) spent at the end, not after round 1
    assert eps[2] > 0.97 * exp.privacy.target_epsilon and eps[0] < 0.8 * exp.privacy.target_epsilon


def test_restarted_client_continues_its_ledger(flower_identity, tmp_path: Path) -> None:
    exp = _exp()
    plan = site_plan(exp, site="site-0", num_train=len(build_sites(exp)[0].train))
    simulation_app(_message(exp, 1), _context(**{keys.NODE_STATE_DIR: str(tmp_path)}))
    assert len(list(tmp_path.glob("privacy-ledger-site-0-*.json"))) == 1  # one ledger per site and data set
    # the node restarts: Flower's context.state is gone, the state folder is not
    m = simulation_app(_message(exp, 2), _context(**{keys.NODE_STATE_DIR: str(tmp_path)})).content[keys.METRICS]
    assert m[keys.DP_STEPS] == 2 * plan.steps_per_round
    assert m[keys.DP_EPSILON] == pytest.approx(
        _independent_epsilon(plan.sample_rate, plan.noise_multiplier, 2 * plan.steps_per_round), rel=0.01
    )
    # without the state folder, a restarted node would have started over (what the ledger prevents)
    fresh = simulation_app(_message(exp, 2), _context()).content[keys.METRICS]
    assert fresh[keys.DP_STEPS] == plan.steps_per_round and fresh[keys.DP_EPSILON] < m[keys.DP_EPSILON]


def test_a_round_that_crashed_is_charged(tmp_path: Path) -> None:
    exp = _exp()
    ctx = _context(**{keys.NODE_STATE_DIR: str(tmp_path)})
    place = node_ledger_place(ctx, exp, "site-0")
    rp = RoundPrivacy.start(exp, ctx, site="site-0", num_train=100, server_round=1, place=place)
    assert rp.refusal is None
    # the process dies here (no finish): the write-ahead record is in the state folder
    restarted = load_ledger(_context(), site="site-0", mechanism="rdp", place=place)
    assert restarted.steps == rp.plan.steps_per_round and restarted.pending is None


def test_site_refuses_when_the_next_round_would_exceed_its_budget(flower_identity) -> None:
    # fixed noise: the budget is a cap; 0.5 is below what one round spends at sigma=0.8
    exp = _exp(noise_multiplier=0.8, target_epsilon=0.5)
    ctx = _context()
    reply = simulation_app(_message(exp, 1), ctx)
    m = reply.content[keys.METRICS]
    assert m[keys.DP_EXHAUSTED] == 1 and m[keys.NUM_EXAMPLES] == 0 and m[keys.DP_EPSILON] == 0.0
    assert m[keys.DP_EPSILON_NEXT] > 0.5
    assert keys.ARRAYS not in reply.content.array_records  # nothing trained, nothing sent
    assert load_ledger(ctx, site="site-0", mechanism="rdp").steps == 0


def test_hospital_node_config_makes_the_budget_stricter() -> None:
    exp = _exp()
    strict = RoundPrivacy.start(
        exp, _context(**{keys.NODE_DP_TARGET_EPSILON: 1.0}), site="site-0", num_train=100, server_round=1
    )
    loose = RoundPrivacy.start(
        exp, _context(**{keys.NODE_DP_TARGET_EPSILON: 40.0}), site="site-0", num_train=100, server_round=1
    )
    assert strict.plan.target_epsilon == 1.0 and loose.plan.target_epsilon == 4.0
    assert strict.plan.noise_multiplier > loose.plan.noise_multiplier


def test_ledger_file_roundtrip_and_errors(tmp_path: Path) -> None:
    led = PrivacyLedger(site="site-0", mechanism="rdp")
    led.begin(server_round=1, noise_multiplier=1.1, sample_rate=0.1, steps=10)
    led.accountant.step(noise_multiplier=1.1, sample_rate=0.1)  # what Opacus' optimizer hook does
    led.commit()  # 9 steps were skipped (empty batches): charged anyway
    assert led.steps == 10 and led.rounds == [{"round": 1, "steps": 10, "noise_multiplier": 1.1, "sample_rate": 0.1}]
    path = tmp_path / "ledger.json"
    led.save(path)
    back = PrivacyLedger.load(path, site="site-0", mechanism="rdp")
    assert back.steps == 10 and back.epsilon(DELTA) == pytest.approx(led.epsilon(DELTA))
    with pytest.raises(ValueError, match="kept with the 'rdp' accountant but privacy.accountant is 'prv'"):
        PrivacyLedger.load(path, site="site-0", mechanism="prv")
    with pytest.raises(ValueError, match="it belongs to site 'site-0', not 'site-1'"):
        PrivacyLedger.load(path, site="site-1", mechanism="rdp")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        PrivacyLedger.load(path, site="site-0", mechanism="rdp")


def test_prv_ledger_matches_opacus_prv() -> None:
    from opacus.accountants import PRVAccountant

    led = PrivacyLedger(site="s", mechanism="prv")
    for _ in range(40):
        led.accountant.step(noise_multiplier=1.0, sample_rate=0.05)
    ref = PRVAccountant()
    ref.history = [(1.0, 0.05, 40)]
    eps = led.epsilon(DELTA)
    assert math.isfinite(eps) and eps == pytest.approx(ref.get_epsilon(DELTA), rel=1e-6)
    assert led.projected_epsilon(DELTA, noise_multiplier=1.0, sample_rate=0.05, steps=40) > eps
