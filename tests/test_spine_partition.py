"""Dirichlet label-skew partitioner: seeded, disjoint, every sample placed, no empty site."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medflower.simulation.partition import PartitionError, assign, dirichlet_proportions, partition_proportions


def labels_of(n: int, k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, size=n)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(30, 400),
    k=st.integers(1, 6),
    sites=st.integers(1, 6),
    alpha=st.floats(0.05, 50),
    seed=st.integers(0, 2**31),
)
def test_disjoint_and_complete(n: int, k: int, sites: int, alpha: float, seed: int) -> None:
    labels = labels_of(n, k, seed)
    props = dirichlet_proportions(k, sites, alpha, np.random.default_rng(seed))
    parts = assign(labels, props, np.random.default_rng(seed))
    allidx = np.concatenate(parts)
    assert len(parts) == sites
    assert len(allidx) == n  # every sample placed ...
    assert len(np.unique(allidx)) == n  # ... exactly once


def test_same_seed_same_partition_different_seed_differs() -> None:
    labels = labels_of(500, 3)
    a = partition_proportions(labels, num_classes=3, num_sites=4, kind="dirichlet", alpha=0.5, seed=7)
    b = partition_proportions(labels, num_classes=3, num_sites=4, kind="dirichlet", alpha=0.5, seed=7)
    c = partition_proportions(labels, num_classes=3, num_sites=4, kind="dirichlet", alpha=0.5, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_min_site_size_is_enforced() -> None:
    labels = labels_of(300, 2)
    props = partition_proportions(
        labels, num_classes=2, num_sites=5, kind="dirichlet", alpha=0.1, min_site_size=20, seed=0
    )
    sizes = [len(p) for p in assign(labels, props, np.random.default_rng(0))]
    assert min(sizes) >= 20 and sum(sizes) == 300


def test_impossible_min_size_is_a_clear_error() -> None:
    with pytest.raises(PartitionError, match="min_site_size=100 x partition.num_sites=5 exceeds the 300"):
        partition_proportions(labels_of(300, 2), num_classes=2, num_sites=5, kind="dirichlet", min_site_size=100)


def test_small_alpha_skews_large_alpha_is_near_iid() -> None:
    labels = labels_of(4000, 2)

    def mean_skew(alpha: float) -> float:
        props = partition_proportions(labels, num_classes=2, num_sites=4, kind="dirichlet", alpha=alpha, seed=1)
        parts = assign(labels, props, np.random.default_rng(0))
        return float(np.mean([abs(labels[p].mean() - labels.mean()) for p in parts]))

    assert mean_skew(0.1) > 0.2
    assert mean_skew(1000.0) < 0.05


def test_iid_gives_equal_sizes_and_mix() -> None:
    labels = labels_of(900, 3)
    props = partition_proportions(labels, num_classes=3, num_sites=3, kind="iid")
    parts = assign(labels, props, np.random.default_rng(0))
    assert [len(p) for p in parts] == pytest.approx([300, 300, 300], abs=3)


def test_proportions_apply_alike_to_every_split() -> None:
    """A site's test split mirrors its training case mix (shared proportion matrix)."""
    rng = np.random.default_rng(0)
    train, test = labels_of(3000, 2, 1), labels_of(1000, 2, 2)
    props = dirichlet_proportions(2, 3, 0.3, rng)
    tr = assign(train, props, np.random.default_rng(0))
    te = assign(test, props, np.random.default_rng(1))
    for a, b in zip(tr, te, strict=True):
        if len(a) > 50 and len(b) > 20:
            assert abs(train[a].mean() - test[b].mean()) < 0.12
