"""Turn an experiment's data set into simulated hospitals: partition, then each site's scanner shift.

Both steps are drawn once from the experiment's seed and applied to the train, val and test splits
alike, so a site's test data come from the same case mix and the same scanner as its training data.
Every process that calls :func:`build_sites` (the server, each Flower client, ``medflower compare``)
gets byte-identical sites.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from flwr.app import Context

from medflower import keys
from medflower.config import ExperimentConfig
from medflower.data import ArraySplit, DatasetSplits, SiteData, load_dataset
from medflower.simulation.partition import PartitionPlan, plan_partition
from medflower.simulation.shift import site_scanners

SPLITS = ("train", "val", "test")


def site_names(num_sites: int) -> list[str]:
    return [f"site-{i}" for i in range(num_sites)]


def build_sites(exp: ExperimentConfig) -> list[SiteData]:
    """Deterministic in ``exp.seed``: the same experiment gives the same sites in every process."""
    return _build(exp.to_json())


def load_partition(context: Context, exp: ExperimentConfig) -> SiteData:
    """The simulated site a node plays: ``node_config["partition-id"]`` indexes :func:`build_sites`."""
    nc = context.node_config
    if keys.NODE_PARTITION_ID not in nc:
        raise ValueError(
            f"this is the simulation's ClientApp (medflower.simulation.clientapp:app): node config has no "
            f"{keys.NODE_PARTITION_ID!r} (which simulated site to play); a hospital's node with "
            f"{keys.NODE_SITE_CONFIG!r} runs the hospital ClientApp, medflower.client.app:app"
        )
    sites = build_sites(exp)
    pid = int(nc[keys.NODE_PARTITION_ID])
    if not 0 <= pid < len(sites):
        raise ValueError(f"partition-id {pid} is out of range: the experiment has {len(sites)} sites")
    return sites[pid]


def partition_plan(exp: ExperimentConfig, ds: DatasetSplits | None = None) -> PartitionPlan:
    """The experiment's partition, drawn from its training split (natural: from the groups)."""
    ds = ds if ds is not None else load_dataset(exp)
    num_classes = ds.num_classes if ds.task == "classification" else 1
    return plan_partition(exp.partition, {n: ds.split(n) for n in SPLITS}, num_classes=num_classes, seed=exp.seed)


@lru_cache(maxsize=4)
def _build(exp_json: str) -> list[SiteData]:
    exp = ExperimentConfig.from_json(exp_json)
    ds: DatasetSplits = load_dataset(exp)
    plan = partition_plan(exp, ds)
    parts = {n: plan.apply(ds.split(n), np.random.default_rng([exp.seed, k])) for k, n in enumerate(SPLITS)}
    names = site_names(exp.partition.num_sites)
    scanners = site_scanners(exp, ds, names)
    sites = []
    for s, name in enumerate(names):
        splits = {}
        for n in SPLITS:
            sub = ds.split(n).subset(parts[n][s])
            splits[n] = ArraySplit(scanners[s].apply(sub.images, n), sub.targets, sub.groups)
        info: dict[str, Any] = {"scanner": scanners[s].describe()}
        if exp.shift.sites.get(name) is not None:
            info["preset"] = exp.shift.sites[name].preset
        if plan.group_key is not None:
            info["group"] = {plan.group_key: plan.group_values[s]}
        sites.append(SiteData(name, splits["train"], splits["val"], splits["test"], info))
    return sites
