"""A Flower ``Grid`` that runs the ClientApp in this process, one site after the other.

Why, next to Flower's simulation engine (:mod:`medflower.simulation.runner`): a strategy benchmark runs
hundreds of short federations, and on a 2-core machine Ray's start-up and worker processes cost
more than the training. This grid hands each message to the *same* ``ClientApp`` object (the
simulation's ``medflower.simulation.clientapp:app``, mods included) with a per-site ``Context``
whose ``state`` persists across rounds, exactly what a SuperNode does, and the *same*
``run_server`` drives it; only the transport is gone (no serialization, sites run sequentially).
``medflower simulate``'s ``local`` engine (:mod:`medflower.simulation.local`) runs on it.

Flower has no public in-process grid (``InMemoryGrid`` needs a SuperLink state), so it is written
here; it sets Flower's ``TaskIdentity`` as Flower's own legacy ``start_grid`` does.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from medflower import keys
from medflower.server.app import run_server
from medflower.simulation.clientapp import app as simulation_app

CLIENT_EXCEPTION = 0  # Error.code for an exception raised by the ClientApp


class InProcessGrid(Grid):
    """``num_sites`` simulated SuperNodes (node ids 1001..) calling ``client_app`` in-process."""

    def __init__(
        self,
        client_app: ClientApp,
        *,
        num_sites: int,
        run_id: int = 1,
        node_configs: list[dict[str, Any]] | None = None,
    ) -> None:
        if num_sites < 1:
            raise ValueError(f"num_sites must be >= 1, got {num_sites}")
        configs = node_configs or [
            {keys.NODE_PARTITION_ID: i, keys.NODE_NUM_PARTITIONS: num_sites} for i in range(num_sites)
        ]
        if len(configs) != num_sites:
            raise ValueError(f"node_configs has {len(configs)} entries for num_sites={num_sites}")
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        self.contexts = {
            1001 + i: Context(run_id=run_id, node_id=1001 + i, node_config=dict(cfg), state=RecordDict(), run_config={})
            for i, cfg in enumerate(configs)
        }
        self.dropped: set[int] = set()  # node ids that do not answer (tests of participation)
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.dropped]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("InProcessGrid answers synchronously: use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("InProcessGrid answers synchronously: use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # what the SuperLink does
            node = int(msg.metadata.dst_node_id)
            if node in self.dropped or node not in self.contexts:
                continue  # no reply: the round loop records the silence
            try:
                reply = self.client_app(msg, self.contexts[node])
            except Exception as err:
                reason = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}"
                reply = Message(Error(code=CLIENT_EXCEPTION, reason=reason), reply_to=msg)
            reply.metadata.__dict__["_message_id"] = str(uuid4())
            replies.append(reply)
        return replies


def simulate_inprocess(exp: Any, out_dir: Any, *, grid: InProcessGrid | None = None) -> dict[str, Any]:
    """Run ``exp`` through ``medflower.server.app.run_server`` on an :class:`InProcessGrid` (a new one with
    the simulation's ClientApp unless given); returns the summary."""
    grid = grid or InProcessGrid(simulation_app, num_sites=exp.partition.num_sites)
    path = run_server(grid, exp, Path(out_dir))
    return json.loads(Path(path).read_text())
