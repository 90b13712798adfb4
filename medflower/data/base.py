"""Containers for in-memory splits, and the error every loader raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from medflower.schema import ConfigError


class DataError(ValueError):
    """A data file is missing, unreadable or malformed; the message names the file (and key)."""


class ModelInputError(ConfigError):
    """A site's prepared images are not the shape or channel count the experiment's model takes.

    A configuration error (``data.size``/``data.channels`` against the model), not an unreadable
    file: a hospital node reports it to the coordinator as ``config-error``. The message names the
    site, both shapes and an example file.
    """


@dataclass
class ArraySplit:
    """One split: images ``(N, C, *spatial)`` float32 and targets (labels ``(N,)`` or masks)."""

    images: np.ndarray
    targets: np.ndarray
    # optional per-sample group ids (patient, hospital, scanner) for natural partitions and splits
    groups: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.images) != len(self.targets):
            raise DataError(f"images ({len(self.images)}) and targets ({len(self.targets)}) differ in length")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray) -> ArraySplit:
        idx = np.asarray(idx, dtype=np.int64)
        return ArraySplit(self.images[idx], self.targets[idx], {k: v[idx] for k, v in self.groups.items()})

    def partition_labels(self) -> np.ndarray:
        """Labels a label-skew partitioner splits by (segmentation: all zeros, one 'class')."""
        if self.targets.ndim == 1:
            return self.targets
        return np.zeros(len(self.targets), dtype=np.int64)

    def to_torch(self) -> TensorDataset:
        return TensorDataset(
            torch.from_numpy(np.ascontiguousarray(self.images)), torch.from_numpy(np.ascontiguousarray(self.targets))
        )


@dataclass
class SiteData:
    """One site's splits, simulated or a real hospital's. ``name`` is public; nothing else leaves it.

    ``info`` records what made the site (its natural group value, its scanner profile's parameters,
    the class count): local facts for reports, never sent to the coordinator.
    """

    name: str
    train: ArraySplit
    val: ArraySplit
    test: ArraySplit
    info: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> ArraySplit:
        return _split(self.train, self.val, self.test, name)


@dataclass
class DatasetSplits:
    name: str
    task: str  # "classification" | "segmentation"
    train: ArraySplit
    val: ArraySplit
    test: ArraySplit
    num_classes: int  # classification: classes; segmentation: label values incl. background
    in_channels: int
    img_size: tuple[int, ...]
    synthetic: bool = False

    def split(self, name: str) -> ArraySplit:
        return _split(self.train, self.val, self.test, name)


def _split(train: ArraySplit, val: ArraySplit, test: ArraySplit, name: str) -> ArraySplit:
    splits = {"train": train, "val": val, "test": test}
    if name not in splits:
        raise ValueError(f"split must be 'train', 'val' or 'test', got {name!r}")
    return splits[name]


def split_indices(
    n: int, fractions: tuple[float, float], seed: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split ``range(n)`` into train/val/test with the given (val, test) fractions.

    With ``groups`` (e.g. patient ids) whole groups go to one side, so no patient is on both.
    """
    rng = np.random.default_rng(seed)
    val_f, test_f = fractions
    if groups is None:
        groups = np.arange(n)
    uniq = np.unique(groups)
    rng.shuffle(uniq)
    n_test = round(len(uniq) * test_f)
    n_val = round(len(uniq) * val_f)
    if len(uniq) >= 3:
        n_test = max(n_test, 1 if test_f > 0 else 0)
        n_val = max(n_val, 1 if val_f > 0 else 0)
    test_g, val_g = set(uniq[:n_test].tolist()), set(uniq[n_test : n_test + n_val].tolist())
    where = np.array([0 if g not in test_g and g not in val_g else (1 if g in val_g else 2) for g in groups])
    return np.flatnonzero(where == 0), np.flatnonzero(where == 1), np.flatnonzero(where == 2)
