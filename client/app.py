"""medflower's ClientApp: a hospital's side of the federation (``medflower.client.app:app``).

What a reply carries is exactly: the model's arrays (train only), a MetricRecord of scalars, and
the site's public name. No pixels, paths or DICOM tags ever enter a reply.

Where the site's data comes from:
* simulation: ``node_config["partition-id"]`` picks one simulated hospital of the experiment;
* deployment: ``node_config["site-config"]`` names the hospital's site YAML (see ``medflower.client.site``).
"""

from __future__ import annotations

import zlib

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import medflower._preload  # noqa: F401  (before any MONAI import: see its docstring)
from medflower import keys
from medflower.client.augment import make_augment
from medflower.client.privacy import RoundPrivacy, client_dp_mod
from medflower.client.strategy_hooks import SiteStrategy
from medflower.client.train import make_loader, make_optimizer, train_epochs
from medflower.config import ExperimentConfig
from medflower.modelspec import build_experiment_model
from medflower.tasks import evaluate, inference_roi

app = ClientApp()


def experiment_of(msg: Message) -> ExperimentConfig:
    cfg = msg.content[keys.CONFIG]
    if keys.EXPERIMENT not in cfg:
        raise ValueError(f"the server's message lacks config key {keys.EXPERIMENT!r} (protocol {keys.PROTOCOL})")
    return ExperimentConfig.from_json(str(cfg[keys.EXPERIMENT]))


def load_site(context: Context, exp: ExperimentConfig):
    """The site's data: a simulated partition, or the hospital's own files in deployment."""
    nc = context.node_config
    if keys.NODE_SITE_CONFIG in nc and str(nc[keys.NODE_SITE_CONFIG]):
        from medflower.client.site import load_site_data

        return load_site_data(str(nc[keys.NODE_SITE_CONFIG]), exp)
    if keys.NODE_PARTITION_ID not in nc:
        raise ValueError(
            f"node config has neither {keys.NODE_SITE_CONFIG!r} (a hospital's site YAML) nor "
            f"{keys.NODE_PARTITION_ID!r} (a simulated site); start the SuperNode with "
            f"--node-config \"{keys.NODE_SITE_CONFIG}='site.yaml'\""
        )
    from medflower.simulation.sites import build_sites

    sites = build_sites(exp)
    pid = int(nc[keys.NODE_PARTITION_ID])
    if not 0 <= pid < len(sites):
        raise ValueError(f"partition-id {pid} is out of range: the experiment has {len(sites)} sites")
    return sites[pid]


def _reply(msg: Message, site_name: str, metrics: dict[str, float | int], arrays: ArrayRecord | None) -> Message:
    content = RecordDict({keys.METRICS: MetricRecord(metrics), keys.SITE: ConfigRecord({keys.SITE_NAME: site_name})})
    if arrays is not None:
        content[keys.ARRAYS] = arrays
    return Message(content=content, reply_to=msg)


@app.train(mods=[client_dp_mod])  # Flower's client-side clipping when client-level DP asks for it
def train(msg: Message, context: Context) -> Message:
    exp = experiment_of(msg)
    torch.set_num_threads(exp.train.num_threads)
    site = load_site(context, exp)
    model = build_experiment_model(exp)
    model.load_state_dict(msg.content[keys.ARRAYS].to_torch_state_dict())
    local = SiteStrategy.for_message(msg, context, exp, model)  # strategy's client half (FedProx, SCAFFOLD, ...)
    server_round = int(msg.content[keys.CONFIG].get(keys.SERVER_ROUND, 0))
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
    model.load_state_dict(msg.content[keys.ARRAYS].to_torch_state_dict())
    local = SiteStrategy.for_message(msg, context, exp, model)  # FedBN: the site's own norm layers
    res = evaluate(model, split, task=exp.task, batch_size=exp.train.eval_batch_size, roi_size=inference_roi(exp))
    metrics: dict[str, float | int] = {keys.NUM_EXAMPLES: len(split)}
    metrics |= {(keys.EVAL_LOSS if k == "loss" else f"{split_name}-{k}"): v for k, v in res.items()}
    metrics |= local.personal_metrics(split, split_name)  # Ditto: personal-<split>-<metric>
    return _reply(msg, site.name, metrics, None)
