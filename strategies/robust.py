"""Update screening around any strategy: bad updates are rejected by site, never averaged in.

Flower's strategies trust every reply: one site sending NaN weights (a diverged run, a bit flip, a
bug) makes FedAvg's global model NaN for everyone, and a reply whose arrays have other keys or
shapes raises ``InconsistentMessageReplies`` and stops the run. Flower has no such screen, so it is
written here as a Flower-style wrapper (like its DP wrappers): :class:`RobustStrategy` takes any
``flwr.serverapp.strategy.Strategy`` and

* rejects, before aggregation, a train reply whose weight (``num-examples``) is missing, non-finite
  or <= 0, whose metrics are non-finite, whose ArrayRecords are not the ones the global model (and
  the strategy, e.g. SCAFFOLD's control variate) calls for, or any of whose arrays has another key
  set, shape or dtype than the global model's, or is non-finite; optionally one whose L2 distance
  from the global model exceeds ``max_update_norm``. Each rejection is logged naming the site and
  the reason, and kept in :attr:`RobustStrategy.last_rejections` (the round loop counts them as
  failures in the round record);
* never returns a non-finite global model: if the aggregate is not finite (e.g. a server optimizer
  overflowed), it is discarded, the strategy's internal state (server moments) is rolled back and
  the global model stays as it was;
* gives back the global model's dtypes (Flower's FedAdam/FedMedian return float64 for float32 or
  int64 arrays; the sites would then be rejected next round for sending their own dtypes);
* turns an aggregation error (Flower raises on inconsistent replies) into a skipped round.

Strategies that send extra ArrayRecords declare them with ``reply_array_specs(global_spec)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import ERROR, INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies
from flwr.serverapp.strategy import Strategy

from medflower import keys

Spec = dict[str, tuple[tuple[int, ...], str]]  # array key -> (shape, dtype string)


def site_name(msg: Message) -> str:
    """The public site name a reply carries (see server.loop.site_of), else its node id."""
    if not msg.has_error() and keys.SITE in msg.content.config_records:
        name = msg.content.config_records[keys.SITE].get(keys.SITE_NAME)
        if name is not None:
            return str(name)
    return f"node-{msg.metadata.src_node_id}"


def spec_of(arrays: ArrayRecord) -> Spec:
    return {k: (tuple(int(d) for d in a.shape), str(a.dtype)) for k, a in arrays.items()}


def _is_float(dtype: str) -> bool:
    return np.dtype(dtype).kind in "fc"


def _names(keys_: Iterable[str], limit: int = 4) -> str:
    ks = sorted(keys_)
    return ", ".join(ks[:limit]) + (f" (+{len(ks) - limit} more)" if len(ks) > limit else "")


def check_arrays(record: ArrayRecord, spec: Spec, *, what: str = "arrays") -> str | None:
    """Why ``record`` does not match ``spec`` (keys, shapes, dtypes, finiteness), or None if it does."""
    have = set(record.keys())
    want = set(spec)
    if have - want:
        return f"{what}: unexpected array(s) {_names(have - want)}"
    if want - have:
        return f"{what}: missing array(s) {_names(want - have)}"
    for k, (shape, dtype) in spec.items():
        a = record[k]
        if tuple(a.shape) != shape:
            return f"{what}: array {k!r} has shape {tuple(a.shape)}, the global model's is {shape}"
        if str(a.dtype) != dtype:
            return f"{what}: array {k!r} has dtype {a.dtype}, the global model's is {dtype}"
        if _is_float(dtype):
            x = a.numpy()
            if not np.isfinite(x).all():
                n_nan, n_inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
                return f"{what}: array {k!r} is not finite ({n_nan} NaN, {n_inf} Inf of {x.size} values)"
    return None


def _check_metrics(msg: Message, weight_key: str) -> str | None:
    recs = msg.content.metric_records
    if len(recs) != 1:
        return f"expected one MetricRecord, got {len(recs)}"
    metrics = next(iter(recs.values()))
    if weight_key not in metrics:
        return f"metric {weight_key!r} (the aggregation weight) is missing"
    w = metrics[weight_key]
    if isinstance(w, list) or not math.isfinite(float(w)) or float(w) <= 0:
        return f"metric {weight_key!r} (the aggregation weight) must be a finite number > 0, got {w!r}"
    for k, v in metrics.items():
        vals = v if isinstance(v, list) else [v]
        if not all(math.isfinite(float(x)) for x in vals):
            return f"metric {k!r} is not finite ({v!r})"
    return None


class RobustStrategy(Strategy):
    """Screen train replies and aggregates of ``strategy`` (any Flower Strategy); see module doc.

    The wrapped strategy is ``self.strategy`` (the attribute name Flower's DP wrappers use too, so
    :func:`medflower.strategies.state.unwrap` walks both). Unknown attributes are read from it.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        max_update_norm: float | None = None,
        weighted_by_key: str = keys.NUM_EXAMPLES,
        arrayrecord_key: str = keys.ARRAYS,
    ) -> None:
        if max_update_norm is not None and not max_update_norm > 0:
            raise ValueError(f"max_update_norm must be > 0 or None, got {max_update_norm}")
        self.strategy = strategy
        self.max_update_norm = max_update_norm
        self.weighted_by_key = weighted_by_key
        self.arrayrecord_key = arrayrecord_key
        self.last_rejections: list[dict[str, Any]] = []
        self._global: ArrayRecord | None = None
        self._global_np: dict[str, np.ndarray] | None = None
        self._spec: Spec | None = None
        self._screened: set[int] = set()  # id() of replies already screened valid this round

    _OWN = frozenset(
        {
            "strategy",
            "max_update_norm",
            "weighted_by_key",
            "arrayrecord_key",
            "last_rejections",
            "_global",
            "_global_np",
            "_spec",
            "_screened",
        }
    )

    def __getattr__(self, name: str) -> Any:
        if name == "strategy":  # not set yet (during unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def __setattr__(self, name: str, value: Any) -> None:
        """Settings of the wrapped strategy (e.g. ``min_available_nodes``) are set on it."""
        if name in self._OWN or "strategy" not in self.__dict__:
            object.__setattr__(self, name, value)
        else:
            setattr(self.strategy, name, value)

    # -- the Strategy interface -------------------------------------------------------------------

    def summary(self) -> None:
        log(
            INFO,
            "\t├──> Update screening (medflower): finite, keys/shapes/dtypes of the global model%s",
            f", L2 norm <= {self.max_update_norm}" if self.max_update_norm else "",
        )
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays
        self._global_np = None
        self._spec = spec_of(arrays)
        self._screened = set()
        self.last_rejections = []
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self.screen_train_replies(server_round, replies)
        if not valid:
            log(WARNING, "round %d: no valid update to aggregate; global model unchanged", server_round)
            return None, None
        from medflower.strategies.state import load_strategy_state, strategy_state_dict

        before = strategy_state_dict(self.strategy)
        try:
            arrays, metrics = self.strategy.aggregate_train(server_round, valid)
        except (AggregationError, InconsistentMessageReplies, ValueError, FloatingPointError) as err:
            log(
                ERROR,
                "round %d: aggregation failed (%s: %s); global model unchanged",
                server_round,
                type(err).__name__,
                err,
            )
            load_strategy_state(self.strategy, before)
            return None, None
        if arrays is None:
            return None, metrics
        arrays, why = self._restore_dtypes(arrays)
        if why is not None:
            log(ERROR, "round %d: discarded the aggregated model: %s; global model unchanged", server_round, why)
            load_strategy_state(self.strategy, before)
            return None, metrics
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        try:
            return self.strategy.aggregate_evaluate(server_round, replies)
        except (AggregationError, InconsistentMessageReplies, ValueError) as err:
            log(WARNING, "round %d: site evaluations not aggregated (%s)", server_round, err)
            return None

    # -- screening --------------------------------------------------------------------------------

    def expected_records(self) -> dict[str, Spec]:
        """ArrayRecord key -> spec that a valid train reply carries (asked of the wrapped strategies)."""
        if self._spec is None:
            raise RuntimeError("configure_train must run before replies can be screened")
        s: Any = self.strategy
        while s is not None:
            fn = getattr(type(s), "reply_array_specs", None)
            if fn is not None:
                return fn(s, self._spec)
            s = s.__dict__.get("strategy")
        return {self.arrayrecord_key: self._spec}

    def check_reply(self, msg: Message) -> str | None:
        """Why a (non-error) train reply must be rejected, or None if it is valid."""
        why = _check_metrics(msg, self.weighted_by_key)
        if why:
            return why
        expected = self.expected_records()
        got = set(msg.content.array_records.keys())
        if got != set(expected):
            return f"carries ArrayRecord(s) {_names(got) or 'none'}, expected {_names(expected)}"
        for rec_key, spec in expected.items():
            why = check_arrays(msg.content.array_records[rec_key], spec, what=rec_key)
            if why:
                return why
        if self.max_update_norm is not None:
            norm = self.update_norm(msg.content.array_records[self.arrayrecord_key])
            if norm > self.max_update_norm:
                return f"update L2 norm {norm:.4g} exceeds strategy.max_update_norm={self.max_update_norm:g}"
        return None

    def update_norm(self, record: ArrayRecord) -> float:
        """L2 distance of ``record`` from the global model over floating-point arrays."""
        if self._global_np is None:
            assert self._global is not None  # set by configure_train (checked in expected_records)
            self._global_np = {k: a.numpy() for k, a in self._global.items()}
        total = 0.0
        for k, a in record.items():
            if _is_float(str(a.dtype)):
                total += float(np.sum((a.numpy().astype(np.float64) - self._global_np[k]) ** 2))
        return math.sqrt(total)

    def screen_train_replies(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[list[Message], list[dict[str, Any]]]:
        """Split replies into valid updates and rejections ``{site, node_id, reason}``.

        Error replies are dropped without a rejection entry (the round loop already counts them).
        """
        valid: list[Message] = []
        rejected: list[dict[str, Any]] = []
        for msg in replies:
            if msg.has_error():
                continue
            if id(msg) in self._screened:
                valid.append(msg)
                continue
            why = self.check_reply(msg)
            if why is None:
                self._screened.add(id(msg))
                valid.append(msg)
                continue
            site = site_name(msg)
            log(WARNING, "round %d: rejected the update from %s: %s", server_round, site, why)
            rejected.append(
                {"site": site, "node_id": int(msg.metadata.src_node_id), "reason": f"rejected update: {why}"}
            )
        self.last_rejections += rejected
        return valid, rejected

    def _restore_dtypes(self, arrays: ArrayRecord) -> tuple[ArrayRecord, str | None]:
        """Cast the aggregate back to the global model's dtypes; say why if it is unusable."""
        assert self._spec is not None  # aggregate_train ran after configure_train
        if set(arrays.keys()) != set(self._spec):
            return arrays, (f"its keys differ from the global model's ({_names(set(arrays.keys()) ^ set(self._spec))})")
        out = {}
        for k, (shape, dtype) in self._spec.items():
            x = arrays[k].numpy()
            if tuple(x.shape) != shape:
                return arrays, f"array {k!r} has shape {tuple(x.shape)}, the global model's is {shape}"
            if np.dtype(x.dtype).kind in "fc" and not np.isfinite(x).all():
                return arrays, f"array {k!r} is not finite"
            if str(x.dtype) != dtype:
                x = (np.rint(x) if np.dtype(dtype).kind in "iub" else x).astype(dtype)
            out[k] = Array(np.array(x, order="C"))  # not ascontiguousarray: it turns 0-d into (1,)
        return ArrayRecord(out), None
