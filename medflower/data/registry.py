"""``load_dataset(experiment)``: the one entry point from a ``data:`` section to arrays."""

from __future__ import annotations

from functools import lru_cache

from medflower.config import ExperimentConfig
from medflower.data.base import DataError, DatasetSplits
from medflower.data.manifest import load_manifest_dataset
from medflower.data.medmnist import download_medmnist, load_medmnist
from medflower.data.synthetic import synthetic_classification


def load_dataset(exp: ExperimentConfig) -> DatasetSplits:
    """Load (and cache per process) the experiment's data set with its train/val/test splits."""
    return _load(exp.to_json())


@lru_cache(maxsize=4)
def _load(exp_json: str) -> DatasetSplits:
    exp = ExperimentConfig.from_json(exp_json)
    d = exp.data
    if d.kind == "none":
        raise DataError(
            "data.kind is 'none' (a coordinator without data): there is no data set to read; give "
            "model.in_channels, model.out_channels and model.img_size to size the model"
        )
    if d.kind == "synthetic":
        return synthetic_classification(
            samples=d.synthetic_samples,
            num_classes=d.synthetic_classes,
            size=d.synthetic_size,
            channels=d.synthetic_channels,
            seed=exp.seed,
        )
    if d.kind == "medmnist":
        path = exp.resolve_path(d.path)
        if path is None:
            path = download_medmnist(d.name or "", d.root or "~/.medflower/data")
        return load_medmnist(path, size=d.size, fit=d.fit)
    return load_manifest_dataset(exp)  # manifest / decathlon / folders
