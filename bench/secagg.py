"""Secure aggregation: time and bytes per round, SecAgg+ against plain FedAvg, at 3, 10 and 50 sites.

    nice -n 10 python bench/secagg.py [--sites 3 10 50] [--models cnn unet] [--rounds 3] [--out FILE]

What is measured is the protocol, not the training: every simulated site is a stub that answers a
train message with the global model plus a small random update (SYNTHETIC; no data, no training),
behind the same ``secagg_mod`` as medflower's ClientApp, and the coordinator runs medflower's real
round (:class:`medflower.server.loop.RoundPipeline`, with the SecAgg+ stage or the plain
send/collect). Sites run one after the other in this process (:class:`InProcessGrid`), so the
seconds are the whole federation's CPU time for one round: the sites' key agreement, secret
sharing and masking plus the coordinator's unmasking. Bytes are Flower's wire encoding of every
message both ways (``flwr.common.serde.message_to_proto``), summed per round.

Models: medflower's small CNN (28x28 inputs) and MONAI's 2-D U-Net (64x64), as the experiment
config builds them. The median over ``--rounds`` rounds is printed as a markdown row per setting, and
each row is appended as JSON to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a script: the checkout's medflower, installed or not

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.serde import message_to_proto  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from medflower import keys, records  # noqa: E402
from medflower.client.secagg import secagg_mod  # noqa: E402
from medflower.config import ExperimentConfig  # noqa: E402
from medflower.modelspec import build_experiment_model  # noqa: E402
from medflower.server.build import build_round  # noqa: E402
from medflower.server.loop import RoundPipeline  # noqa: E402
from medflower.simulation.inprocess import InProcessGrid  # noqa: E402

MODELS: dict[str, dict[str, Any]] = {
    "cnn": {"model": {"name": "cnn"}},
    "unet": {
        "task": "segmentation",
        "model": {"name": "unet", "spatial_dims": 2},
        "data": {"kind": "synthetic", "synthetic_size": 64},
    },
}


def experiment(model: str, sites: int, secagg: bool) -> ExperimentConfig:
    data = {
        **MODELS[model],
        "partition": {"num_sites": sites, "kind": "iid"},
        "strategy": {"name": "fedavg", "fraction_evaluate": 0.0},
        "secure_aggregation": {"mode": "secagg+" if secagg else "none"},
    }
    return ExperimentConfig.from_dict(data)


def stub_app() -> ClientApp:
    """A SYNTHETIC site: global model + N(0, 1e-3) per coordinate, 100 examples; no data, no training."""
    app = ClientApp()

    @app.train(mods=[secagg_mod])
    def train(msg: Message, context: Context) -> Message:
        rng = np.random.default_rng(int(context.node_id))
        arrays = records.arrays(msg, keys.ARRAYS)
        out = {}
        for k, a in arrays.items():
            x = a.numpy()
            noise = rng.normal(0, 1e-3, size=x.shape).astype(x.dtype) if x.dtype.kind == "f" else 0
            out[k] = Array(np.array(x + noise, order="C"))
        content = RecordDict(
            {
                keys.ARRAYS: ArrayRecord(out),
                keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 100, keys.TRAIN_LOSS: 0.0}),
                keys.SITE: ConfigRecord({keys.SITE_NAME: f"site-{context.node_id}"}),
            }
        )
        return Message(content, reply_to=msg)

    return app


class CountingGrid(InProcessGrid):
    """Counts the wire bytes of every message sent and received."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bytes = 0

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        msgs = list(messages)
        self.bytes += sum(len(message_to_proto(m).SerializeToString()) for m in msgs)
        replies = list(super().send_and_receive(msgs, timeout=timeout))
        self.bytes += sum(len(message_to_proto(r).SerializeToString()) for r in replies)
        return replies


def measure(model: str, sites: int, secagg: bool, rounds: int) -> dict[str, Any]:
    exp = experiment(model, sites, secagg)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    grid = CountingGrid(stub_app(), num_sites=sites)
    parts = build_round(exp, num_sites=sites)
    pipe = RoundPipeline(grid, parts, timeout=600.0)
    net = build_experiment_model(exp)
    arrays = ArrayRecord(net.state_dict())
    base = ConfigRecord({keys.EXPERIMENT: exp.to_json()})
    seconds, sizes = [], []
    for rnd in range(1, rounds + 1):
        grid.bytes = 0
        t0 = time.perf_counter()
        arrays, rec = pipe.run_round(rnd, arrays, base, base)
        seconds.append(time.perf_counter() - t0)
        sizes.append(grid.bytes)
        if not rec.aggregated or rec.failures:
            raise RuntimeError(f"round {rnd} failed: {rec.failures} {rec.secure_aggregation}")
    return {
        "model": model,
        "parameters": sum(p.numel() for p in net.parameters()),
        "sites": sites,
        "mode": "secagg+" if secagg else "plain",
        "seconds_per_round": statistics.median(seconds),
        "bytes_per_round": statistics.median(sizes),
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, nargs="+", default=[3, 10, 50])
    ap.add_argument("--models", nargs="+", default=["cnn", "unet"], choices=sorted(MODELS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    print("| model | sites | plain s/round | SecAgg+ s/round | ratio | plain MB/round | SecAgg+ MB/round | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models:
        for sites in args.sites:
            plain = measure(model, sites, False, args.rounds)
            secure = measure(model, sites, True, args.rounds)
            if args.out is not None:
                with args.out.open("a", encoding="utf-8") as f:
                    for row in (plain, secure):
                        f.write(json.dumps(row) + "\n")
            p_s, s_s = plain["seconds_per_round"], secure["seconds_per_round"]
            p_b, s_b = plain["bytes_per_round"] / 1e6, secure["bytes_per_round"] / 1e6
            print(
                f"| {model} ({plain['parameters']:,} parameters) | {sites} | {p_s:.3f} | {s_s:.3f} | "
                f"{s_s / p_s:.1f}x | {p_b:.2f} | {s_b:.2f} | {s_b / p_b:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
