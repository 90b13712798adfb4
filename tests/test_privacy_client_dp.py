"""Client-level DP: Flower's wrappers and accountant, epsilon per round, uniform weights, budget stop."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from medflower import keys
from medflower.config import ExperimentConfig
from medflower.schema import ConfigError
from medflower.server.build import RoundParts, build_round
from medflower.server.loop import RoundPipeline, RoundRecord
from medflower.server.screens import Screened
from medflower.strategies.privacy import ClientLevelDP

DELTA = 1e-5


class _Grid:
    """What FedAvg's configure_* read from a Grid: the connected node ids."""

    def get_node_ids(self) -> list[int]:
        return [11, 12, 13]


def _exp(**privacy) -> ExperimentConfig:
    return ExperimentConfig.from_dict(
        {
            "data": {"kind": "synthetic", "synthetic_samples": 100, "synthetic_size": 16},
            "partition": {"num_sites": 3},
            "train": {"rounds": 3},
            "privacy": {"mode": "client", "target_epsilon": 5.0, "target_delta": DELTA, **privacy},
        }
    )


def _arrays(value: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full((4,), value, dtype=np.float32))})


def _replies(msgs: list[Message], sizes=(10, 50, 200)) -> list[Message]:
    out = []
    for i, (msg, n) in enumerate(zip(msgs, sizes[: len(msgs)], strict=True)):
        content = RecordDict(
            {
                keys.ARRAYS: _arrays(float(i + 1)),
                keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: n, keys.TRAIN_LOSS: 0.5}),
                keys.SITE: ConfigRecord({keys.SITE_NAME: f"site-{i}"}),
            }
        )
        out.append(Message(content=content, reply_to=msg))
    return out


def _gaussian_epsilon(sigma: float, releases: int) -> float:
    from dp_accounting import dp_event, rdp

    acc = rdp.RdpAccountant()
    acc.compose(dp_event.GaussianDpEvent(sigma), releases)
    return float(acc.get_epsilon(DELTA))


def _round(parts: RoundParts, rnd: int):
    """The pipeline's configure and aggregate stages on replies from sites of 10, 50 and 200 samples."""
    pipe = RoundPipeline(_Grid(), parts, timeout=10)  # type: ignore[arg-type]  # only get_node_ids is used
    msgs = pipe.configure(rnd, _arrays(0.0), ConfigRecord({}))
    if not msgs:
        return None, None
    rec = RoundRecord(round=rnd, sites_asked=len(msgs))
    arrays = pipe.aggregate(rnd, Screened(valid=_replies(msgs)), _arrays(0.0), rec)
    return (arrays if rec.aggregated else None), rec.train


@pytest.mark.parametrize("clipping,side", [("fixed", "server"), ("adaptive", "server")])
def test_epsilon_per_round_equals_dp_accounting_and_stops_at_budget(flower_identity, clipping: str, side: str) -> None:
    exp = _exp(clipping=clipping, clipping_side=side, clipped_count_stddev=2.0)
    parts = build_round(exp, num_sites=3)
    dp = parts.privacy
    assert isinstance(dp, ClientLevelDP)
    eps = []
    for rnd in (1, 2, 3):
        arrays, metrics = _round(parts, rnd)
        assert arrays is not None  # sites of 10, 50 and 200 samples: weights made uniform, so Flower accepts them
        eps.append(metrics[keys.DP_EPSILON])
        assert eps[-1] == pytest.approx(_gaussian_epsilon(dp.noise_multiplier, rnd), rel=0.01)
    assert eps[0] < eps[1] < eps[2] <= 5.0 and eps[2] > 0.97 * 5.0  # sigma planned for all 3 rounds
    # a 4th round would exceed the budget: no training is configured, the run carries on
    assert _round(parts, 4) == (None, None) and dp.exhausted
    assert dp.epsilon() == pytest.approx(eps[2])


def test_restarted_coordinator_continues_the_accountant(flower_identity) -> None:
    exp = _exp()
    first = build_round(exp, num_sites=3)
    _round(first, 1)
    state = first.state_dict()
    again = build_round(exp, num_sites=3)
    again.load_state_dict(state)
    _, metrics = _round(again, 2)
    assert metrics[keys.DP_EPSILON] == pytest.approx(_gaussian_epsilon(again.privacy.noise_multiplier, 2), rel=0.01)


def test_client_dp_needs_a_mean_aggregation() -> None:
    """Refused when the YAML is loaded, with the reason the method's module declares."""
    with pytest.raises(
        ConfigError, match="privacy.mode 'client' cannot be combined with strategy.name 'fedmedian': client-level DP"
    ):
        ExperimentConfig.from_dict(
            {"partition": {"num_sites": 3}, "strategy": {"name": "fedmedian"}, "privacy": {"mode": "client"}}
        )


def test_adaptive_count_noise_too_low_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="privacy.clipped_count_stddev: 0.15 .* too low for adaptive clipping"):
        build_round(_exp(clipping="adaptive"), num_sites=3)


def test_client_side_clipping_mod_clips_the_update(flower_identity) -> None:
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    from medflower.client.privacy import client_dp_mod

    exp = _exp(clipping_side="client", clipping_norm=0.5)
    cfg = ConfigRecord({keys.EXPERIMENT: exp.to_json(), KEY_CLIPPING_NORM: 0.5})
    msg = Message(
        content=RecordDict({keys.ARRAYS: _arrays(0.0), keys.CONFIG: cfg}), dst_node_id=1, message_type="train"
    )
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = client_dp_mod(msg, ctx, lambda m, c: _replies([m])[0])
    update = reply.content[keys.ARRAYS]["w"].numpy()
    assert np.linalg.norm(update) == pytest.approx(0.5, rel=1e-5)  # |(1,1,1,1)| = 2 clipped to 0.5
    # without the server's clipping norm, the mod is a pass-through
    plain = Message(
        content=RecordDict({keys.ARRAYS: _arrays(0.0), keys.CONFIG: ConfigRecord({keys.EXPERIMENT: exp.to_json()})}),
        dst_node_id=1,
        message_type="train",
    )
    assert (
        np.linalg.norm(client_dp_mod(plain, ctx, lambda m, c: _replies([m])[0]).content[keys.ARRAYS]["w"].numpy())
        == 2.0
    )
