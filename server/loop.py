"""The round as an explicit pipeline: configure → send → collect → screen → aggregate → evaluate → record.

``flwr.serverapp.strategy.Strategy.start`` runs configure/aggregate for N rounds but cannot resume
from a checkpoint, keeps no per-site record, trusts every reply and treats a short round as a
normal one. This pipeline calls the same Flower strategy methods for sampling and aggregation
(so Flower's strategies work unchanged) and adds, each as one small stage:

* collect: errors and silent sites become the round's failures, named by site;
* screen: the round's :mod:`screens <medflower.server.screens>` run once on each reply;
* aggregate: a participation check; Flower's aggregation, guarded (an aggregation error or a
  non-finite aggregate keeps the global model and rolls the strategy's state back; the global
  model's dtypes are restored, since Flower's FedAdam/FedMedian return float64); the privacy
  stage's uniform weights and ledger metrics;
* release: the model the federation releases — the global model, or its moving average
  (``strategy.ema_decay``, :mod:`medflower.server.release`); the sites train from the global model;
* evaluate: the sites' evaluation (screened, aggregated) and the server-side test, of the released model;
* record: the round's record, a progress line and the checkpoint callback.

After the last round every site evaluates the final released model on its own test split.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies

from medflower import keys, progress, records
from medflower.server.build import RoundParts
from medflower.server.canonical import CanonicalGrid, canonical, seed_sampling
from medflower.server.screens import RoundView, Screened, names, run_screens, site_field, spec_of
from medflower.strategies.privacy import sample_round_metrics
from medflower.strategies.registry import Spec
from medflower.strategies.state import load_strategy_state, strategy_state_dict


class RoundAborted(RuntimeError):
    """Too few sites replied and the participation policy says stop."""


@dataclass
class RoundRecord:
    round: int
    train: dict[str, float] = field(default_factory=dict)  # aggregated by the strategy
    evaluate: dict[str, float] = field(default_factory=dict)  # aggregated clients' evaluation
    # server-side evaluation: scalars, and (classification) lists: confusion matrix, score histograms
    global_test: dict[str, Any] = field(default_factory=dict)
    sites_train: dict[str, dict[str, float]] = field(default_factory=dict)
    sites_evaluate: dict[str, dict[str, float]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)  # site, node id and reason (train)
    refusals: list[dict[str, Any]] = field(default_factory=list)  # sites that answered no (policy, DP budget)
    evaluate_failures: list[dict[str, Any]] = field(default_factory=list)  # likewise, evaluation
    # binary tasks: the sites' validation score histograms, summed (medflower.threshold; the threshold's input)
    val_score_histograms: dict[str, list[int]] = field(default_factory=dict)
    sites_asked: int = 0  # train messages sent
    aggregated: bool = True
    seconds: float = 0.0
    secure_aggregation: dict[str, Any] = field(default_factory=dict)  # SecAgg+: stage counts, why not aggregated


@dataclass
class History:
    rounds: list[RoundRecord] = field(default_factory=list)
    initial_global_test: dict[str, Any] = field(default_factory=dict)
    sites_test: dict[str, dict[str, float]] = field(default_factory=dict)
    arrays: ArrayRecord | None = None
    site_names: dict[int, str] = field(default_factory=dict)  # node id -> site name (names silent sites)
    test_refusals: list[dict[str, Any]] = field(default_factory=list)  # sites that refused the final test
    global_test_note: str = ""  # why there is no server-side test (no data; the run refused), if so
    feature_stats: dict[str, Any] = field(default_factory=dict)  # privacy.feature_stats_noise (server/featurestats.py)


def metrics_dict(rec: MetricRecord | None) -> dict[str, float]:
    return {k: float(v) for k, v in (rec or {}).items() if not isinstance(v, list)}


def aggregate_dict(rec: MetricRecord | None) -> dict[str, float]:
    """An aggregate's scalar metrics; its mean of the sites' example counts means nothing and is left out."""
    return {k: v for k, v in metrics_dict(rec).items() if k != keys.NUM_EXAMPLES}


def reported_examples(msg: Message) -> float:
    m = next(iter(msg.content.metric_records.values()))
    value = m.get(keys.NUM_EXAMPLES, 0.0)
    return 0.0 if isinstance(value, list) else float(value)


def weigh(replies: list[Message], parts: RoundParts) -> None:
    """The weighting stage: set each reply's aggregation weight, on the server (``strategy.weighting``).

    Replies have passed the screens, so each has one MetricRecord with a finite ``num-examples`` > 0.
    Flower's strategies weigh by ``keys.AGG_WEIGHT``; whatever a site put there is overwritten.
    """
    claimed = [reported_examples(m) for m in replies]
    cap = parts.weight_cap_multiple * float(np.median(claimed)) if claimed else 0.0
    for msg, n in zip(replies, claimed, strict=True):
        if parts.weighting == "uniform":
            w = 1.0
        elif parts.weighting == "capped":
            declared = parts.declared_sizes.get(int(msg.metadata.src_node_id))
            w = min(n, float(declared)) if declared is not None else min(n, cap)
        else:
            w = n
        next(iter(msg.content.metric_records.values()))[keys.AGG_WEIGHT] = w


def reported_site_name(msg: Message) -> str:
    """The site name a (non-error) reply carries, else its node id (simulation: sites are named so)."""
    return site_field(msg, keys.SITE_NAME) or f"node-{msg.metadata.src_node_id}"


def _fmt(d: dict[str, float], wanted: tuple[str, ...]) -> str:
    return " ".join(f"{n} {d[n]:.3f}" for n in wanted if n in d and not math.isnan(d[n]))


def restore_dtypes(arrays: ArrayRecord, spec: Spec) -> tuple[ArrayRecord, str | None]:
    """Cast an aggregate back to the global model's dtypes; say why if it is unusable."""
    if set(arrays.keys()) != set(spec):
        return arrays, f"its keys differ from the global model's ({names(set(arrays.keys()) ^ set(spec))})"
    out = {}
    for k, (shape, dtype) in spec.items():
        x = arrays[k].numpy()
        if tuple(x.shape) != shape:
            return arrays, f"array {k!r} has shape {tuple(x.shape)}, the global model's is {shape}"
        if np.dtype(x.dtype).kind in "fc" and not np.isfinite(x).all():
            return arrays, f"array {k!r} is not finite"
        if str(x.dtype) != dtype:
            x = (np.rint(x) if np.dtype(dtype).kind in "iub" else x).astype(dtype)
        out[k] = Array(np.array(x, order="C"))  # not ascontiguousarray: it turns 0-d into (1,)
    return ArrayRecord(out), None


@dataclass
class Aggregated:
    arrays: ArrayRecord | None  # None: the global model stays as it was
    metrics: MetricRecord | None


def aggregate_train(parts: RoundParts, server_round: int, valid: list[Message], global_spec: Spec) -> Aggregated:
    """Flower's aggregation of screened replies, guarded; the strategy's state is rolled back on failure."""
    strategy = parts.strategy
    before = strategy_state_dict(strategy)
    weigh(valid, parts)
    try:
        arrays, metrics = strategy.aggregate_train(server_round, valid)
    except (AggregationError, InconsistentMessageReplies, ValueError, FloatingPointError) as err:
        log(
            ERROR,
            "round %d: aggregation failed (%s: %s); global model unchanged",
            server_round,
            type(err).__name__,
            err,
        )
        load_strategy_state(strategy, before)
        return Aggregated(None, None)
    if arrays is not None:
        arrays, why = restore_dtypes(arrays, global_spec)
        if why is not None:
            log(ERROR, "round %d: discarded the aggregated model: %s; global model unchanged", server_round, why)
            load_strategy_state(strategy, before)
            return Aggregated(None, metrics)
    return Aggregated(arrays, metrics)


def aggregate_evaluate(parts: RoundParts, server_round: int, valid: list[Message]) -> dict[str, float]:
    # sites with an empty validation split report 0 examples: Flower's weighted mean would divide by 0
    if not valid or sum(reported_examples(m) for m in valid) <= 0:
        return {}
    for msg in valid:  # site evaluations are averaged by the examples they used, whatever the weighting
        next(iter(msg.content.metric_records.values()))[keys.AGG_WEIGHT] = reported_examples(msg)
    try:
        return aggregate_dict(parts.strategy.aggregate_evaluate(server_round, valid))
    except (AggregationError, InconsistentMessageReplies, ValueError) as err:
        log(WARNING, "round %d: site evaluations not aggregated (%s)", server_round, err)
        return {}


def summed_histograms(replies: Iterable[Message], *, prefix: str) -> dict[str, list[int]]:
    """The sites' ``<prefix>score-hist-<class>`` counts, summed bin by bin (screened: BINS integers each)."""
    out: dict[str, list[int]] = {}
    for msg in replies:
        metrics = next(iter(msg.content.metric_records.values()))
        for key in metrics:
            if key.startswith(prefix + keys.SCORE_HIST):
                counts = records.get_int_list(metrics, key)
                name = key[len(prefix) :]
                out[name] = [a + b for a, b in zip(out[name], counts, strict=True)] if name in out else counts
    return out


def _site_metrics(replies: Iterable[Message], site_names: dict[int, str] | None = None) -> dict[str, dict[str, float]]:
    out = {}
    for msg in replies:
        recs = msg.content.metric_records
        if recs:
            nid = int(msg.metadata.src_node_id)
            name = (site_names or {}).get(nid) or reported_site_name(msg)
            out[name] = metrics_dict(next(iter(recs.values())))
    return out


class RoundPipeline:
    """One federation's rounds over ``grid`` with ``parts`` (see the module docstring)."""

    def __init__(
        self,
        grid: Grid,
        parts: RoundParts,
        *,
        timeout: float,
        min_sites: int | None = None,
        on_too_few: str = "continue",
        evaluate_fn: Callable[[int, ArrayRecord], dict[str, Any]] | None = None,
        history: History | None = None,
        seed: int | None = None,
    ) -> None:
        self.parts = parts
        self.timeout = timeout
        self.min_sites = min_sites
        self.on_too_few = on_too_few
        self.evaluate_fn = evaluate_fn
        self.history = history or History()
        self.names = self.history.site_names  # learnt from replies; kept in checkpoints for resumed runs
        self.grid = CanonicalGrid(grid, self.names)  # node ids by site (server/canonical.py)
        self.seed = seed  # the experiment seed: each round's sampling is seeded from it

    # -- stages -----------------------------------------------------------------------------------

    def configure(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> list[Message]:
        s = self.parts.strategy
        seed_sampling(self.seed, server_round, "train")
        if self.parts.privacy is not None:
            return self.parts.privacy.configure_train(s, server_round, arrays, config, self.grid)
        return list(s.configure_train(server_round, arrays, config, self.grid))

    def send(self, msgs: list[Message], *, server_round: int = 0, stage: str = "train") -> list[Message]:
        return progress.send_and_receive(self.grid, msgs, timeout=self.timeout, server_round=server_round, stage=stage)

    def site(self, node_id: int) -> str:
        return self.names.get(node_id, f"node-{node_id}")

    def collect(
        self, server_round: int, sent: list[Message], replies: list[Message], failures: list[dict[str, Any]]
    ) -> list[Message]:
        """The replies that carry content; errors and silent sites are appended to ``failures``."""
        dst = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in sent}
        ok = []
        for msg in replies:
            if msg.has_error():
                nid = dst.get(msg.metadata.reply_to_message_id, int(msg.metadata.src_node_id))
                failures.append({"site": self.site(nid), "node_id": nid, "reason": str(msg.error.reason)})
                log(WARNING, "round %d: no reply from %s: %s", server_round, self.site(nid), msg.error.reason)
            else:
                if self.parts.directory_path is None:  # simulation: sites are named by their replies
                    self.names[int(msg.metadata.src_node_id)] = reported_site_name(msg)
                ok.append(msg)
        ok = canonical(ok, self.names)  # aggregate by site, not by arrival (bit-reproducible sums)
        answered = {m.metadata.reply_to_message_id for m in replies}
        for m in sent:
            if m.metadata.message_id not in answered:
                nid = int(m.metadata.dst_node_id)
                reason = f"no reply within round_timeout={self.timeout:.0f}s"
                failures.append({"site": self.site(nid), "node_id": nid, "reason": reason})
                log(WARNING, "round %d: %s did not reply within %.0fs", server_round, self.site(nid), self.timeout)
        return ok

    def screen(
        self, server_round: int, replies: list[Message], arrays: ArrayRecord, failures: list[dict[str, Any]]
    ) -> Screened:
        spec = spec_of(arrays)
        view = RoundView(server_round, arrays, self.parts.method.reply_arrays(spec, self.parts.base))
        screened = run_screens(self.parts.screens, replies, view, site_of=self.names, what="update")
        for msg, reason in screened.rejected:
            nid = int(msg.metadata.src_node_id)
            failures.append({"site": self.site(nid), "node_id": nid, "reason": f"rejected update: {reason}"})
        return screened

    def aggregate(self, server_round: int, screened: Screened, arrays: ArrayRecord, rec: RoundRecord) -> ArrayRecord:
        answered = len(screened.valid) + len(screened.set_aside)
        needed = self.min_sites if self.min_sites is not None else rec.sites_asked
        if answered < max(needed, 1):
            rec.aggregated = False
            log(
                WARNING,
                "round %d: %d valid repl%s, %d required; global model unchanged",
                server_round,
                answered,
                "y" if answered == 1 else "ies",
                needed,
            )
            if self.on_too_few == "stop":
                raise RoundAborted(f"round {server_round}: {answered} valid replies, participation.min_sites={needed}")
            return arrays
        result = Aggregated(None, None)
        if screened.valid:
            result = aggregate_train(self.parts, server_round, screened.valid, spec_of(arrays))
        else:
            log(WARNING, "round %d: no site sent an update to aggregate; global model unchanged", server_round)
        metrics = result.metrics
        if self.parts.privacy is not None:
            metrics = self.parts.privacy.record(self.parts.strategy, result.arrays is not None, metrics)
        if self.parts.sample_dp:
            everyone = screened.valid + [m for m, _ in screened.set_aside]
            metrics = sample_round_metrics(everyone, len(screened.set_aside), metrics)
        rec.train = aggregate_dict(metrics)
        if result.arrays is None:
            rec.aggregated = False
            if screened.valid:
                log(WARNING, "round %d: the strategy produced no model; global model unchanged", server_round)
            return arrays
        return result.arrays

    def evaluate_sites(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord
    ) -> tuple[Screened, list[dict[str, Any]]]:
        """Send the evaluation messages; the screened replies and the failures."""
        seed_sampling(self.seed, server_round, "evaluate" if config.get(keys.EVAL_SPLIT) != "test" else "test")
        msgs = list(self.parts.strategy.configure_evaluate(server_round, arrays, config, self.grid))
        failures: list[dict[str, Any]] = []
        ok = self.collect(server_round, msgs, self.send(msgs, server_round=server_round, stage="evaluate"), failures)
        view = RoundView(server_round, arrays, {})
        screened = run_screens(self.parts.eval_screens, ok, view, site_of=self.names, what="evaluation")
        for msg, reason in screened.rejected:
            nid = int(msg.metadata.src_node_id)
            failures.append({"site": self.site(nid), "node_id": nid, "reason": f"rejected evaluation: {reason}"})
        return screened, failures

    def refusals(self, screened: Screened, *, what: str) -> list[dict[str, Any]]:
        return [
            {
                "site": self.site(int(m.metadata.src_node_id)),
                "node_id": int(m.metadata.src_node_id),
                "what": what,
                "reason": reason,
            }
            for m, reason in screened.set_aside
        ]

    def record(self, rec: RoundRecord, arrays: ArrayRecord, num_rounds: int) -> None:
        self.history.rounds.append(rec)
        self.history.arrays = self.parts.release.current(arrays)
        log(
            INFO,
            "[round %d/%d] %d/%d sites | train %s | site-eval %s | global-test %s | %.1fs",
            rec.round,
            num_rounds,
            len(rec.sites_train),
            rec.sites_asked,
            _fmt(rec.train, (keys.TRAIN_LOSS,)) or "-",
            _fmt(rec.evaluate, ("val-accuracy", "val-auc", "val-dice")) or "-",
            _fmt(rec.global_test, ("accuracy", "auc", "dice")) or "-",
            rec.seconds,
        )

    # -- one round, and the run ---------------------------------------------------------------------

    def run_round(
        self, server_round: int, arrays: ArrayRecord, train_config: ConfigRecord, evaluate_config: ConfigRecord
    ) -> tuple[ArrayRecord, RoundRecord]:
        t0 = time.time()
        rec = RoundRecord(round=server_round)
        self.names.update(self.parts.refresh_identity())  # deployment: registered names, re-read each round
        msgs = self.configure(server_round, arrays, ConfigRecord(dict(train_config)))
        rec.sites_asked = len(msgs)
        if self.parts.secure is not None:  # SecAgg+: the protocol's replies carry the unmasked mean
            ok = self.parts.secure.run(self, server_round, msgs, arrays, rec)
        else:
            ok = self.collect(server_round, msgs, self.send(msgs, server_round=server_round), rec.failures)
        screened = self.screen(server_round, ok, arrays, rec.failures)
        rec.refusals += self.refusals(screened, what="training")
        rec.sites_train = _site_metrics(screened.valid + [m for m, _ in screened.set_aside], self.names)
        try:
            arrays = self.aggregate(server_round, screened, arrays, rec)
        except RoundAborted:
            rec.seconds = time.time() - t0
            self.history.rounds.append(rec)
            raise
        released = self.parts.release.update(arrays) if rec.aggregated else self.parts.release.current(arrays)
        ev, rec.evaluate_failures = self.evaluate_sites(server_round, released, ConfigRecord(dict(evaluate_config)))
        rec.refusals += self.refusals(ev, what="evaluation")
        rec.sites_evaluate = _site_metrics(ev.valid, self.names)
        rec.evaluate = aggregate_evaluate(self.parts, server_round, ev.valid)
        rec.val_score_histograms = summed_histograms(ev.valid, prefix="val-")
        if self.evaluate_fn is not None:
            rec.global_test = self.evaluate_fn(server_round, released)
        rec.seconds = time.time() - t0
        return arrays, rec

    def final_site_test(self, server_round: int, arrays: ArrayRecord, evaluate_config: ConfigRecord) -> None:
        self.names.update(self.parts.refresh_identity())
        cfg = ConfigRecord(dict(evaluate_config))
        cfg[keys.EVAL_SPLIT] = "test"
        screened, _ = self.evaluate_sites(server_round, arrays, cfg)
        self.history.sites_test = _site_metrics(screened.valid, self.names)
        self.history.test_refusals = self.refusals(screened, what="test")


def run_rounds(
    grid: Grid,
    parts: RoundParts,
    *,
    initial_arrays: ArrayRecord,
    num_rounds: int,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord,
    timeout: float,
    min_sites: int | None = None,
    on_too_few: str = "continue",
    evaluate_fn: Callable[[int, ArrayRecord], dict[str, Any]] | None = None,
    on_round_end: Callable[[int, ArrayRecord, History], None] | None = None,
    start_round: int = 1,
    history: History | None = None,
    final_site_test: bool = True,
    seed: int | None = None,
) -> History:
    """Run rounds ``start_round..num_rounds``; ``history`` continues a resumed run."""
    pipe = RoundPipeline(
        grid,
        parts,
        timeout=timeout,
        min_sites=min_sites,
        on_too_few=on_too_few,
        evaluate_fn=evaluate_fn,
        history=history,
        seed=seed,
    )
    hist = pipe.history
    arrays = initial_arrays
    if evaluate_fn is not None and start_round == 1 and not hist.initial_global_test:
        hist.initial_global_test = evaluate_fn(0, arrays)
    for rnd in range(start_round, num_rounds + 1):
        progress.round_started(rnd, num_rounds)
        arrays, rec = pipe.run_round(rnd, arrays, train_config, evaluate_config)
        pipe.record(rec, arrays, num_rounds)
        progress.round_ended(rnd, num_rounds, rec)
        if on_round_end is not None:
            on_round_end(rnd, arrays, hist)
    hist.arrays = parts.release.current(arrays)  # what the run saves (model.pt) and the sites test
    if final_site_test:
        pipe.final_site_test(num_rounds, hist.arrays, evaluate_config)
    return hist
