"""The model a federation releases: the last global model, or an average of the recent ones.

The round pipeline (:mod:`medflower.server.loop`) trains the sites from the global model and
evaluates, records and saves the *released* one. With ``strategy.ema_decay`` β > 0 that is an
exponential moving average of the global models (Polyak–Ruppert averaging, as De et al. 2022 use
for DP-SGD: under DP the noise added each step makes the weights random-walk, and an average of
the iterates cancels part of it). It only reads models the coordinator already holds, so it is
post-processing: no privacy cost, and nothing changes for the sites.

Why it is written here: Flower's strategies aggregate one round's replies and keep no average
across rounds, Opacus averages nothing, and torch's ``swa_utils.AveragedModel`` averages an
``nn.Module`` the coordinator does not build; this works on the ``ArrayRecord`` it does hold.
Its state (the average) is in the checkpoint, so a resumed run continues the same average.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord


def ema_update(
    released: dict[str, np.ndarray] | None, global_: dict[str, np.ndarray], decay: float
) -> dict[str, np.ndarray]:
    """``decay·released + (1−decay)·global`` for floating arrays; other arrays (counters) follow ``global_``.

    ``released`` None (the first round) starts the average at ``global_``. Computed in float64 and
    stored in each array's own dtype.
    """
    if released is None:
        return {k: v.copy() for k, v in global_.items()}
    out: dict[str, np.ndarray] = {}
    for k, g in global_.items():
        r = released.get(k)
        if r is None or r.shape != g.shape or not np.issubdtype(g.dtype, np.floating):
            out[k] = g.copy()
        else:
            out[k] = (decay * r.astype(np.float64) + (1.0 - decay) * g.astype(np.float64)).astype(g.dtype)
    return out


class ReleasedModel:
    """Keeps the released model: the global model, or (``decay`` > 0) its exponential moving average."""

    def __init__(self, *, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay: must be in [0, 1), got {decay}")
        self.decay = decay
        self._average: dict[str, np.ndarray] | None = None

    def update(self, arrays: ArrayRecord) -> ArrayRecord:
        """After a round that changed the global model ``arrays``: the model to release."""
        if self.decay == 0.0:
            return arrays
        self._average = ema_update(self._average, {k: a.numpy() for k, a in arrays.items()}, self.decay)
        return self.current(arrays)

    def current(self, arrays: ArrayRecord) -> ArrayRecord:
        """The model to release now (``arrays``, the global model, until there is an average)."""
        if self._average is None:
            return arrays
        return ArrayRecord({k: Array(np.array(v, order="C")) for k, v in self._average.items()})

    def state_dict(self) -> dict[str, Any]:
        return {"average": None if self._average is None else dict(self._average)}  # decay: from the config

    def load_state_dict(self, state: dict[str, Any]) -> None:
        average = state.get("average")
        self._average = None if average is None else {k: np.asarray(v) for k, v in average.items()}
