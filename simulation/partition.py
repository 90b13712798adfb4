"""Partitioners: split a data set's samples into simulated hospitals.

Design: every label/quantity partitioner produces one class-by-site proportion matrix ``P[c, s]``
(each row sums to 1: the share of class ``c`` that site ``s`` receives), drawn once, and
:func:`assign` applies the *same* matrix to the train, val and test splits. A site's test split
therefore has the same case mix and the same relative size as its training data (as a real
hospital's would), and the union of the site test splits is the whole held-out test set.

* IID: ``P[c, s] = 1 / S``.
* Dirichlet label skew: each row drawn from ``Dir(alpha)`` (Flower's ``DirichletPartitioner`` draw),
  redrawn (seeded) until every site has ``min_site_size`` samples.
* Pathological: each site holds exactly ``k`` classes, chosen as Flower's ``PathologicalPartitioner``
  does (``first-deterministic``, ``random`` or ``deterministic``); a class is split evenly among the
  sites that hold it.
* Quantity skew (power law or explicit relative sizes), alone (on IID) or combined with label skew:
  the label partition's matrix is rescaled by iterative proportional fitting (Sinkhorn) to the
  target site sizes. The fitted matrix is ``diag(a) P diag(b)``: it keeps the label skew's odds
  between sites for every class and gives each site its target size, with every sample placed.
* Natural: one site per value of a per-sample group (hospital, scanner) in ``ArraySplit.groups``;
  group membership, not a matrix, decides — in every split.

Why not Flower's ``flwr-datasets`` partitioners: they operate on a Hugging Face ``datasets.Dataset``,
one split at a time, so a site's test split would not share its training case mix; and the package
pulls in ``datasets``, ``pyarrow``, ``pandas``, ``huggingface_hub``, ``aiohttp`` and ``seaborn``
(20 packages, checked with ``pip install --dry-run flwr-datasets==0.6.1``) for what is here a few
dozen lines on in-memory numpy arrays. The draws and class-assignment modes follow Flower's, so the
literature's settings carry over by name. The IPF combination of label and quantity skew is not in
Flower (its partitioners do one or the other).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from medflower.config.partition import PartitionConfig
from medflower.data import ArraySplit


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


def pathological_classes(
    num_classes: int, num_sites: int, classes_per_site: int, mode: str, rng: np.random.Generator
) -> list[list[int]]:
    """Which classes each site holds (Flower's ``PathologicalPartitioner`` modes).

    ``first-deterministic``: site ``s`` holds class ``s % C`` plus random others (every class is used
    when there are at least as many sites as classes); ``random``: ``k`` classes without replacement;
    ``deterministic``: classes ``s, s+1, ..., s+k-1`` (mod C).
    """
    if classes_per_site > num_classes:
        raise PartitionError(
            f"partition.classes_per_site={classes_per_site} exceeds the data set's {num_classes} classes"
        )
    out: list[list[int]] = []
    for s in range(num_sites):
        if mode == "first-deterministic":
            chosen = [s % num_classes]
            others = [c for c in rng.permutation(num_classes).tolist() if c != chosen[0]]
            chosen += others[: classes_per_site - 1]
        elif mode == "random":
            chosen = rng.choice(num_classes, size=classes_per_site, replace=False).tolist()
        elif mode == "deterministic":
            chosen = [(s + i) % num_classes for i in range(classes_per_site)]
        else:
            raise ValueError(
                f"partition.class_assignment: invalid value {mode!r}; valid choices are "
                "'first-deterministic', 'random', 'deterministic'"
            )
        out.append(sorted(int(c) for c in chosen))
    return out


def pathological_proportions(
    num_classes: int, num_sites: int, classes_per_site: int, mode: str, rng: np.random.Generator
) -> np.ndarray:
    """``P[c, s] = 1 / (sites holding c)`` where site ``s`` holds ``c``, else 0.

    A class no site holds keeps an all-zero row: :func:`assign` leaves its samples unassigned
    (with a warning naming the classes), as Flower does.
    """
    props = np.zeros((num_classes, num_sites))
    for s, classes in enumerate(pathological_classes(num_classes, num_sites, classes_per_site, mode, rng)):
        props[classes, s] = 1.0
    held = props.sum(axis=1, keepdims=True)
    return np.divide(props, held, out=np.zeros_like(props), where=held > 0)


def quantity_shares(
    num_sites: int, kind: str, *, exponent: float = 1.0, sizes: tuple[float, ...] | None = None
) -> np.ndarray | None:
    """Target share of all samples per site; ``None`` for ``kind='none'``."""
    if kind == "none":
        return None
    if kind == "power-law":
        w = (np.arange(num_sites) + 1.0) ** -float(exponent)
    elif kind == "sizes":
        if sizes is None or len(sizes) != num_sites or any(not s > 0 for s in sizes):
            raise PartitionError(f"partition.sizes: need {num_sites} positive relative sizes, got {sizes}")
        w = np.asarray(sizes, dtype=float)
    else:
        raise ValueError(f"partition.quantity: invalid value {kind!r}; valid choices are 'none', 'power-law', 'sizes'")
    return w / w.sum()


def fit_site_sizes(
    proportions: np.ndarray, class_counts: np.ndarray, shares: np.ndarray, *, iters: int = 500, tol: float = 1e-10
) -> np.ndarray:
    """Rescale a label-skew matrix so that the sites' sizes follow ``shares`` (iterative proportional fitting).

    Starts from the expected counts ``n_c * P[c, s]`` and alternately scales columns to the target
    site sizes and rows back to the class counts. Structural zeros (a pathological site's absent
    classes) stay zero; when they make the targets unreachable, the fit gets as close as it can and
    the row constraint (every sample placed) still holds exactly.
    """
    counts = class_counts.astype(float)
    k = proportions * counts[:, None]
    target = shares * counts.sum()
    for _ in range(iters):
        col = k.sum(axis=0)
        k = k * np.divide(target, col, out=np.ones_like(col), where=col > 0)[None, :]
        row = k.sum(axis=1)
        k = k * np.divide(counts, row, out=np.ones_like(row), where=row > 0)[:, None]
        if np.abs(k.sum(axis=0) - target).max() <= tol * max(counts.sum(), 1.0):
            break
    row = k.sum(axis=1, keepdims=True)
    return np.where(row > 0, k / np.where(row > 0, row, 1.0), proportions)


def assign(labels: np.ndarray, proportions: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Assign every sample to exactly one site, class by class, following ``proportions``.

    Counts per (class, site) are the floor of ``n_c * P[c, s]`` with the remainder given to the
    sites with the largest fractional parts, so totals are exact and every sample is placed —
    except those of a class whose row is all zero (a pathological class no site holds).
    """
    num_classes, num_sites = proportions.shape
    unlabelled = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(unlabelled):
        raise PartitionError(f"{len(unlabelled)} labels fall outside 0..{num_classes - 1}")
    parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
    dropped = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) == 0:
            continue
        if not proportions[c].sum() > 0:
            dropped.append(c)
            continue
        idx = rng.permutation(idx)
        raw = proportions[c] / proportions[c].sum() * len(idx)
        counts = np.floor(raw).astype(int)
        remainder = len(idx) - counts.sum()
        if remainder:
            order = np.argsort(-(raw - counts), kind="stable")
            counts[order[:remainder]] += 1
        bounds = np.concatenate([[0], np.cumsum(counts)])
        for s in range(num_sites):
            parts[s].append(idx[bounds[s] : bounds[s + 1]])
    if dropped:
        warnings.warn(
            f"classes {dropped} are held by no site (pathological partition): their samples are "
            "left out; raise partition.classes_per_site or partition.num_sites to use them",
            stacklevel=2,
        )
    return [np.sort(np.concatenate(p)).astype(np.int64) if p else np.empty(0, dtype=np.int64) for p in parts]


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
    classes_per_site: int = 2,
    class_assignment: str = "first-deterministic",
    quantity: str = "none",
    exponent: float = 1.0,
    sizes: tuple[float, ...] | None = None,
) -> np.ndarray:
    """Draw a proportion matrix whose assignment of ``labels`` gives every site >= ``min_site_size``.

    Random draws (Dirichlet, random class choice) are repeated (seeded) until the constraint holds,
    the usual practice in the FL literature; the error names the setting to change when it cannot be met.
    """
    rng = np.random.default_rng(seed)
    if num_sites * max(min_site_size, 0) > len(labels):
        raise PartitionError(
            f"partition.min_site_size={min_site_size} x partition.num_sites={num_sites} exceeds the "
            f"{len(labels)} training samples"
        )
    valid = ("iid", "dirichlet", "pathological")
    if kind not in valid:
        raise ValueError(
            f"partition.kind: invalid value {kind!r}; valid choices here are "
            + ", ".join(repr(v) for v in valid)
            + " ('natural' partitions by group, see plan_partition)"
        )
    shares = quantity_shares(num_sites, quantity, exponent=exponent, sizes=sizes)
    class_counts = np.bincount(labels.astype(np.int64), minlength=num_classes)[:num_classes]

    def draw() -> np.ndarray:
        if kind == "iid":
            props = iid_proportions(num_classes, num_sites)
        elif kind == "dirichlet":
            props = dirichlet_proportions(num_classes, num_sites, alpha, rng)
        else:
            props = pathological_proportions(num_classes, num_sites, classes_per_site, class_assignment, rng)
        return props if shares is None else fit_site_sizes(props, class_counts, shares)

    random_draw = kind == "dirichlet" or (kind == "pathological" and class_assignment != "deterministic")
    tries = max_tries if random_draw else 1
    sizes_seen: list[int] = []
    for _ in range(tries):
        props = draw()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sizes_seen = [len(p) for p in assign(labels, props, np.random.default_rng(0))]
        if min(sizes_seen) >= min_site_size:
            return props
    what = {
        "dirichlet": f"Dirichlet(alpha={alpha})",
        "iid": "IID",
        "pathological": f"pathological ({classes_per_site} classes per site, {class_assignment})",
    }[kind]
    hint = {
        "dirichlet": "raise partition.alpha",
        "iid": "lower partition.num_sites",
        "pathological": "raise partition.classes_per_site",
    }[kind]
    if shares is not None:
        hint += " or soften partition.quantity"
    raise PartitionError(
        f"no {what} partition{'' if tries == 1 else f' in {tries} tries'} gave every one of {num_sites} sites "
        f">= {min_site_size} samples (smallest: {min(sizes_seen)}); {hint} or lower partition.min_site_size"
    )


@dataclass(frozen=True)
class PartitionPlan:
    """What is drawn once and applied to every split: a proportion matrix, or a natural grouping."""

    proportions: np.ndarray | None = None  # (classes, sites), label/quantity partitions
    group_key: str | None = None  # natural partitions: the ArraySplit.groups key
    group_values: tuple[str, ...] = field(default_factory=tuple)  # site s holds group_values[s]

    def apply(self, split: ArraySplit, rng: np.random.Generator) -> list[np.ndarray]:
        """Indices of ``split`` per site."""
        if self.group_key is not None:
            if len(split) == 0:  # an empty split may carry no group arrays at all
                return [np.empty(0, dtype=np.int64) for _ in self.group_values]
            groups = natural_groups(split, self.group_key)
            return [np.flatnonzero(groups == v).astype(np.int64) for v in self.group_values]
        if self.proportions is None:
            raise ValueError("a PartitionPlan needs proportions or a group key")
        return assign(split.partition_labels(), self.proportions, rng)


def natural_groups(split: ArraySplit, key: str) -> np.ndarray:
    if key not in split.groups:
        have = ", ".join(sorted(split.groups)) or "none (this data set carries no per-sample groups)"
        raise PartitionError(f"partition.group: the data set has no group {key!r}; its groups are: {have}")
    return np.asarray(split.groups[key]).astype(str)


def plan_partition(
    cfg: PartitionConfig, splits: dict[str, ArraySplit], *, num_classes: int, seed: int
) -> PartitionPlan:
    """Draw the partition of ``cfg`` from the training split (natural: from every split's groups)."""
    if cfg.kind == "natural":
        key = cfg.group or ""
        values = sorted(set().union(*(set(natural_groups(s, key).tolist()) for s in splits.values() if len(s))))
        if len(values) != cfg.num_sites:
            shown = ", ".join(values[:10]) + (", ..." if len(values) > 10 else "")
            raise PartitionError(
                f"partition.num_sites: is {cfg.num_sites} but group {key!r} has "
                f"{len(values)} values ({shown}); set partition.num_sites: {len(values)}"
            )
        small = [(v, int((natural_groups(splits["train"], key) == v).sum())) for v in values]
        small = [(v, n) for v, n in small if n < cfg.min_site_size]
        if small:
            raise PartitionError(
                f"partition.min_site_size={cfg.min_site_size}: group {key!r} value(s) "
                + ", ".join(f"{v!r} ({n} training samples)" for v, n in small)
                + " are smaller; lower partition.min_site_size"
            )
        return PartitionPlan(group_key=key, group_values=tuple(values))
    props = partition_proportions(
        splits["train"].partition_labels(),
        num_classes=num_classes,
        num_sites=cfg.num_sites,
        kind=cfg.kind,
        alpha=cfg.alpha,
        min_site_size=cfg.min_site_size,
        seed=seed,
        classes_per_site=cfg.classes_per_site,
        class_assignment=cfg.class_assignment,
        quantity=cfg.quantity,
        exponent=cfg.exponent,
        sizes=cfg.sizes,
    )
    return PartitionPlan(proportions=props)
