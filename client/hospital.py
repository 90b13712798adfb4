"""A hospital's node stays in control: its policy, its state folder, its audit trail, its errors.

:func:`hospital_guard` is the hospital ClientApp's outermost mod (``medflower.client.app:app``). For
every message, in this order:

1. read the site YAML (``node_config["site-config"]``: name, policy, state folder; no data) and
   resolve the state folder (:mod:`medflower.client.state`);
2. append a ``received`` entry to the audit log (:mod:`medflower.client.audit`) when the node has a
   state folder; a log that cannot be written stops the node here: no work, no weights;
3. check the message and its experiment against the rules and the site's policy
   (:func:`medflower.client.policy.refusal_for`). A violation is answered with a refusal reply
   (:func:`medflower.client.replies.refusal_reply`) before any data are read;
4. otherwise count the training round (``policy.max_rounds``) and run the train/evaluate pipeline;
5. any exception, from any step, is contained (:func:`medflower.client.errors.contain`): the
   coordinator gets a code, a generic reason and a reference id; the full error stays at the site;
6. append a ``sent`` entry (the arrays' hash, the metrics, epsilon before/after, the refusal or the
   error's code and reference) and only then let the reply go. If that entry cannot be written
   the reply is replaced by an ``audit-error``: no reply leaves unlogged.

Flower would put an uncaught exception's text into the error it sends, so nothing here raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from medflower import keys, records
from medflower.client.audit import AuditLog, content_arrays, experiment_fingerprint
from medflower.client.errors import AUDIT_ERROR, MESSAGE_ERROR, SITE_LOGGER, AuditError, MessageError, contain
from medflower.client.policy import NodeFacts, Request, refusal_for
from medflower.client.privacy import ledger_epsilon, node_float
from medflower.client.replies import experiment_of, refusal_reply
from medflower.client.secagg import continues_round, is_protocol_only
from medflower.client.site import SiteConfig, load_site_config, load_site_data
from medflower.client.state import (
    LedgerPlace,
    count_round,
    data_key,
    ledger_file,
    node_state_dir,
    resolve_state_dir,
    rounds_trained,
)
from medflower.config import ExperimentConfig
from medflower.data import SiteData
from medflower.schema import ConfigError


def site_yaml_of(context: Context) -> Path:
    """The site YAML this node names (``node_config["site-config"]``); a node without one is a ConfigError."""
    path = str(context.node_config.get(keys.NODE_SITE_CONFIG, "") or "")
    if not path:
        raise ConfigError(
            f"this is the hospital ClientApp (medflower.client.app:app): it trains on the hospital's own "
            f"files, named by node config {keys.NODE_SITE_CONFIG!r}, which this node lacks; start the "
            f"SuperNode with --node-config \"{keys.NODE_SITE_CONFIG}='/path/to/site.yaml'\" "
            f"(simulated sites, node config {keys.NODE_PARTITION_ID!r}, run the simulation's ClientApp)"
        )
    return Path(path).expanduser()


@dataclass(frozen=True)
class HospitalNode:
    """What a hospital node knows of itself before any work: its site YAML and its state folder."""

    site_yaml: Path
    site: SiteConfig
    state_dir: Path | None

    @classmethod
    def of(cls, context: Context) -> HospitalNode:
        path = site_yaml_of(context)
        site = load_site_config(path)
        return cls(path, site, resolve_state_dir(context, site.state_path(), site_yaml=path))

    def ledger_place(self) -> LedgerPlace:
        """This site's data set's privacy ledger (the data key: :func:`medflower.client.state.data_key`)."""
        key = data_key(kind=self.site.data.kind, source=str(self.site.data_path().resolve()))
        return LedgerPlace(ledger_file(self.state_dir, self.site.name, key) if self.state_dir else None, key)


def load_hospital_site(context: Context, exp: ExperimentConfig) -> SiteData:
    """The hospital's own files, as its site YAML (``node_config["site-config"]``) describes them."""
    return load_site_data(site_yaml_of(context), exp)


def hospital_ledger_place(context: Context, exp: ExperimentConfig, site_name: str) -> LedgerPlace:
    """Where the hospital keeps the privacy ledger of the data set its site YAML names."""
    return HospitalNode.of(context).ledger_place()


def _round_of(msg: Message) -> int | None:
    try:
        return records.get_int(records.config(msg, keys.CONFIG), keys.SERVER_ROUND, 0)
    except ValueError:
        return None


def _experiment_text(msg: Message) -> str | None:
    cfg = msg.content.config_records.get(keys.CONFIG)
    if cfg is None or keys.EXPERIMENT not in cfg:
        return None
    return str(cfg[keys.EXPERIMENT])


def _request(msg: Message, context: Context) -> Request:
    try:
        cfg = records.config(msg, keys.CONFIG)
        return Request(
            kind=str(msg.metadata.message_type).split(".")[0],
            server_round=records.get_int(cfg, keys.SERVER_ROUND, 0),
            eval_split=records.get_str(cfg, keys.EVAL_SPLIT, "val"),
            run_id=int(context.run_id),
        )
    except ValueError as err:
        raise MessageError(str(err)) from err


def _metrics_of(reply: Message) -> dict[str, Any]:
    if reply.has_error():
        return {}
    return {k: v for rec in reply.content.metric_records.values() for k, v in rec.items()}


class _Handling:
    """One message's way through the guard (see the module doc); holds what the audit entries need."""

    def __init__(self, msg: Message, context: Context) -> None:
        self.msg, self.context = msg, context
        self.round = _round_of(msg)
        self.where = f"run {context.run_id} round {self.round} {msg.metadata.message_type} message"
        self.node: HospitalNode | None = None
        self.state_dir: Path | None = None
        self.audit: AuditLog | None = None
        text = _experiment_text(msg)
        self.base: dict[str, Any] = {
            "run_id": int(context.run_id),
            "round": self.round,
            "message_type": str(msg.metadata.message_type),
            "experiment_sha256": experiment_fingerprint(text) if text is not None else None,
        }
        self.ledger: tuple[Path, float] | None = None  # (ledger file, delta) when DP-SGD is accounted
        self.epsilon_before: float | None = None

    # -- steps
    def open_node(self) -> Exception | None:
        try:
            self.node = HospitalNode.of(self.context)
            self.state_dir = self.node.state_dir
        except Exception as err:  # (contained below, once the audit log is open)
            try:
                self.state_dir = node_state_dir(self.context)  # where the error is still recorded
            except ConfigError:
                self.state_dir = None
            return err
        return None

    def received(self) -> None:
        if self.state_dir is not None:
            self.audit = AuditLog(self.state_dir)
            self.audit.append(
                {
                    "event": "received",
                    **self.base,
                    "message_id": str(self.msg.metadata.message_id),
                    "site": self.node.site.name if self.node is not None else None,
                    "arrays_sha256": content_arrays(self.msg.content),
                }
            )

    def epsilon(self) -> float | None:
        if self.ledger is None:
            return None
        try:
            return ledger_epsilon(self.ledger[0], delta=self.ledger[1]) or 0.0
        except Exception as err:  # (the audit's epsilon must not stop a reply; the ledger itself will)
            SITE_LOGGER.warning("%s: could not read the privacy ledger for the audit log: %s", self.where, err)
            return None

    def sent(self, reply: Message, *, refusal: str | None = None, error: dict[str, str] | None = None) -> Message:
        """Record the reply, then return it; an unwritable log withholds it (an ``audit-error`` goes instead)."""
        if self.audit is None:
            return reply
        metrics = _metrics_of(reply)
        if refusal is None and metrics.get(keys.DP_EXHAUSTED) == 1:
            refusal = "dp-budget: the site's privacy budget is exhausted"
        if error is None and reply.has_error():  # an error a Flower mod answered with (e.g. a clipping precondition)
            error = {"code": f"flower-{reply.error.code}", "ref": ""}
        try:
            self.audit.append(
                {
                    "event": "sent",
                    **self.base,
                    "reply_to": str(self.msg.metadata.message_id),
                    "arrays_sha256": content_arrays(reply.content) if reply.has_content() else None,
                    "metrics": metrics,
                    "epsilon_before": self.epsilon_before,
                    "epsilon_after": self.epsilon() if self.ledger is not None else None,
                    "refusal": refusal,
                    "error": error,
                }
            )
        except AuditError as err:
            return contain(err, self.msg, where=self.where, state_dir=self.state_dir, cls=AUDIT_ERROR).reply
        return reply

    def contained(self, err: BaseException, **kw: Any) -> Message:
        c = contain(err, self.msg, where=self.where, state_dir=self.state_dir, **kw)
        return self.sent(c.reply, error={"code": c.code, "ref": c.ref})

    def run(self, call_next: ClientAppCallable) -> Message:
        node_error = self.open_node()
        self.received()  # AuditError: contained by hospital_guard, nothing else happens
        if node_error is not None or self.node is None:
            return self.contained(node_error or RuntimeError("no site"))
        node = self.node
        try:
            exp = experiment_of(self.msg)
            request = _request(self.msg, self.context)
        except Exception as err:
            return self.contained(err, cls=MESSAGE_ERROR)
        try:
            facts = NodeFacts(
                site_name=node.site.name,
                site_task=node.site.task,
                has_state_dir=node.state_dir is not None,
                node_epsilon=node_float(self.context, keys.NODE_DP_TARGET_EPSILON),
                node_delta=node_float(self.context, keys.NODE_DP_TARGET_DELTA),
                rounds_trained=rounds_trained(self.context, node.state_dir, request.run_id),
            )
            # SecAgg+'s share-keys and unmask stages continue a round the site accepted at its setup stage
            # (and counted at its training stage): the policy was applied there, a refusal now would only
            # strand the other sites' masks
            refusal = None if continues_round(self.msg) else refusal_for(node.site.policy, exp, request, facts)
            if exp.privacy.mode == "sample" and node.state_dir is not None and refusal is None:
                path = node.ledger_place().path
                if path is not None:
                    delta = exp.privacy.site_budget(
                        node.site.name, node_epsilon=facts.node_epsilon, node_delta=facts.node_delta
                    )[1]
                    self.ledger = (path, delta)
                    self.epsilon_before = self.epsilon()
        except Exception as err:
            return self.contained(err)
        if refusal is not None:
            SITE_LOGGER.warning("%s refused: %s", self.where, refusal.text)
            return self.sent(refusal_reply(self.msg, node.site.name, refusal.text), refusal=refusal.text)
        try:
            if request.kind == "train" and not is_protocol_only(self.msg):  # SecAgg+ key stages train nothing
                count_round(self.context, node.state_dir, request.run_id)  # before training: a crash still counts
            reply = call_next(self.msg, self.context)
        except Exception as err:
            return self.contained(err)
        return self.sent(reply)


def hospital_guard(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The hospital ClientApp's outermost mod (see the module doc). It never raises."""
    handling: _Handling | None = None
    try:
        handling = _Handling(msg, context)
        return handling.run(call_next)
    except Exception as err:  # (the last line of defence: Flower would send the text)
        where = handling.where if handling is not None else "a message"
        return contain(err, msg, where=where, state_dir=handling.state_dir if handling is not None else None).reply
