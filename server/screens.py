"""Screens: small checks every reply passes before it is aggregated, each run once per reply.

Flower's strategies trust every reply: one site sending NaN weights (a diverged run, a bit flip, a
bug) makes FedAvg's global model NaN for everyone, and a reply whose arrays have other keys or
shapes raises ``InconsistentMessageReplies`` and stops the run. Flower has no such screening, so it
is written here, as a plain list of objects that the round pipeline (:mod:`medflower.server.loop`)
runs in order. Each screen looks at one reply and returns None (pass) or a :class:`Verdict`:

* ``reject``: the reply is not aggregated and the round records a failure for the site, with
  the reason (logged, and kept in ``summary.json``);
* ``set-aside``: the reply is a valid answer that carries no update (a site whose DP budget is
  exhausted): it counts as an answer but is not aggregated.

The first verdict wins. Screens: :class:`LedgerRefusals` (mode ``sample``), :class:`UpdateShape`
(weight, records, keys, shapes, dtypes, finiteness), :class:`NormBound` (``strategy.max_update_norm``);
for evaluation replies :class:`FiniteMetrics`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING
from typing import Literal, Protocol

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log

from medflower import keys
from medflower.strategies.privacy import is_refusal, metrics_of
from medflower.strategies.registry import Spec
from medflower.threshold import BINS, HIST_PREFIX


@dataclass(frozen=True)
class Verdict:
    action: Literal["reject", "set-aside"]
    reason: str


def reject(reason: str) -> Verdict:
    return Verdict("reject", reason)


@dataclass
class RoundView:
    """What screens may know about the round: the global model and the layout a reply must have."""

    server_round: int
    global_arrays: ArrayRecord
    expected: dict[str, Spec]  # ArrayRecord key -> spec (from the method's reply_arrays)
    weight_key: str = keys.NUM_EXAMPLES
    _global_np: dict[str, np.ndarray] | None = field(default=None, repr=False)

    def global_numpy(self) -> dict[str, np.ndarray]:
        if self._global_np is None:
            self._global_np = {k: a.numpy() for k, a in self.global_arrays.items()}
        return self._global_np


class Screen(Protocol):
    def check(self, msg: Message, view: RoundView) -> Verdict | None: ...


def spec_of(arrays: ArrayRecord) -> Spec:
    return {k: (tuple(int(d) for d in a.shape), str(a.dtype)) for k, a in arrays.items()}


def is_float(dtype: str) -> bool:
    return np.dtype(dtype).kind in "fc"


def names(keys_: Iterable[str], limit: int = 4) -> str:
    ks = sorted(keys_)
    return ", ".join(ks[:limit]) + (f" (+{len(ks) - limit} more)" if len(ks) > limit else "")


def check_arrays(record: ArrayRecord, spec: Spec, *, what: str = "arrays") -> str | None:
    """Why ``record`` does not match ``spec`` (keys, shapes, dtypes, finiteness), or None if it does."""
    have, want = set(record.keys()), set(spec)
    if have - want:
        return f"{what}: unexpected array(s) {names(have - want)}"
    if want - have:
        return f"{what}: missing array(s) {names(want - have)}"
    for k, (shape, dtype) in spec.items():
        a = record[k]
        if tuple(a.shape) != shape:
            return f"{what}: array {k!r} has shape {tuple(a.shape)}, the global model's is {shape}"
        if str(a.dtype) != dtype:
            return f"{what}: array {k!r} has dtype {a.dtype}, the global model's is {dtype}"
        if is_float(dtype):
            x = a.numpy()
            if not np.isfinite(x).all():
                n_nan, n_inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
                return f"{what}: array {k!r} is not finite ({n_nan} NaN, {n_inf} Inf of {x.size} values)"
    return None


def check_metrics(msg: Message, weight_key: str | None, *, allow_nan: bool = False) -> str | None:
    """Why a reply's MetricRecord is unusable: not exactly one, a bad weight, a non-finite value
    (NaN passes with ``allow_nan``: an evaluation metric that is undefined, e.g. AUC on one class)."""
    recs = msg.content.metric_records
    if len(recs) != 1:
        return f"expected one MetricRecord, got {len(recs)}"
    metrics = next(iter(recs.values()))
    if weight_key is not None:
        if weight_key not in metrics:
            return f"metric {weight_key!r} (the aggregation weight) is missing"
        w = metrics[weight_key]
        if isinstance(w, list) or not math.isfinite(float(w)) or float(w) <= 0:
            return f"metric {weight_key!r} (the aggregation weight) must be a finite number > 0, got {w!r}"
    for k, v in metrics.items():
        vals = v if isinstance(v, list) else [v]
        if not all(math.isfinite(float(x)) or (allow_nan and math.isnan(float(x))) for x in vals):
            return f"metric {k!r} is not finite ({v!r})"
    return None


def site_field(msg: Message, key: str) -> str | None:
    """A field of the ``keys.SITE`` record a site writes into its reply (its name, a refusal), if any.

    The one place the coordinator reads what a site says about itself; what it says is a claim
    (:mod:`medflower.server.identity` checks the name against the registered one).
    """
    if msg.has_error() or keys.SITE not in msg.content.config_records:
        return None
    value = msg.content.config_records[keys.SITE].get(key)
    return None if value is None else str(value)


def stated_refusal(msg: Message) -> str | None:
    """The refusal a site states in its reply (``keys.REFUSAL``: its policy's rule, and why), if any."""
    return site_field(msg, keys.REFUSAL)


class SiteRefusals:
    """A site may refuse a message (its own policy, set by the hospital): set the reply aside, with the rule.

    A refusal is an answer, not a failure: the site is up and said no. It sends no weights and is
    recorded in the round's ``refusals``; the run carries on with the other sites.
    """

    def check(self, msg: Message, view: RoundView) -> Verdict | None:
        refusal = stated_refusal(msg)
        return Verdict("set-aside", f"refused: {refusal}") if refusal is not None else None


class LedgerRefusals:
    """Mode ``sample``: a site out of privacy budget answers with a refusal; set it aside, logged."""

    def check(self, msg: Message, view: RoundView) -> Verdict | None:
        if not is_refusal(msg):
            return None
        m = metrics_of(msg) or MetricRecord()

        def num(key: str) -> float:
            v = m.get(key, float("nan"))
            return float("nan") if isinstance(v, list) else float(v)

        reason = (
            f"privacy budget exhausted (epsilon {num(keys.DP_EPSILON):.4f} of {num(keys.DP_TARGET_EPSILON):.4f} "
            f"spent at delta {num(keys.DP_DELTA):g}; one more round would reach {num(keys.DP_EPSILON_NEXT):.4f})"
        )
        return Verdict("set-aside", reason)


class UpdateShape:
    """The reply's weight and metrics are finite, and its arrays are the ones the global model calls for."""

    def check(self, msg: Message, view: RoundView) -> Verdict | None:
        why = check_metrics(msg, view.weight_key)
        if why:
            return reject(why)
        got = set(msg.content.array_records.keys())
        if got != set(view.expected):
            return reject(f"carries ArrayRecord(s) {names(got) or 'none'}, expected {names(view.expected)}")
        for rec_key, spec in view.expected.items():
            why = check_arrays(msg.content.array_records[rec_key], spec, what=rec_key)
            if why:
                return reject(why)
        return None


def update_norm(record: ArrayRecord, reference: dict[str, np.ndarray]) -> float:
    """L2 distance of ``record`` from ``reference`` over floating-point arrays."""
    total = 0.0
    for k, a in record.items():
        if is_float(str(a.dtype)):
            total += float(np.sum((a.numpy().astype(np.float64) - reference[k]) ** 2))
    return math.sqrt(total)


class NormBound:
    """Rejects an update whose L2 distance from the global model exceeds ``max_norm``."""

    def __init__(self, *, max_norm: float, arrayrecord_key: str = keys.ARRAYS) -> None:
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        self.max_norm = max_norm
        self.arrayrecord_key = arrayrecord_key

    def check(self, msg: Message, view: RoundView) -> Verdict | None:
        norm = update_norm(msg.content.array_records[self.arrayrecord_key], view.global_numpy())
        if norm > self.max_norm:
            return reject(f"update L2 norm {norm:.4g} exceeds strategy.max_update_norm={self.max_norm:g}")
        return None


# The range of each evaluation metric, by the name's last part (``val-auc``, ``personal-test-dice``).
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "accuracy": (0.0, 1.0),
    "balanced-accuracy": (0.0, 1.0),
    "auc": (0.0, 1.0),
    "dice": (0.0, 1.0),
    "loss": (0.0, math.inf),
    "hd95": (0.0, math.inf),
    keys.NUM_EXAMPLES: (0.0, math.inf),
}


def metric_range(name: str) -> tuple[float, float] | None:
    for suffix in sorted(METRIC_RANGES, key=len, reverse=True):  # balanced-accuracy before accuracy
        if name == suffix or name.endswith("-" + suffix):
            return METRIC_RANGES[suffix]
    return None


def check_histogram(name: str, value: object) -> str | None:
    """Why a score histogram (``<split>-score-hist-<class>``, :mod:`medflower.threshold`) is unusable:
    it must be a list of :data:`~medflower.threshold.BINS` non-negative integer counts."""
    if not isinstance(value, list) or len(value) != BINS:
        size = f" of length {len(value)}" if isinstance(value, list) else ""
        return f"metric {name!r} must be a list of {BINS} counts, got a {type(value).__name__}{size}"
    if not all(isinstance(v, int) and v >= 0 for v in value):
        return f"metric {name!r} must hold non-negative integer counts"
    return None


class FiniteMetrics:
    """Evaluation replies: one MetricRecord of finite numbers within each metric's range, or NaN for
    a metric the split leaves undefined (reported as null), and score histograms of integer counts
    (:func:`check_histogram`). No aggregation weight is required: a site with an empty validation
    split reports 0 examples."""

    def check(self, msg: Message, view: RoundView) -> Verdict | None:
        why = check_metrics(msg, None, allow_nan=True)
        if why:
            return reject(why)
        for name, value in next(iter(msg.content.metric_records.values())).items():
            if HIST_PREFIX in name:
                why = check_histogram(name, value)
                if why:
                    return reject(why)
                continue
            bounds = metric_range(name)
            if bounds is None or isinstance(value, list) or math.isnan(float(value)):
                continue
            if not bounds[0] <= float(value) <= bounds[1]:
                return reject(f"metric {name!r} is {value!r}, outside its range [{bounds[0]:g}, {bounds[1]:g}]")
        return None


@dataclass
class Screened:
    valid: list[Message] = field(default_factory=list)
    set_aside: list[tuple[Message, str]] = field(default_factory=list)
    rejected: list[tuple[Message, str]] = field(default_factory=list)


def run_screens(
    screens: Iterable[Screen], replies: Iterable[Message], view: RoundView, *, site_of: dict[int, str], what: str
) -> Screened:
    """Apply ``screens`` to each (non-error) reply; the first verdict wins. Logs every verdict by site."""
    screens = list(screens)
    out = Screened()
    for msg in replies:
        verdict = next((v for s in screens if (v := s.check(msg, view)) is not None), None)
        if verdict is None:
            out.valid.append(msg)
            continue
        site = site_of.get(int(msg.metadata.src_node_id), f"node-{msg.metadata.src_node_id}")
        if verdict.action == "set-aside":
            out.set_aside.append((msg, verdict.reason))
            log(WARNING, "round %d: %s sent no %s: %s", view.server_round, site, what, verdict.reason)
        else:
            out.rejected.append((msg, verdict.reason))
            log(WARNING, "round %d: rejected the %s from %s: %s", view.server_round, what, site, verdict.reason)
    return out
