"""medflower's ClientApp: a hospital's side of the federation (``medflower.client.app:app``).

What a reply carries is exactly: the model's arrays (train only), a MetricRecord of scalars, and
the site's public name. No pixels, paths or DICOM tags ever enter a reply.

:func:`build_client_app` is the one train/evaluate pipeline; what differs between a hospital and a
simulated site is passed in:

* ``load_site``: where the site's data come from. The hospital app (:data:`app`, this module) reads
  the hospital's site YAML named by ``node_config["site-config"]`` (see :mod:`medflower.client.site`);
  the simulation app (:mod:`medflower.simulation.clientapp`) builds a simulated partition.
* ``transform_update``: applied to the outgoing model arrays after local training; the simulation
  uses it for its SIMULATION-ONLY poisoned updates. The hospital app has none.
* ``refuse``: a reason to refuse an experiment before any work. The hospital app refuses one that
  asks for simulation-only behaviour (:func:`simulation_only_requests`) with an error reply and no
  weights.

This module imports no simulation code: a hospital node never loads it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

import medflower._preload  # noqa: F401  (before any MONAI import: see its docstring)
from medflower import keys, records
from medflower.client.augment import make_augment
from medflower.client.privacy import RoundPrivacy, client_dp_mod
from medflower.client.site import load_site_data
from medflower.client.strategy_hooks import SiteStrategy
from medflower.client.train import make_loader, make_optimizer, train_epochs
from medflower.config import ExperimentConfig
from medflower.data import SiteData
from medflower.modelspec import build_experiment_model
from medflower.tasks import evaluate, inference_roi

SiteLoader = Callable[[Context, ExperimentConfig], SiteData]
# (outgoing arrays, global arrays the message brought, experiment, site name) -> arrays to send
UpdateTransform = Callable[[ArrayRecord, ArrayRecord, ExperimentConfig, str], ArrayRecord]
# experiment -> why this node refuses it (None: it takes part)
Refusal = Callable[[ExperimentConfig], str | None]

# Flower's code for "this node's precondition for the message is not met"; the reason says which
REFUSED = ErrorCode.MOD_FAILED_PRECONDITION


def experiment_of(msg: Message) -> ExperimentConfig:
    cfg = msg.content[keys.CONFIG]
    if keys.EXPERIMENT not in cfg:
        raise ValueError(f"the server's message lacks config key {keys.EXPERIMENT!r} (protocol {keys.PROTOCOL})")
    return ExperimentConfig.from_json(str(cfg[keys.EXPERIMENT]))


def _reply(msg: Message, site_name: str, metrics: Mapping[str, float | int], arrays: ArrayRecord | None) -> Message:
    content = RecordDict(
        {keys.METRICS: MetricRecord(dict(metrics)), keys.SITE: ConfigRecord({keys.SITE_NAME: site_name})}
    )
    if arrays is not None:
        content[keys.ARRAYS] = arrays
    return Message(content=content, reply_to=msg)


def _refusal_mod(refuse: Refusal):
    """A mod that answers with an error (no weights, no work) when ``refuse`` names a reason."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reason = refuse(experiment_of(msg))
        if reason is not None:
            return Message(Error(code=REFUSED, reason=reason), reply_to=msg)
        return call_next(msg, context)

    return mod


def build_client_app(
    *,
    load_site: SiteLoader,
    transform_update: UpdateTransform | None = None,
    refuse: Refusal | None = None,
) -> ClientApp:
    """A ClientApp whose sites' data come from ``load_site(context, exp)`` (see the module doc)."""
    app = ClientApp(mods=[_refusal_mod(refuse)] if refuse is not None else [])

    @app.train(mods=[client_dp_mod])  # Flower's client-side clipping when client-level DP asks for it
    def train(msg: Message, context: Context) -> Message:
        exp = experiment_of(msg)
        torch.set_num_threads(exp.train.num_threads)
        site = load_site(context, exp)
        model = build_experiment_model(exp)
        global_arrays = records.arrays(msg, keys.ARRAYS)
        model.load_state_dict(global_arrays.to_torch_state_dict())
        local = SiteStrategy.for_message(msg, context, exp, model)  # the method's site half (FedProx, SCAFFOLD, ...)
        server_round = records.get_int(records.config(msg, keys.CONFIG), keys.SERVER_ROUND, 0)
        seed = (
            exp.seed * 100003 + server_round * 101 + zlib.crc32(site.name.encode()) % 97
        )  # not hash(): salted per process
        torch.manual_seed(seed)
        loader = make_loader(site.train, exp.train.batch_size, seed)
        optimizer = make_optimizer(model, exp.train)
        dp = RoundPrivacy.start(exp, context, site=site.name, num_train=len(site.train), server_round=server_round)
        if dp.refusal is not None:  # DP budget exhausted: the site says so and sends no weights
            return _reply(msg, site.name, dp.refusal, None)
        train_model, optimizer, loader = dp.wrap(model, optimizer, loader, local.hooks)  # Opacus (mode sample)
        stats = train_epochs(
            train_model,
            loader,
            optimizer,
            epochs=exp.train.local_epochs,
            task=exp.task,
            hooks=local.hooks,
            augment=make_augment(exp.train.augment, seed=seed),
        )
        metrics = {keys.NUM_EXAMPLES: stats.num_examples, keys.TRAIN_LOSS: stats.loss} | dp.finish(stats)
        arrays, extra_records, extra_metrics = local.after_train(model, stats, site=site, seed=seed)
        if transform_update is not None:
            arrays = transform_update(arrays, global_arrays, exp, site.name)
        reply = _reply(msg, site.name, metrics | extra_metrics, arrays)
        for key, record in extra_records.items():  # e.g. SCAFFOLD's control variate change
            reply.content[key] = record
        return reply

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        exp = experiment_of(msg)
        torch.set_num_threads(exp.train.num_threads)
        site = load_site(context, exp)
        split_name = str(msg.content[keys.CONFIG].get(keys.EVAL_SPLIT, "val"))
        split = site.split(split_name)
        model = build_experiment_model(exp)
        global_arrays = records.arrays(msg, keys.ARRAYS)
        model.load_state_dict(global_arrays.to_torch_state_dict())
        local = SiteStrategy.for_message(msg, context, exp, model)  # FedBN: the site's own norm layers
        res = evaluate(model, split, task=exp.task, batch_size=exp.train.eval_batch_size, roi_size=inference_roi(exp))
        metrics: dict[str, float | int] = {keys.NUM_EXAMPLES: len(split)}
        metrics |= {(keys.EVAL_LOSS if k == "loss" else f"{split_name}-{k}"): v for k, v in res.items()}
        metrics |= local.personal_metrics(split, split_name)  # Ditto: personal-<split>-<metric>
        return _reply(msg, site.name, metrics, None)

    return app


# ------------------------------------------------------------------------------------------ the hospital
def load_hospital_site(context: Context, exp: ExperimentConfig) -> SiteData:
    """The hospital's own files, as its site YAML (``node_config["site-config"]``) describes them."""
    path = str(context.node_config.get(keys.NODE_SITE_CONFIG, "") or "")
    if not path:
        raise ValueError(
            f"this is the hospital ClientApp (medflower.client.app:app): it trains on the hospital's own "
            f"files, named by node config {keys.NODE_SITE_CONFIG!r}, which this node lacks; start the "
            f"SuperNode with --node-config \"{keys.NODE_SITE_CONFIG}='/path/to/site.yaml'\" "
            f"(simulated sites, node config {keys.NODE_PARTITION_ID!r}, run the simulation's ClientApp)"
        )
    return load_site_data(path, exp)


def simulation_only_requests(exp: ExperimentConfig) -> list[str]:
    """What ``exp`` asks a site to do that only a simulated site may do (empty: nothing)."""
    found = []
    if exp.attack.kind != "none":
        sites = ", ".join(exp.attack.sites)
        found.append(f"attack.kind {exp.attack.kind!r} (simulated sites {sites} send poisoned updates)")
    return found


def hospital_refusal(exp: ExperimentConfig) -> str | None:
    """Why a hospital node refuses ``exp`` (None: it takes part)."""
    requests = simulation_only_requests(exp)
    if not requests:
        return None
    return (
        f"refused by a hospital node: experiment {exp.name!r} asks for simulation-only behaviour: "
        + "; ".join(requests)
        + ". Rule: a deployed hospital node never runs simulation-only code; remove that section from "
        "the experiment to run it across hospitals"
    )


app = build_client_app(load_site=load_hospital_site, refuse=hospital_refusal)
