"""``data:`` — which data set the experiment uses, how its images are prepared, how it is split.

The same section describes a simulated data set (an experiment) and a hospital's own files (the
``data:`` section of a site YAML, see :mod:`medflower.client.site`), so that one loading code path serves both.
Keys fall in two groups:

* *where the files are* (``kind``, ``path``, the ``*_column`` names, ``image_dir``/``label_dir``);
* *how every image is prepared* (``channels``, ``orientation``, ``spacing``, ``intensity``/``window``,
  ``size``/``fit``, ``patch_size``, ``slabs``, ``classes``/``num_classes``/``mask_values``). In a
  federation these must agree across sites, so a site YAML that leaves them out takes them from the
  experiment (:data:`PREPARATION_KEYS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medflower.schema import ConfigError, rng_field

# "none": a deployed coordinator that holds no test data (no global test; model.* must size the model)
DataKind = Literal["synthetic", "medmnist", "manifest", "decathlon", "folders", "none"]
FILE_KINDS = ("manifest", "decathlon", "folders")  # read by medflower.data.manifest
Intensity = Literal["minmax", "zscore", "window", "none"]

# keys that say how an image becomes a tensor; a site YAML inherits the ones it omits from the experiment
PREPARATION_KEYS = (
    "channels",
    "orientation",
    "spacing",
    "intensity",
    "window",
    "size",
    "fit",
    "patch_size",
    "patch_sampling",
    "patches_per_image",
    "slabs",
    "classes",
    "num_classes",
    "mask_values",
)


@dataclass(frozen=True)
class DataConfig:
    """Data set for a simulated federation (or the server's held-out test set), or a hospital's files.

    ``synthetic`` is medflower's embedded, deterministic synthetic set (no files needed).
    ``medmnist`` reads an official MedMNIST ``.npz`` (``path``), or downloads it by ``name``.
    ``manifest`` reads a CSV (``path``) with one row per image; ``decathlon`` a MONAI/Medical
    Segmentation Decathlon ``dataset.json``; ``folders`` a folder (``path``) holding either an
    ``image_dir``/``label_dir`` pair of folders with matching file names (segmentation) or one
    sub-folder per class (classification). Relative paths inside a manifest or ``dataset.json``
    resolve from that file's folder.
    """

    kind: DataKind = "synthetic"
    path: str | None = None
    name: str | None = None  # medmnist flag, e.g. "breastmnist" (download when path is unset)
    root: str | None = None  # download/cache folder for named data sets
    val_fraction: float = rng_field(0.1, min=0.0, max=0.5)
    test_fraction: float = rng_field(0.2, min=0.0, max=0.5)
    # synthetic set only
    synthetic_samples: int = rng_field(1200, min=50)
    synthetic_classes: int = rng_field(2, min=2, max=10)
    synthetic_size: int = rng_field(28, min=8, max=256)
    synthetic_channels: int = rng_field(1, min=1, max=3)

    # ---- manifest / decathlon / folders: where things are ----
    image_column: str = "image"  # image path: a file, or a folder holding one DICOM series
    label_column: str = "label"  # classification: class index or name; segmentation: mask path
    patient_column: str = "patient_id"  # optional column; one patient never spans two splits
    split_column: str = "split"  # optional column: train / val / test (empty = assigned by fractions)
    group_columns: tuple[str, ...] = ()  # extra columns kept per sample (e.g. hospital, scanner)
    image_dir: str = "images"  # folders kind, segmentation: sub-folder of images
    label_dir: str = "labels"  # folders kind, segmentation: sub-folder of masks (same file names)
    split_by: Literal["patient", "sample"] = "patient"

    # ---- preparation: how every image becomes a fixed-size tensor ----
    channels: int | None = rng_field(None, min=1, max=16)  # None = as stored (must agree)
    orientation: str | None = None  # volumes: axis codes to reorient to instead of the convention's PLS
    spacing: tuple[float, ...] | None = None  # resample to this voxel size (mm), e.g. [1.0, 1.0, 2.5]
    intensity: Intensity = "minmax"
    window: tuple[float, ...] | None = None  # intensity: window; e.g. CT HU [-1000, 400], PNG [0, 255]
    size: tuple[int, ...] | None = None  # every image is brought to this size ([rows, columns(, slices)])
    fit: Literal["resize", "pad_crop"] = "resize"  # how `size` is reached
    patch_size: tuple[int, ...] | None = None  # segmentation: train on patches, infer by sliding window
    # grid: non-overlapping patches covering each training image; balanced: MONAI's
    # RandCropByPosNegLabel, patches_per_image crops per image, half centred on foreground (seeded)
    patch_sampling: Literal["grid", "balanced"] = "grid"
    patches_per_image: int = rng_field(4, min=1, max=1000)
    slabs: int = rng_field(1, min=1, max=64)  # 3D: cut each volume into slabs along its last axis
    classes: tuple[str, ...] | None = None  # classification: class names in label order
    num_classes: int | None = rng_field(None, min=2, max=1000)  # segmentation: label values incl. background
    mask_values: tuple[int, ...] | None = None  # segmentation: stored mask value of class 0, 1, ...

    def __post_init__(self) -> None:
        if self.kind in FILE_KINDS and not self.path:
            raise ConfigError(f"data.path: required when data.kind is {self.kind!r}")
        if self.kind == "medmnist" and not (self.path or self.name):
            raise ConfigError("data.path: required when data.kind is 'medmnist' (or set data.name to download)")
        if self.intensity == "window" and self.window is None:
            raise ConfigError("data.window: required when data.intensity is 'window' (e.g. [-1000, 400] for CT)")
        if self.window is not None and (len(self.window) != 2 or not self.window[0] < self.window[1]):
            raise ConfigError(f"data.window: expected [low, high] with low < high, got {list(self.window)}")
        for key in ("size", "patch_size", "spacing"):
            value = getattr(self, key)
            if value is not None and (len(value) not in (2, 3) or min(value) <= 0):
                raise ConfigError(f"data.{key}: expected 2 or 3 positive numbers, got {list(value)}")
        if self.size and self.spacing and len(self.size) != len(self.spacing):
            raise ConfigError(f"data.spacing: has {len(self.spacing)} values but data.size has {len(self.size)}")
        if self.patch_size is not None:
            if self.size is not None and len(self.patch_size) != len(self.size):
                raise ConfigError(
                    f"data.patch_size: has {len(self.patch_size)} values but data.size has {len(self.size)}"
                )
            if self.size is not None and any(p > s for p, s in zip(self.patch_size, self.size, strict=True)):
                raise ConfigError(f"data.patch_size: {list(self.patch_size)} exceeds data.size {list(self.size)}")
        if self.slabs > 1 and self.size is not None and len(self.size) != 3:
            raise ConfigError("data.slabs: only 3D volumes can be cut into slabs (data.size has 2 values)")
        if self.slabs > 1 and self.size is not None and self.size[-1] % self.slabs:
            raise ConfigError(f"data.slabs: {self.slabs} does not divide the last axis of data.size {list(self.size)}")
        if (
            self.slabs > 1
            and self.size is not None
            and self.patch_size is not None
            and self.patch_size[-1] > self.size[-1] // self.slabs
        ):
            raise ConfigError(
                f"data.patch_size: its last axis {self.patch_size[-1]} exceeds a slab's depth "
                f"{self.size[-1] // self.slabs} (data.size {list(self.size)} / data.slabs {self.slabs})"
            )
        if self.orientation is not None and (
            len(self.orientation) not in (2, 3) or set(self.orientation.upper()) - set("RLAPSI")
        ):
            raise ConfigError(f"data.orientation: expected axis codes such as 'RAS' or 'LPS', got {self.orientation!r}")
        for key in ("classes", "mask_values"):
            value = getattr(self, key)
            if value is not None and (len(value) < 2 or len(set(value)) != len(value)):
                raise ConfigError(f"data.{key}: expected at least 2 distinct values, got {list(value)}")
        if self.mask_values and self.num_classes and len(self.mask_values) != self.num_classes:
            raise ConfigError(
                f"data.mask_values: lists {len(self.mask_values)} values but data.num_classes is {self.num_classes}"
            )
        if len(set(self.group_columns)) != len(self.group_columns):
            raise ConfigError(f"data.group_columns: duplicate names in {list(self.group_columns)}")
