"""SCAFFOLD (Karimireddy et al., ICML 2020): control variates against client drift, server half.

Flower ships no SCAFFOLD, so it is written here on top of Flower's FedAvg (sampling, messages and
metric aggregation are FedAvg's). The client half is :mod:`medflower.client.strategy_hooks`.

Protocol (option II of the paper):

* train messages carry the server control variate ``c`` as an extra ArrayRecord
  (``keys.SCAFFOLD_C``) over the model's trainable parameters;
* a site corrects every local gradient by ``c - c_i`` (``c_i``: its own control variate, kept in
  its persistent ``context.state``), and after ``K`` local steps at learning rate ``lr`` sets
  ``c_i+ = c_i - c + (x - y_i) / (K * lr)``; it replies with its model ``y_i`` and
  ``dc_i = c_i+ - c_i`` (ArrayRecord ``keys.SCAFFOLD_DC``);
* the server sets ``x <- x + eta_g * (avg(y_i) - x)`` and ``c <- c + (|S| / N) * mean(dc_i)``,
  with ``N`` the number of sites in the federation and ``S`` those that replied.

Deviation from the paper, on purpose: ``avg(y_i)`` is weighted by ``num-examples`` as in FedAvg
(the paper averages uniformly); with equal site sizes the two agree. The control variate update is
the paper's uniform mean. The ``(x - y_i)/(K lr)`` estimate assumes plain SGD: use
``train.optimizer: sgd`` (medflower warns otherwise).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from medflower import keys


class Scaffold(FedAvg):
    """SCAFFOLD's server: model average plus the server control variate ``c`` (see module doc).

    ``param_keys`` are the model's trainable parameters (the keys ``c`` covers); ``num_sites`` is
    ``N`` in the control-variate update.
    """

    def __init__(
        self, *, param_keys: Sequence[str], num_sites: int, server_learning_rate: float = 1.0, **fedavg_kwargs: Any
    ) -> None:
        if num_sites < 1:
            raise ValueError(f"num_sites must be >= 1, got {num_sites}")
        if not server_learning_rate > 0:
            raise ValueError(f"server_learning_rate must be > 0, got {server_learning_rate}")
        if not param_keys:
            raise ValueError("param_keys is empty: SCAFFOLD needs the model's trainable parameter names")
        super().__init__(**fedavg_kwargs)
        self.param_keys = list(param_keys)
        self.num_sites = num_sites
        self.server_learning_rate = server_learning_rate
        self.c: dict[str, np.ndarray] | None = None
        self.current: dict[str, np.ndarray] | None = None

    def summary(self) -> None:
        log(
            INFO,
            "\t├──> SCAFFOLD settings: server learning rate %s, %d sites, control variate over %d arrays",
            self.server_learning_rate,
            self.num_sites,
            len(self.param_keys),
        )
        super().summary()

    # -- state (strategies.state) ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        from medflower.strategies.state import put_arrays

        out: dict[str, Any] = {}
        put_arrays(out, "c", self.c)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> set[str]:
        """Restore ``c`` (an empty dict resets it); returns the keys it used."""
        from medflower.strategies.state import get_arrays

        used: set[str] = set()
        c = get_arrays(state, "c", used)
        if c is not None and set(c) != set(self.param_keys):
            raise ValueError("strategy state: SCAFFOLD's control variate keys differ from the model's parameters")
        self.c = c
        return used

    # -- rounds ------------------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = {k: a.numpy() for k, a in arrays.items()}
        missing = [k for k in self.param_keys if k not in self.current]
        if missing:
            raise ValueError(f"SCAFFOLD: parameter(s) {missing[:3]} are not in the global model")
        if self.c is None:
            self.c = {k: np.zeros_like(self.current[k]) for k in self.param_keys}
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        c_record = ArrayRecord({k: Array(np.array(v, order="C")) for k, v in self.c.items()})
        for msg in msgs:  # FedAvg's messages share one RecordDict; setting it per message is idempotent
            msg.content[keys.SCAFFOLD_C] = c_record
        return msgs

    def reply_array_specs(self, global_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """What a valid reply carries (read by strategies.robust): the model and ``dc`` over params."""
        return {self.arrayrecord_key: global_spec, keys.SCAFFOLD_DC: {k: global_spec[k] for k in self.param_keys}}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies([m for m in replies], is_train=True, validate=False)
        if not valid:
            return None, None
        if self.current is None or self.c is None:
            raise ValueError("SCAFFOLD: configure_train must run before aggregate_train")
        models = [
            RecordDict({self.arrayrecord_key: m.content[self.arrayrecord_key], **dict(m.content.metric_records)})
            for m in valid
        ]
        avg = aggregate_arrayrecords(models, self.weighted_by_key)
        eta = self.server_learning_rate
        new = {k: x + eta * (avg[k].numpy() - x) for k, x in self.current.items()}
        dcs = [m.content[keys.SCAFFOLD_DC] for m in valid]
        frac = len(valid) / self.num_sites
        for k in self.param_keys:
            mean_dc = np.mean(np.stack([dc[k].numpy() for dc in dcs]), axis=0)
            self.c[k] = (self.c[k] + frac * mean_dc).astype(self.c[k].dtype)
        metrics = self.train_metrics_aggr_fn(models, self.weighted_by_key)
        return ArrayRecord({k: Array(np.array(v, order="C")) for k, v in new.items()}), metrics
