"""The released model: ``strategy.ema_decay``'s moving average of the global models (server/release.py)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from medflower import keys
from medflower.config import ConfigError, ExperimentConfig, quickstart_experiment
from medflower.server.build import build_round
from medflower.server.loop import run_rounds
from medflower.server.release import ReleasedModel, ema_update
from medflower.simulation.inprocess import InProcessGrid
from medflower.strategies.testing import arrays_of


def test_the_average_by_hand() -> None:
    a = ema_update(None, {"w": np.array([2.0, 4.0], np.float32)}, 0.75)
    np.testing.assert_array_equal(a["w"], [2.0, 4.0])  # the first global model starts it
    a = ema_update(a, {"w": np.array([6.0, 0.0], np.float32)}, 0.75)
    np.testing.assert_array_equal(a["w"], [3.0, 3.0])  # 0.75*2 + 0.25*6, 0.75*4 + 0.25*0
    assert a["w"].dtype == np.float32


def test_counters_and_reshaped_arrays_follow_the_global_model() -> None:
    old = {"steps": np.array(3, np.int64), "w": np.zeros(2, np.float32)}
    new = {"steps": np.array(5, np.int64), "w": np.ones(3, np.float32)}
    got = ema_update(old, new, 0.5)
    assert int(got["steps"]) == 5 and got["steps"].dtype == np.int64
    np.testing.assert_array_equal(got["w"], np.ones(3))


def test_decay_zero_releases_the_global_model_itself() -> None:
    g = arrays_of({"w": np.ones(2, np.float32)})
    assert ReleasedModel(decay=0.0).update(g) is g


def test_the_state_restores_the_average() -> None:
    first = ReleasedModel(decay=0.5)
    first.update(arrays_of({"w": np.array([4.0], np.float32)}))
    second = ReleasedModel(decay=0.5)
    second.load_state_dict(first.state_dict())
    got = second.update(arrays_of({"w": np.array([0.0], np.float32)}))
    np.testing.assert_array_equal(got["w"].numpy(), [2.0])


def test_a_decay_of_one_or_more_is_refused_naming_the_key() -> None:
    raw = quickstart_experiment().to_dict()
    raw["strategy"]["ema_decay"] = 1.0
    with pytest.raises(ConfigError, match=r"strategy.ema_decay: must be < 1"):
        ExperimentConfig.from_dict(raw)
    with pytest.raises(ValueError, match="decay"):
        ReleasedModel(decay=-0.1)


def _counting_app() -> ClientApp:
    """Sites that add 1 to the weight they receive, and report the weight they evaluated."""
    app = ClientApp()

    def site(context: Context) -> ConfigRecord:
        return ConfigRecord({keys.SITE_NAME: f"site-{int(context.node_config[keys.NODE_PARTITION_ID])}"})

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        w = msg.content[keys.ARRAYS]["w"].numpy() + 1.0
        content = RecordDict(
            {
                keys.ARRAYS: arrays_of({"w": w.astype(np.float32)}),
                keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 10, keys.TRAIN_LOSS: 0.1}),
                keys.SITE: site(context),
            }
        )
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        w = float(msg.content[keys.ARRAYS]["w"].numpy()[0])
        metrics = MetricRecord({keys.NUM_EXAMPLES: 10, "val-w": w})
        return Message(content=RecordDict({keys.METRICS: metrics, keys.SITE: site(context)}), reply_to=msg)

    return app


def test_sites_train_from_the_global_model_and_evaluate_the_average() -> None:
    exp = quickstart_experiment()
    exp = replace(exp, strategy=replace(exp.strategy, ema_decay=0.5))
    tested: list[float] = []
    hist = run_rounds(
        InProcessGrid(_counting_app(), num_sites=2),
        build_round(exp, num_sites=2),
        initial_arrays=arrays_of({"w": np.zeros(1, np.float32)}),
        num_rounds=3,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        timeout=10,
        evaluate_fn=lambda rnd, arrays: tested.append(float(arrays["w"].numpy()[0])) or {},
        final_site_test=False,
    )
    # global models 1, 2, 3 (each site adds 1 to what it was sent); their average 1, 1.5, 2.25
    assert [r.evaluate["val-w"] for r in hist.rounds] == [1.0, 1.5, 2.25]
    assert tested == [0.0, 1.0, 1.5, 2.25]  # the initial model, then the released one
    np.testing.assert_array_equal(hist.arrays["w"].numpy(), [2.25])
