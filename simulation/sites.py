"""Turn an experiment's data set into simulated hospitals (partition, then per-site shift)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from medflower.config import ExperimentConfig
from medflower.data import ArraySplit, DatasetSplits, load_dataset
from simulation.partition import assign, partition_proportions


@dataclass
class SiteData:
    """One simulated hospital's splits. ``name`` is public (``site-0``…); nothing else leaves it."""

    name: str
    train: ArraySplit
    val: ArraySplit
    test: ArraySplit

    def split(self, name: str) -> ArraySplit:
        return getattr(self, name)


def site_names(num_sites: int) -> list[str]:
    return [f"site-{i}" for i in range(num_sites)]


def build_sites(exp: ExperimentConfig) -> list[SiteData]:
    """Deterministic in ``exp.seed``: the same experiment gives the same sites in every process."""
    return _build(exp.to_json())


@lru_cache(maxsize=4)
def _build(exp_json: str) -> list[SiteData]:
    exp = ExperimentConfig.from_json(exp_json)
    ds: DatasetSplits = load_dataset(exp)
    p = exp.partition
    num_classes = ds.num_classes if ds.task == "classification" else 1
    props = partition_proportions(
        ds.train.partition_labels(), num_classes=num_classes, num_sites=p.num_sites, kind=p.kind,
        alpha=getattr(p, "alpha", 0.5), min_site_size=p.min_site_size, seed=exp.seed,
    )
    parts = {}
    for k, split_name in enumerate(("train", "val", "test")):
        split = ds.split(split_name)
        parts[split_name] = assign(split.partition_labels(), props, np.random.default_rng([exp.seed, k]))
    sites = []
    for s, name in enumerate(site_names(p.num_sites)):
        sites.append(SiteData(name, *(ds.split(n).subset(parts[n][s]) for n in ("train", "val", "test"))))
    return sites
