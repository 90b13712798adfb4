"""The round loop: Flower's ``Strategy.start`` plus what a medical federation needs.

``flwr.serverapp.strategy.Strategy.start`` runs configure/aggregate for N rounds but cannot resume
from a checkpoint, keeps no per-site record and treats a short round as a normal one. This loop
calls the same strategy methods (so any Flower strategy works unchanged) and adds: per-site train
and evaluation metrics by site name, a participation check, a callback after every round (for
checkpoints), a final federated evaluation on each site's test split, and a progress line per round.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from medflower import keys


class RoundAborted(RuntimeError):
    """Too few sites replied and the participation policy says stop."""


@dataclass
class RoundRecord:
    round: int
    train: dict[str, float] = field(default_factory=dict)  # aggregated by the strategy
    evaluate: dict[str, float] = field(default_factory=dict)  # aggregated clients' evaluation
    global_test: dict[str, float] = field(default_factory=dict)  # server-side evaluation
    sites_train: dict[str, dict[str, float]] = field(default_factory=dict)
    sites_evaluate: dict[str, dict[str, float]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)  # node id / site and reason
    aggregated: bool = True
    seconds: float = 0.0


@dataclass
class History:
    rounds: list[RoundRecord] = field(default_factory=list)
    initial_global_test: dict[str, float] = field(default_factory=dict)
    sites_test: dict[str, dict[str, float]] = field(default_factory=dict)
    arrays: ArrayRecord | None = None
    site_names: dict[int, str] = field(default_factory=dict)  # node id -> site name (names silent sites)


def _metrics(rec: MetricRecord | None) -> dict[str, float]:
    return {k: float(v) for k, v in (rec or {}).items() if not isinstance(v, list)}


def site_of(msg: Message) -> str:
    """The site name a reply carries, else its node id (errors carry no content)."""
    if not msg.has_error() and keys.SITE in msg.content.config_records:
        return str(msg.content.config_records[keys.SITE].get(keys.SITE_NAME, msg.metadata.src_node_id))
    return f"node-{msg.metadata.src_node_id}"


def split_replies(
    replies: Iterable[Message], sent: Iterable[Message] = (), names: dict[int, str] | None = None
) -> tuple[list[Message], list[dict[str, Any]]]:
    """Valid replies and failures; ``sent`` attributes errors the SuperLink raised for a node."""
    dst = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in sent}
    ok, failed = [], []
    for msg in replies:
        if msg.has_error():
            nid = dst.get(msg.metadata.reply_to_message_id, int(msg.metadata.src_node_id))
            failed.append(
                {"site": (names or {}).get(nid, f"node-{nid}"), "node_id": nid, "reason": str(msg.error.reason)}
            )
        else:
            ok.append(msg)
    return ok, failed


def per_site(replies: list[Message]) -> dict[str, dict[str, float]]:
    out = {}
    for msg in replies:
        recs = msg.content.metric_records
        if recs:
            out[site_of(msg)] = _metrics(next(iter(recs.values())))
    return out


def _fmt(d: dict[str, float], names: tuple[str, ...]) -> str:
    parts = [f"{n} {d[n]:.3f}" for n in names if n in d and not math.isnan(d[n])]
    return " ".join(parts)


def run_rounds(
    grid: Grid,
    strategy: Strategy,
    *,
    initial_arrays: ArrayRecord,
    num_rounds: int,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord,
    timeout: float,
    min_sites: int | None = None,
    on_too_few: str = "continue",
    evaluate_fn: Callable[[int, ArrayRecord], dict[str, float]] | None = None,
    on_round_end: Callable[[int, ArrayRecord, History], None] | None = None,
    start_round: int = 1,
    history: History | None = None,
    final_site_test: bool = True,
) -> History:
    """Run rounds ``start_round..num_rounds``; ``history`` continues a resumed run."""
    hist = history or History()
    arrays = initial_arrays
    names = hist.site_names  # learnt from replies; kept in checkpoints so a resumed run still knows them
    if evaluate_fn is not None and start_round == 1 and not hist.initial_global_test:
        hist.initial_global_test = evaluate_fn(0, arrays)
    for rnd in range(start_round, num_rounds + 1):
        t0 = time.time()
        rec = RoundRecord(round=rnd)
        msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(dict(train_config)), grid))
        replies = list(grid.send_and_receive(msgs, timeout=timeout)) if msgs else []
        ok, rec.failures = split_replies(replies, msgs, names)
        for f in rec.failures:
            log(WARNING, "round %d: no update from %s: %s", rnd, f["site"], f["reason"])
        names.update({int(m.metadata.src_node_id): site_of(m) for m in ok})
        replied = {m.metadata.reply_to_message_id for m in replies}
        for m in msgs:
            nid = int(m.metadata.dst_node_id)
            if m.metadata.message_id not in replied:
                rec.failures.append(
                    {
                        "site": names.get(nid, f"node-{nid}"),
                        "node_id": nid,
                        "reason": f"no reply within round_timeout={timeout:.0f}s",
                    }
                )
                log(WARNING, "round %d: %s did not reply within %.0fs", rnd, names.get(nid, f"node-{nid}"), timeout)
        screen = getattr(strategy, "screen_train_replies", None)
        if screen is not None:  # strategies.robust: a rejected update counts as a failure, with its reason
            ok, rejected = screen(rnd, ok)
            rec.failures += rejected
        rec.sites_train = per_site(ok)
        needed = min_sites if min_sites is not None else len(msgs)
        if len(ok) < max(needed, 1):
            rec.aggregated = False
            log(
                WARNING,
                "round %d: %d valid repl%s, %d required; global model unchanged",
                rnd,
                len(ok),
                "y" if len(ok) == 1 else "ies",
                needed,
            )
            if on_too_few == "stop":
                hist.rounds.append(rec)
                raise RoundAborted(f"round {rnd}: {len(ok)} valid replies, participation.min_sites={needed}")
        else:
            new_arrays, train_metrics = strategy.aggregate_train(rnd, ok)
            if new_arrays is None:
                rec.aggregated = False
                log(WARNING, "round %d: the strategy produced no model; global model unchanged", rnd)
            else:
                arrays = new_arrays
            rec.train = _metrics(train_metrics)
        ev_msgs = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(dict(evaluate_config)), grid))
        ev_replies = list(grid.send_and_receive(ev_msgs, timeout=timeout)) if ev_msgs else []
        ev_ok, ev_failed = split_replies(ev_replies)
        names.update({int(m.metadata.src_node_id): site_of(m) for m in ev_ok})
        rec.sites_evaluate = per_site(ev_ok)
        # sites with an empty validation split report 0 examples: Flower's weighted mean would divide by 0
        if ev_ok and sum(m.get(keys.NUM_EXAMPLES, 0) for m in rec.sites_evaluate.values()) > 0:
            rec.evaluate = _metrics(strategy.aggregate_evaluate(rnd, ev_replies))
        if evaluate_fn is not None:
            rec.global_test = evaluate_fn(rnd, arrays)
        rec.seconds = time.time() - t0
        hist.rounds.append(rec)
        hist.arrays = arrays
        log(
            INFO,
            "[round %d/%d] %d/%d sites | train %s | site-eval %s | global-test %s | %.1fs",
            rnd,
            num_rounds,
            len(ok),
            len(msgs),
            _fmt(rec.train, (keys.TRAIN_LOSS,)) or "-",
            _fmt(rec.evaluate, ("val-accuracy", "val-auc", "val-dice")) or "-",
            _fmt(rec.global_test, ("accuracy", "auc", "dice")) or "-",
            rec.seconds,
        )
        if on_round_end is not None:
            on_round_end(rnd, arrays, hist)
    hist.arrays = arrays
    if final_site_test:
        cfg = ConfigRecord(dict(evaluate_config))
        cfg[keys.EVAL_SPLIT] = "test"
        msgs = list(strategy.configure_evaluate(num_rounds, arrays, cfg, grid))
        ok, _ = split_replies(grid.send_and_receive(msgs, timeout=timeout) if msgs else [])
        hist.sites_test = per_site(ok)
    return hist
