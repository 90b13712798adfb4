"""medflower's ClientApp: a hospital's side of the federation (``medflower.client.app:app``).

What a reply carries is exactly: the model's arrays (train only), a MetricRecord of scalars, and
the site's public name (:mod:`medflower.client.replies`). No pixels, paths or DICOM tags ever
enter a reply.

:func:`build_client_app` is the one train/evaluate pipeline; what differs between a hospital and a
simulated site is passed in:

* ``load_site``: where the site's data come from. The hospital app (:data:`app`, this module) reads
  the hospital's site YAML named by ``node_config["site-config"]`` (see :mod:`medflower.client.site`);
  the simulation app (:mod:`medflower.simulation.clientapp`) builds a simulated partition.
* ``transform_update``: applied to the outgoing model arrays after local training; the simulation
  uses it for its SIMULATION-ONLY poisoned updates. The hospital app has none.
* ``guard``: a mod around every message. The hospital's (:func:`medflower.client.hospital.hospital_guard`)
  checks each message against the site's policy before any work, keeps the audit trail in the
  node's state folder and contains every error (a code and a reference id reach the coordinator,
  the traceback stays at the site). The simulation has none: a researcher needs full errors.
* ``locate_ledger``: where a site keeps the privacy ledger of its data set (DP-SGD): the hospital's
  state folder and site YAML (:func:`medflower.client.hospital.hospital_ledger_place`), or node config
  ``state-dir`` for a simulated site (:func:`medflower.client.state.node_ledger_place`).

This module imports no simulation code: a hospital node never loads it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from torch import nn

import medflower._preload  # noqa: F401  (before any MONAI import: see its docstring)
from medflower import keys, records
from medflower.client.augment import make_augment
from medflower.client.featurestats import release_feature_stats
from medflower.client.hospital import hospital_guard, hospital_ledger_place, load_hospital_site
from medflower.client.privacy import RoundPrivacy, client_dp_mod
from medflower.client.replies import experiment_of, site_reply
from medflower.client.secagg import secagg_mod
from medflower.client.state import LedgerPlace, node_ledger_place
from medflower.client.strategy_hooks import SiteStrategy
from medflower.client.train import make_loader, make_optimizer, train_epochs
from medflower.config import ExperimentConfig
from medflower.data import SiteData
from medflower.device import Amp, inference_amp, pin_memory, resolve_amp
from medflower.modelspec import build_experiment_model
from medflower.seeding import derive_seed, seed_everything
from medflower.tasks import evaluate, inference_roi

__all__ = [
    "app",
    "build_client_app",
    "experiment_of",
    "load_hospital_site",
]

SiteLoader = Callable[[Context, ExperimentConfig], SiteData]
# (outgoing arrays, global arrays the message brought, experiment, site name) -> arrays to send
UpdateTransform = Callable[[ArrayRecord, ArrayRecord, ExperimentConfig, str], ArrayRecord]
# (context, experiment, site name) -> where the site's data set's privacy ledger lives
LedgerLocator = Callable[[Context, ExperimentConfig, str], LedgerPlace]


def _global_model(
    msg: Message, context: Context, exp: ExperimentConfig, amp: Amp
) -> tuple[nn.Module, ArrayRecord, SiteStrategy]:
    """The message's global model on the site's device, its arrays, and the method's site half."""
    model = build_experiment_model(exp)
    global_arrays = records.arrays(msg, keys.ARRAYS)
    model.load_state_dict(global_arrays.to_torch_state_dict())
    model.to(amp.device)  # before the site half: SCAFFOLD's control variates follow the model
    return model, global_arrays, SiteStrategy.for_message(msg, context, exp, model, amp)


def timing_mod() -> Mod | None:
    """A mod adding ``compute-seconds`` (the message's handling in this ClientApp process) to every
    reply's metrics, when the node runs with ``MEDFLOWER_SITE_TIMING=1``: bench/deploy_rounds.py's
    measure of a site's compute, against which it counts a deployed round's overhead. Off by
    default: a wall-clock time among the metrics would make two runs' summaries differ."""
    if os.environ.get(keys.SITE_TIMING_ENV) != "1":
        return None

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        t0 = time.perf_counter()
        reply = call_next(msg, context)
        if reply.has_content():
            for rec in reply.content.metric_records.values():
                rec[keys.COMPUTE_SECONDS] = time.perf_counter() - t0
        return reply

    return mod


def build_client_app(
    *,
    load_site: SiteLoader,
    transform_update: UpdateTransform | None = None,
    guard: Mod | None = None,
    locate_ledger: LedgerLocator = node_ledger_place,
) -> ClientApp:
    """A ClientApp whose sites' data come from ``load_site(context, exp)`` (see the module doc)."""
    # the timing mod inside the guard: the handler's own time, not the guard's bookkeeping
    app = ClientApp(mods=[m for m in (guard, timing_mod()) if m is not None])

    # SecAgg+ outermost: it masks what the client-DP mod (Flower's client-side clipping) lets out
    @app.train(mods=[secagg_mod, client_dp_mod])
    def train(msg: Message, context: Context) -> Message:
        exp = experiment_of(msg)
        torch.set_num_threads(exp.train.num_threads)
        site = load_site(context, exp)
        amp = resolve_amp(exp.train.device, exp.train.precision, where=f"site {site.name!r}")  # this node's hardware
        model, global_arrays, local = _global_model(msg, context, exp, amp)  # local: FedProx, SCAFFOLD, ...
        server_round = records.get_int(records.config(msg, keys.CONFIG), keys.SERVER_ROUND, 0)
        # one stream per (experiment seed, site, round): batch order, augmentation, dropout (medflower.seeding)
        seed = derive_seed(exp.seed, "train", site.name, server_round)
        seed_everything(seed)
        loader = make_loader(site.train, exp.train.batch_size, seed, pin_memory=pin_memory(amp.device))
        optimizer = make_optimizer(model, exp.privacy.local_train(exp.train))  # DP-SGD: its own recipe
        place = locate_ledger(context, exp, site.name) if exp.privacy.mode == "sample" else None
        dp = RoundPrivacy.start(
            exp, context, site=site.name, num_train=len(site.train), server_round=server_round, place=place
        )
        if dp.refusal is not None:  # DP budget exhausted: the site says so and sends no weights
            return site_reply(msg, site.name, dp.refusal, None)
        train_model, optimizer, loader = dp.wrap(model, optimizer, loader, local.hooks)  # Opacus (mode sample)
        stats = train_epochs(
            train_model,
            loader,
            optimizer,
            epochs=exp.train.local_epochs,
            task=exp.task,
            hooks=local.hooks,
            augment=make_augment(exp.train.augment, seed=seed),
            amp=amp,
            multiplicity=exp.train.augment_multiplicity,
        )
        metrics = {keys.NUM_EXAMPLES: stats.num_examples, keys.TRAIN_LOSS: stats.loss} | dp.finish(stats)
        arrays, extra_records, extra_metrics = local.after_train(model, stats, site=site, seed=seed)
        if transform_update is not None:
            arrays = transform_update(arrays, global_arrays, exp, site.name)
        reply = site_reply(msg, site.name, metrics | extra_metrics, arrays, site.info.get("preparation"))
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
        amp = resolve_amp(exp.train.device, exp.train.precision, where=f"site {site.name!r}")
        model, _, local = _global_model(msg, context, exp, amp)  # local: FedBN's own norm layers, Ditto's model
        res = evaluate(
            model,
            split,
            task=exp.task,
            batch_size=exp.train.eval_batch_size,
            roi_size=inference_roi(exp),
            amp=inference_amp(amp.device, amp.precision),
            histograms=split_name == "val",  # binary: the federated threshold's counts (medflower.threshold)
        )
        metrics: dict[str, float | int | list[int]] = {keys.NUM_EXAMPLES: len(split)}
        metrics |= {(keys.EVAL_LOSS if k == "loss" else f"{split_name}-{k}"): v for k, v in res.items()}
        metrics |= local.personal_metrics(split, split_name)  # Ditto: personal-<split>-<metric>
        return site_reply(msg, site.name, metrics, None, site.info.get("preparation"))

    @app.query()
    def feature_stats(msg: Message, context: Context) -> Message:
        """The head's input statistics under DP, before round 1 (privacy.feature_stats_noise)."""
        exp = experiment_of(msg)
        torch.set_num_threads(exp.train.num_threads)
        site = load_site(context, exp)
        amp = resolve_amp(exp.train.device, exp.train.precision, where=f"site {site.name!r}")
        model = build_experiment_model(exp)
        model.load_state_dict(records.arrays(msg, keys.ARRAYS).to_torch_state_dict())
        model.to(amp.device)
        place = locate_ledger(context, exp, site.name) if exp.privacy.mode == "sample" else None
        return release_feature_stats(msg, context, exp=exp, site=site, model=model, place=place, device=amp.device)

    return app


# ------------------------------------------------------------------------------------------ the hospital
app = build_client_app(load_site=load_hospital_site, guard=hospital_guard, locate_ledger=hospital_ledger_place)
