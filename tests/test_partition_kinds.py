"""Partitioners beyond Dirichlet: pathological, quantity skew (alone and with label skew), natural groups."""

from __future__ import annotations

import numpy as np
import pytest

from medflower.config import ConfigError, ExperimentConfig
from medflower.config.partition import PartitionConfig
from medflower.data import ArraySplit
from medflower.simulation.partition import (
    PartitionError,
    assign,
    dirichlet_proportions,
    fit_site_sizes,
    partition_proportions,
    pathological_classes,
    plan_partition,
    quantity_shares,
)


def labels_of(n: int, k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, size=n)


def split_of(labels: np.ndarray, **groups: np.ndarray) -> ArraySplit:
    return ArraySplit(np.zeros((len(labels), 1, 2, 2), np.float32), labels.astype(np.int64), dict(groups))


@pytest.mark.parametrize("mode", ["first-deterministic", "random", "deterministic"])
def test_pathological_sites_hold_exactly_k_classes(mode: str) -> None:
    labels = labels_of(2000, 6)
    props = partition_proportions(
        labels,
        num_classes=6,
        num_sites=8,
        kind="pathological",
        classes_per_site=2,
        class_assignment=mode,
        seed=3,
        min_site_size=1,
    )
    parts = assign(labels, props, np.random.default_rng(0))
    for p in parts:
        assert len(np.unique(labels[p])) == 2
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx)  # disjoint


def test_pathological_modes_follow_flower() -> None:
    rng = np.random.default_rng(0)
    assert pathological_classes(5, 3, 2, "deterministic", rng) == [[0, 1], [1, 2], [2, 3]]
    first = pathological_classes(4, 6, 2, "first-deterministic", rng)
    assert [s % 4 in c for s, c in enumerate(first)] == [True] * 6  # site s holds class s % C
    assert set().union(*first) == {0, 1, 2, 3}  # every class used when sites >= classes
    with pytest.raises(PartitionError, match="classes_per_site=7 exceeds the data set's 5 classes"):
        pathological_classes(5, 3, 7, "random", rng)


def test_pathological_class_held_by_no_site_is_left_out_with_a_warning() -> None:
    labels = labels_of(600, 5)
    props = partition_proportions(
        labels,
        num_classes=5,
        num_sites=2,
        kind="pathological",
        classes_per_site=1,
        class_assignment="deterministic",
        min_site_size=1,
    )
    with pytest.warns(UserWarning, match=r"classes \[2, 3, 4\] are held by no site"):
        parts = assign(labels, props, np.random.default_rng(0))
    assert set(labels[np.concatenate(parts)].tolist()) == {0, 1}


def test_power_law_and_explicit_sizes() -> None:
    labels = labels_of(1200, 3)
    props = partition_proportions(
        labels, num_classes=3, num_sites=4, kind="iid", quantity="power-law", exponent=1.0, min_site_size=1
    )
    sizes = np.array([len(p) for p in assign(labels, props, np.random.default_rng(0))])
    expected = 1200 * quantity_shares(4, "power-law", exponent=1.0)
    assert sizes.sum() == 1200
    assert np.abs(sizes - expected).max() <= 3  # 576, 288, 192, 144
    assert list(sizes) == sorted(sizes, reverse=True)
    props = partition_proportions(
        labels, num_classes=3, num_sites=3, kind="iid", quantity="sizes", sizes=(1, 1, 4), min_site_size=1
    )
    sizes = [len(p) for p in assign(labels, props, np.random.default_rng(0))]
    assert sizes == pytest.approx([200, 200, 800], abs=3)


def test_label_and_quantity_skew_combine() -> None:
    """IPF gives each site its target size while keeping the Dirichlet draw's cross-site odds per class."""
    labels = labels_of(3000, 3, 1)
    counts = np.bincount(labels, minlength=3)
    d = dirichlet_proportions(3, 4, 0.5, np.random.default_rng(2))
    shares = quantity_shares(4, "sizes", sizes=(5, 3, 1, 1))
    fitted = fit_site_sizes(d, counts, shares)
    np.testing.assert_allclose(fitted.sum(axis=1), 1.0)  # every sample placed
    np.testing.assert_allclose((fitted * counts[:, None]).sum(axis=0), shares * counts.sum(), rtol=1e-6)

    # odds ratio between two classes and two sites is unchanged: diag(a) D diag(b)
    def cross(m: np.ndarray) -> float:
        return m[0, 0] * m[1, 1] / (m[0, 1] * m[1, 0])

    assert cross(fitted) == pytest.approx(cross(d), rel=1e-6)
    # and the whole thing through the public entry point, seeded
    a = partition_proportions(
        labels, num_classes=3, num_sites=4, kind="dirichlet", alpha=0.5, quantity="power-law", seed=5, min_site_size=50
    )
    b = partition_proportions(
        labels, num_classes=3, num_sites=4, kind="dirichlet", alpha=0.5, quantity="power-law", seed=5, min_site_size=50
    )
    np.testing.assert_array_equal(a, b)
    sizes = [len(p) for p in assign(labels, a, np.random.default_rng(0))]
    assert sizes == pytest.approx(list(3000 * quantity_shares(4, "power-law")), abs=4)


def test_plan_applies_the_same_case_mix_and_size_to_every_split() -> None:
    train, test = split_of(labels_of(4000, 2, 1)), split_of(labels_of(1000, 2, 2))
    cfg = PartitionConfig(kind="dirichlet", num_sites=3, alpha=0.5, quantity="sizes", sizes=(3.0, 2.0, 1.0))
    plan = plan_partition(cfg, {"train": train, "test": test}, num_classes=2, seed=0)
    tr, te = plan.apply(train, np.random.default_rng(0)), plan.apply(test, np.random.default_rng(1))
    for a, b in zip(tr, te, strict=True):
        assert len(a) / len(train) == pytest.approx(len(b) / len(test), abs=0.01)
        assert train.targets[a].mean() == pytest.approx(test.targets[b].mean(), abs=0.06)


def test_natural_partition_follows_groups_in_every_split() -> None:
    hosp = np.array(["b", "a", "c", "a", "b", "c"] * 20)
    train = split_of(labels_of(120, 2), hospital=hosp)
    test = split_of(labels_of(30, 2), hospital=hosp[:30])
    cfg = PartitionConfig(kind="natural", num_sites=3, group="hospital", min_site_size=5)
    plan = plan_partition(cfg, {"train": train, "test": test}, num_classes=2, seed=0)
    assert plan.group_values == ("a", "b", "c")
    for split in (train, test):
        parts = plan.apply(split, np.random.default_rng(0))
        for value, idx in zip(plan.group_values, parts, strict=True):
            assert set(split.groups["hospital"][idx].tolist()) == {value}
        assert sum(len(p) for p in parts) == len(split)


def test_natural_partition_errors_name_the_fix() -> None:
    train = split_of(labels_of(60, 2), scanner=np.array(["ge", "siemens"] * 30))
    with pytest.raises(PartitionError, match=r"num_sites: is 3 but group 'scanner' has 2 values \(ge, siemens\)"):
        plan_partition(
            PartitionConfig(kind="natural", num_sites=3, group="scanner"), {"train": train}, num_classes=2, seed=0
        )
    with pytest.raises(PartitionError, match=r"no group 'hospital'; its groups are: scanner"):
        plan_partition(
            PartitionConfig(kind="natural", num_sites=2, group="hospital"), {"train": train}, num_classes=2, seed=0
        )
    with pytest.raises(PartitionError, match=r"min_site_size=40: .*'ge' \(30 training samples\)"):
        plan_partition(
            PartitionConfig(kind="natural", num_sites=2, group="scanner", min_site_size=40),
            {"train": train},
            num_classes=2,
            seed=0,
        )


@pytest.mark.parametrize(
    "partition, message",
    [
        ({"kind": "natural"}, r"partition\.group: required when partition\.kind is 'natural'"),
        ({"kind": "iid", "group": "hospital"}, r"partition\.group: only used when partition\.kind is 'natural'"),
        ({"kind": "natural", "group": "h", "quantity": "power-law"}, r"partition\.quantity: must be 'none'"),
        ({"quantity": "sizes"}, r"partition\.sizes: required when partition\.quantity is 'sizes'"),
        ({"quantity": "sizes", "sizes": [1, 2]}, r"partition\.sizes: has 2 values but partition\.num_sites is 3"),
        ({"quantity": "sizes", "sizes": [1, 0, 2]}, r"partition\.sizes: every size must be > 0"),
        ({"sizes": [1, 1, 1]}, r"partition\.sizes: only used when partition\.quantity is 'sizes'"),
        (
            {"kind": "shards"},
            r"partition\.kind: invalid value 'shards'; valid choices are 'iid', 'dirichlet', "
            r"'pathological', 'natural'",
        ),
        ({"class_assignment": "first"}, r"partition\.class_assignment: invalid value 'first'"),
    ],
)
def test_partition_config_errors(partition: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig.from_dict({"partition": partition})


def test_unreachable_min_size_names_the_setting() -> None:
    labels = labels_of(400, 4)  # power law with exponent 3: the smallest of 4 sites gets 1.3% of 400
    with pytest.raises(
        PartitionError,
        match=r"no IID partition gave every one of 4 sites >= 20 samples "
        r"\(smallest: 6\); .*soften partition\.quantity",
    ):
        partition_proportions(
            labels, num_classes=4, num_sites=4, kind="iid", quantity="power-law", exponent=3.0, min_site_size=20
        )


def test_natural_partition_end_to_end_from_a_manifest_hospital_column(tmp_path) -> None:
    """SYNTHETIC PNGs listed in a CSV manifest with a hospital column become one site per hospital."""
    from PIL import Image

    from medflower.simulation.sites import build_sites

    rng = np.random.default_rng(0)
    rows = ["image,label,hospital,split"]
    for i in range(36):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / f"s{i}.png")
        split = ["test", "test", "test", "val", "val", "val", "train", "train", "train"][i % 9]
        rows.append(f"s{i}.png,{i % 2},{['north', 'south', 'east'][i % 3]},{split}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    exp = ExperimentConfig.from_dict(
        {
            "data": {"kind": "manifest", "path": "m.csv", "group_columns": ["hospital"], "size": [16, 16]},
            "partition": {"kind": "natural", "group": "hospital", "num_sites": 3, "min_site_size": 1},
            "shift": {"sites": {"site-1": "strong"}},
        },
        base_dir=tmp_path,
    )
    sites = build_sites(exp)
    assert [s.info["group"]["hospital"] for s in sites] == ["east", "north", "south"]
    for s in sites:
        for split in ("train", "val", "test"):
            got = s.split(split).groups.get("hospital", np.empty(0)).tolist()  # an empty split has no groups
            assert len(got) == len(s.split(split)) and set(got) <= {s.info["group"]["hospital"]}
    assert sum(len(s.split(n)) for s in sites for n in ("train", "val", "test")) == 36
    assert all((len(s.train), len(s.val), len(s.test)) == (4, 4, 4) for s in sites)
    assert sites[1].info["preset"] == "strong" and "preset" not in sites[0].info
