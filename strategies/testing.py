"""Build Flower replies by hand, to test a strategy's aggregation without running any site.

Flower's Message constructor needs a task identity (set by the SuperLink) and replies need a
message to reply to; these helpers provide both, so a test can write "site-0 sends these arrays
with 30 examples" in one line and feed the strategy exactly what the round loop would.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from medflower import keys

_ids = itertools.count(1)


def set_task_identity(run_id: int = 1) -> None:
    """What the SuperLink sets before a ServerApp runs (Flower's ``start_grid`` does the same)."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID


def arrays_of(d: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.array(v, order="C")) for k, v in d.items()})


def numpy_of(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in rec.items()}


def make_reply(
    arrays: dict[str, np.ndarray] | ArrayRecord | None,
    *,
    num_examples: float,
    site: str,
    node_id: int | None = None,
    extra_records: dict[str, ArrayRecord] | None = None,
    metrics: dict[str, float] | None = None,
    message_type: str = "train",
) -> Message:
    """A site's reply as the round loop receives it: arrays, MetricRecord (weight first), site name."""
    nid = node_id if node_id is not None else 1000 + next(_ids)
    content = RecordDict(
        {
            keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: num_examples, **(metrics or {})}),
            keys.SITE: ConfigRecord({keys.SITE_NAME: site}),
        }
    )
    if arrays is not None:
        content[keys.ARRAYS] = arrays if isinstance(arrays, ArrayRecord) else arrays_of(arrays)
    for k, rec in (extra_records or {}).items():
        content[k] = rec
    meta = Metadata(
        run_id=1,
        message_id=f"reply-{next(_ids)}",
        src_node_id=nid,
        dst_node_id=SUPERLINK_NODE_ID,
        reply_to_message_id=f"ins-{nid}",
        group_id="",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )
    # Flower builds replies with metadata inside the SuperLink; its public overloads do not declare it
    return Message(content=content, metadata=meta)  # type: ignore[call-overload]


class StubGrid(Grid):
    """A grid with ``num_nodes`` connected nodes that only samples (for ``configure_train``)."""

    def __init__(self, num_nodes: int) -> None:
        set_task_identity()
        self.nodes = list(range(1001, 1001 + num_nodes))

    def set_run(self, run):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError
