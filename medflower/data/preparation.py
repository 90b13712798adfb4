"""What a data set's preparation does to pixels, as a small public fingerprint.

The coordinator's held-out test and the hospitals' training must see images prepared the same
way: a model trained on PNG exports scaled to [0, 1] and scored on a MedMNIST ``.npz`` scaled to
[-1, 1] gets wrong metrics and nothing fails. Both sides load through :func:`medflower.data.load_dataset`
/ :func:`medflower.data.manifest.load_file_dataset` (one reader and one preparation per ``data.kind``),
and each describes what it did with :func:`fingerprint`: the reader, the intensity scaling and
geometry, the channels and the spatial size. No paths, no counts, nothing about patients: sites send
it with their replies (``keys.PREPARATION``) and the coordinator compares it with its own
(:func:`pixel_differences`); kinds that read the same files the same way (``folders``, ``manifest``,
``decathlon``) do not differ.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from medflower.config.data import FILE_KINDS, DataConfig
from medflower.data.base import DatasetSplits

MEDMNIST_SCALING = "medmnist: uint8/127.5 - 1, to [-1, 1]"  # medflower.data.medmnist
SYNTHETIC_SCALING = "synthetic blobs, float"  # medflower.data.synthetic


@dataclass(frozen=True)
class Preparation:
    reader: str  # "files" (folders/manifest/decathlon: medflower.data.readers), "medmnist", "synthetic"
    kind: str  # data.kind as configured (reported, not compared)
    intensity: str  # how stored values become pixel values
    geometry: str  # orientation, spacing, fit (what moves or resamples pixels)
    channels: int
    size: tuple[int, ...]  # rows x columns (x slices)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Preparation:
        d = json.loads(text)
        return cls(**{**d, "size": tuple(int(v) for v in d["size"])})

    def describe(self) -> str:
        size = "x".join(str(v) for v in self.size)
        return (
            f"{self.kind} ({self.reader}), intensity {self.intensity}, {self.geometry}, "
            f"{self.channels} channel(s), {size}"
        )


def fingerprint(cfg: DataConfig, ds: DatasetSplits) -> Preparation:
    """How ``cfg`` prepared ``ds`` (its prepared channels and spatial size)."""
    if cfg.kind in FILE_KINDS:
        reader = "files"
        intensity = cfg.intensity + (f" {list(cfg.window)}" if cfg.intensity == "window" and cfg.window else "")
        spacing = list(cfg.spacing) if cfg.spacing else "as stored"
        geometry = f"orientation {cfg.orientation or 'default'}, spacing {spacing}, fit {cfg.fit}"
    elif cfg.kind == "medmnist":
        reader, intensity, geometry = "medmnist", MEDMNIST_SCALING, "as stored"
    else:
        reader, intensity, geometry = str(cfg.kind), SYNTHETIC_SCALING, "as generated"
    return Preparation(
        reader, str(cfg.kind), intensity, geometry, int(ds.in_channels), tuple(int(v) for v in ds.img_size)
    )


def pixel_differences(ours: Preparation, theirs: Preparation) -> list[str]:
    """The fields that make the two sides' prepared pixels differ (empty: the same preparation)."""
    fields = ("reader", "intensity", "geometry", "channels", "size")
    return [f for f in fields if getattr(ours, f) != getattr(theirs, f)]
