"""Partitioners: split a data set's samples into simulated hospitals.

Design: a label-skew partitioner draws a class-by-site proportion matrix ``P[c, s]`` (each row sums
to 1) once, and :func:`assign` applies the *same* matrix to the train, val and test splits. A site's
test split therefore has the same case mix as its training data (as a real hospital's would), and
the union of the site test splits is the whole held-out test set.

Flower's ``flwr-datasets`` has Dirichlet/IID partitioners, but only over Hugging Face ``Dataset``
objects (pulling in ``datasets``/``pyarrow``) and one split at a time, so the shared-proportions
design above is written here.
"""

from __future__ import annotations

import numpy as np


class PartitionError(ValueError):
    """A partition cannot satisfy its constraints (e.g. a site would be empty)."""


def iid_proportions(num_classes: int, num_sites: int) -> np.ndarray:
    return np.full((num_classes, num_sites), 1.0 / num_sites)


def dirichlet_proportions(num_classes: int, num_sites: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Per class, the share of its samples each site receives, drawn from ``Dir(alpha)``.

    Small ``alpha`` (0.1) gives sites dominated by one or two classes; large (100) is near IID.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    return rng.dirichlet(np.full(num_sites, alpha), size=num_classes)


def assign(labels: np.ndarray, proportions: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Assign every sample to exactly one site, class by class, following ``proportions``.

    Counts per (class, site) are the floor of ``n_c * P[c, s]`` with the remainder given to the
    sites with the largest fractional parts, so totals are exact and every sample is placed.
    """
    num_classes, num_sites = proportions.shape
    parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) == 0:
            continue
        idx = rng.permutation(idx)
        raw = proportions[c] * len(idx)
        counts = np.floor(raw).astype(int)
        remainder = len(idx) - counts.sum()
        if remainder:
            order = np.argsort(-(raw - counts), kind="stable")
            counts[order[:remainder]] += 1
        bounds = np.concatenate([[0], np.cumsum(counts)])
        for s in range(num_sites):
            parts[s].append(idx[bounds[s]:bounds[s + 1]])
    out = [np.sort(np.concatenate(p)) if p else np.empty(0, dtype=np.int64) for p in parts]
    unlabelled = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(unlabelled):
        raise PartitionError(f"{len(unlabelled)} labels fall outside 0..{num_classes - 1}")
    return [o.astype(np.int64) for o in out]


def partition_proportions(
    labels: np.ndarray,
    *,
    num_classes: int,
    num_sites: int,
    kind: str,
    alpha: float = 0.5,
    min_site_size: int = 1,
    seed: int = 0,
    max_tries: int = 1000,
) -> np.ndarray:
    """Draw a proportion matrix whose assignment of ``labels`` gives every site >= ``min_site_size``.

    Dirichlet draws are resampled (seeded) until the constraint holds, the usual practice in the
    FL literature; the error names the setting to change when it cannot be met.
    """
    rng = np.random.default_rng(seed)
    if num_sites * max(min_site_size, 0) > len(labels):
        raise PartitionError(
            f"partition.min_site_size={min_site_size} x partition.num_sites={num_sites} exceeds the "
            f"{len(labels)} training samples"
        )
    if kind == "iid":
        return iid_proportions(num_classes, num_sites)
    if kind != "dirichlet":
        raise ValueError(f"partition.kind: invalid value {kind!r}; valid choices are 'iid', 'dirichlet'")
    for _ in range(max_tries):
        props = dirichlet_proportions(num_classes, num_sites, alpha, rng)
        sizes = [len(p) for p in assign(labels, props, np.random.default_rng(0))]
        if min(sizes) >= min_site_size:
            return props
    raise PartitionError(
        f"no Dirichlet(alpha={alpha}) draw in {max_tries} tries gave every one of {num_sites} sites "
        f">= {min_site_size} samples; raise partition.alpha or lower partition.min_site_size"
    )
