"""Hospital-style data sets: a CSV manifest, a Decathlon ``dataset.json`` or an images/labels folder pair.

One code path serves the simulator (an experiment's ``data.kind`` is ``manifest``, ``decathlon`` or
``folders`` and :mod:`medflower.simulation.sites` partitions the result into sites like any public set) and a
deployed hospital (:func:`medflower.client.site.load_site_data` reads the hospital's own files with the same
:func:`load_file_dataset`).

Steps: :func:`read_rows` lists the samples (image path, label or mask path, patient, split, extra
group columns), :func:`medflower.data.readers.prepare` turns each into a fixed-size array with MONAI,
:func:`assign_splits` sends whole patients to train/val/test, then 3D volumes may be cut into slabs and
segmentation training images into grid patches (``data.patch_size``; val/test keep whole images,
which :func:`medflower.tasks.evaluate` covers with sliding-window inference).

MONAI has the Decathlon list reader (``load_decathlon_datalist``, used here) but no CSV manifest or
folder-pair reader with patient-safe splits, hence the rest of this module.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medflower._preload import require_monai
from medflower.config import ExperimentConfig
from medflower.config.data import DataConfig
from medflower.data.base import ArraySplit, DataError, DatasetSplits, ModelInputError, split_indices
from medflower.data.readers import (
    SUPPORTED,
    Prepared,
    balanced_patches,
    cut_slabs,
    describe,
    grid_patches,
    prepare,
    segmentation_classes,
)

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
    "": "",
}


@dataclass
class Row:
    """One sample as listed: where it is and what is known about it (nothing is read yet)."""

    where: str  # "manifest.csv row 7", "dataset.json training[3]", "image/0.png" (for messages)
    image: Path
    label: Path | int  # mask path (segmentation) or class index (classification)
    patient: str | None = None  # never printed: may be identifying
    split: str = ""  # "", "train", "val", "test"
    groups: dict[str, str] = field(default_factory=dict)

    @property
    def class_index(self) -> int:
        """The class of a classification row (a segmentation row's label is its mask's path)."""
        if isinstance(self.label, Path):
            raise DataError(f"{self.where}: has a mask where a class label was expected")
        return self.label


@dataclass
class RowList:
    rows: list[Row]
    source: Path
    num_classes: int | None = None  # from dataset.json "labels" or the class folders
    has_patients: bool = False


# ---------------------------------------------------------------------------------------------- rows
def _label_of(value: str, cfg: DataConfig, where: str) -> int:
    text = value.strip()
    if cfg.classes is not None and text in cfg.classes:
        return cfg.classes.index(text)
    try:
        label: int | None = int(text)
    except ValueError:
        label = None
    if label is None or label < 0:
        hint = (
            f"one of data.classes {list(cfg.classes)}"
            if cfg.classes
            else "a class index 0, 1, ... (or set data.classes to use class names)"
        )
        raise DataError(f"{where}: label {text!r} in column {cfg.label_column!r} is not {hint}")
    if cfg.classes is not None and label >= len(cfg.classes):
        raise DataError(f"{where}: label {label} is out of range for data.classes {list(cfg.classes)}")
    return label


def _split_of(value: str, where: str, column: str) -> str:
    key = value.strip().lower()
    if key not in SPLIT_ALIASES:
        raise DataError(f"{where}: split {value!r} in column {column!r} is not one of train, val, test (or empty)")
    return SPLIT_ALIASES[key]


def read_manifest(path: Path, cfg: DataConfig, task: str) -> RowList:
    """Rows of a CSV manifest; relative paths in it resolve from the CSV's folder."""
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            records = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read as CSV: {err}") from None
    needed = [cfg.image_column, cfg.label_column, *cfg.group_columns]
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))}; its columns are "
            f"{', '.join(map(repr, columns))} (set data.image_column / data.label_column)"
        )
    if not records:
        raise DataError(f"{path}: the manifest lists no images")
    has_patients = cfg.patient_column in columns
    rows = []
    for i, rec in enumerate(records, start=2):  # row 1 is the header
        where = f"{path.name} row {i}"
        image = (rec.get(cfg.image_column) or "").strip()
        if not image:
            raise DataError(f"{where}: empty {cfg.image_column!r}")
        raw_label = (rec.get(cfg.label_column) or "").strip()
        if not raw_label:
            raise DataError(f"{where}: empty {cfg.label_column!r}")
        label: Path | int = path.parent / raw_label if task == "segmentation" else _label_of(raw_label, cfg, where)
        patient = ((rec.get(cfg.patient_column) or "").strip() or None) if has_patients else None
        split = ""
        if cfg.split_column in columns:
            split = _split_of(rec.get(cfg.split_column) or "", where, cfg.split_column)
        rows.append(
            Row(
                where,
                path.parent / image,
                label,
                patient,
                split,
                {c: (rec.get(c) or "").strip() for c in cfg.group_columns},
            )
        )
    return RowList(rows, path, has_patients=has_patients)


def read_decathlon(path: Path, cfg: DataConfig, task: str) -> RowList:
    """Rows of a Decathlon-style ``dataset.json`` (``training`` and, if present, ``validation``).

    The list is read with MONAI's ``load_decathlon_datalist``; ``test`` entries carry no labels and
    are skipped. ``labels`` (e.g. ``{"0": "background", "1": "tumour"}``) gives the class count.
    """
    require_monai()
    from monai.data import load_decathlon_datalist  # MONAI: lazy, see readers.py (node check)

    if not path.is_file():
        raise DataError(f"{path}: dataset.json not found")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read as JSON: {err}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("training"), list):
        raise DataError(f"{path}: not a Decathlon dataset.json: it needs a 'training' list")
    rows, has_patients = [], False
    for key, split in (("training", ""), ("validation", "val")):
        if key not in meta:
            continue
        try:
            items = load_decathlon_datalist(
                path, is_segmentation=task == "segmentation", data_list_key=key, base_dir=path.parent
            )
        except (KeyError, ValueError, TypeError) as err:
            raise DataError(f"{path}: {key!r} list is malformed: {err}") from None
        for i, item in enumerate(items):
            where = f"{path.name} {key}[{i}]"
            if "image" not in item or "label" not in item:
                raise DataError(f"{where}: each entry needs 'image' and 'label'")
            if isinstance(item["image"], list):
                raise DataError(f"{where}: multi-file images are not supported; give one file (4D NIfTI) per image")
            label = Path(item["label"]) if task == "segmentation" else _label_of(str(item["label"]), cfg, where)
            patient = item.get(cfg.patient_column)
            has_patients |= patient is not None
            missing = [c for c in cfg.group_columns if c not in item]
            if missing:
                raise DataError(f"{where}: missing key(s) {', '.join(missing)} (data.group_columns)")
            rows.append(
                Row(
                    where,
                    Path(item["image"]),
                    label,
                    str(patient) if patient is not None else None,
                    split or _split_of(str(item.get(cfg.split_column, "")), where, cfg.split_column),
                    {c: str(item[c]) for c in cfg.group_columns},
                )
            )
    if not rows:
        raise DataError(f"{path}: the 'training' list is empty")
    labels = meta.get("labels")
    num_classes = len(labels) if isinstance(labels, (dict, list)) and len(labels) >= 2 else None
    return RowList(rows, path, num_classes=num_classes, has_patients=has_patients)


def _is_image(p: Path) -> bool:
    return p.is_file() and p.name.lower().endswith(SUPPORTED) and not p.name.startswith(".")


def read_folders(path: Path, cfg: DataConfig, task: str) -> RowList:
    """Rows of a folder: ``image_dir``/``label_dir`` pairs matched by file name (segmentation), or one
    sub-folder per class (classification; ``data.classes`` fixes their order, else sorted names)."""
    if not path.is_dir():
        raise DataError(f"{path}: folder not found")
    rows: list[Row] = []
    if task == "segmentation":
        img_dir, lab_dir = path / cfg.image_dir, path / cfg.label_dir
        for d, key in ((img_dir, "image_dir"), (lab_dir, "label_dir")):
            if not d.is_dir():
                raise DataError(
                    f"{d}: folder not found (data.{key}); {path} holds "
                    + ", ".join(sorted(p.name for p in path.iterdir() if p.is_dir()))
                )
        # a folder inside image_dir is one DICOM series
        images = sorted((p for p in img_dir.iterdir() if _is_image(p) or p.is_dir()), key=_natural)
        masks = {p.name: p for p in lab_dir.iterdir() if _is_image(p) or p.is_dir()}
        unmatched = [p.name for p in images if p.name not in masks]
        if unmatched:
            raise DataError(
                f"{lab_dir}: no mask for image(s) {', '.join(unmatched[:5])} (masks must have the image's file name)"
            )
        for p in images:
            rows.append(Row(f"{cfg.image_dir}/{p.name}", p, masks[p.name]))
        if not rows:
            raise DataError(f"{img_dir}: no images ({', '.join(SUPPORTED)})")
        return RowList(rows, path)
    names = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = list(cfg.classes) if cfg.classes is not None else names
    extra = sorted(set(names) - set(classes))
    if extra:
        raise DataError(f"{path}: sub-folder(s) {', '.join(extra)} are not in data.classes {classes}")
    for k, cls in enumerate(classes):
        d = path / cls
        if d.is_dir():
            rows += [Row(f"{cls}/{p.name}", p, k) for p in sorted(d.iterdir(), key=_natural) if _is_image(p)]
    if not rows:
        raise DataError(f"{path}: no images in class sub-folders ({', '.join(classes) or 'none found'})")
    return RowList(rows, path, num_classes=len(classes))


def _natural(p: Path) -> tuple[int, int, str]:
    """Sort 2.png before 10.png."""
    stem = p.name.split(".")[0]
    return (0, int(stem), p.name) if stem.isdigit() else (1, 0, p.name)


def read_rows(cfg: DataConfig, path: Path, task: str) -> RowList:
    if task not in ("classification", "segmentation"):
        raise DataError(f"task must be 'classification' or 'segmentation', got {task!r}")
    if cfg.kind == "manifest":
        return read_manifest(path, cfg, task)
    if cfg.kind == "decathlon":
        return read_decathlon(path, cfg, task)
    if cfg.kind == "folders":
        return read_folders(path, cfg, task)
    raise DataError(f"data.kind {cfg.kind!r} is not a file data set (manifest, decathlon, folders)")


# --------------------------------------------------------------------------------------------- splits
def patient_crossings(rows: list[Row], splits: list[str]) -> list[list[str]]:
    """For each patient found in more than one split, the rows where it appears (no IDs)."""
    by_patient: dict[str, set[str]] = defaultdict(set)
    where: dict[str, list[str]] = defaultdict(list)
    for row, split in zip(rows, splits, strict=True):
        if row.patient is not None and split:
            by_patient[row.patient].add(split)
            where[row.patient].append(f"{row.where} ({split})")
    return [where[p] for p, s in by_patient.items() if len(s) > 1]


def assign_splits(rows: list[Row], units: list[int], cfg: DataConfig, seed: int) -> list[str]:
    """Split name per sample. ``units[i]`` is the sample's row index (one entry per slab).

    Explicit ``split`` values are kept; the rest are split by ``val_fraction``/``test_fraction`` so that
    one patient (or, without a patient column, one image) never spans two splits. ``split_by: sample``
    splits each patient's slabs by the fractions instead (tiny data sets only: every patient is then
    on both sides, so test scores are not patient-independent).
    """
    explicit = [rows[u].split for u in units]
    crossing = patient_crossings(rows, [r.split for r in rows])
    if crossing:
        raise DataError(
            "a patient appears in more than one split of the manifest: "
            + "; ".join(", ".join(c) for c in crossing[:3])
            + " (rows, not IDs, are shown)"
        )
    free = [i for i, s in enumerate(explicit) if not s]
    out = list(explicit)
    if not free:
        return out
    patient_key = [
        f"patient-{rows[units[i]].patient}" if rows[units[i]].patient is not None else f"row-{units[i]}" for i in free
    ]
    fractions = (cfg.val_fraction, cfg.test_fraction)
    if cfg.split_by == "sample":
        # each patient's samples (slabs) are split separately, so every patient is in every split
        for k, key in enumerate(dict.fromkeys(patient_key)):
            members = [j for j, pk in enumerate(patient_key) if pk == key]
            tr, va, te = split_indices(len(members), fractions, seed * 7919 + k)
            for name, idx in (("train", tr), ("val", va), ("test", te)):
                for j in idx:
                    out[free[members[j]]] = name
        return out
    # a patient with an explicit split elsewhere keeps it for its unassigned rows
    fixed = {
        f"patient-{rows[units[i]].patient}": explicit[i]
        for i in range(len(units))
        if explicit[i] and rows[units[i]].patient is not None
    }
    codes = {k: j for j, k in enumerate(dict.fromkeys(patient_key))}
    groups = np.array([codes[k] for k in patient_key])
    tr, va, te = split_indices(len(free), fractions, seed, groups=groups)
    for name, idx in (("train", tr), ("val", va), ("test", te)):
        for j in idx:
            out[free[j]] = fixed.get(patient_key[j], name)
    return out


# -------------------------------------------------------------------------------------------- loading
@dataclass
class Sample:
    row: int  # index into RowList.rows
    slab: int
    image: np.ndarray
    target: np.ndarray | int


def load_samples(rows: RowList, cfg: DataConfig, task: str) -> tuple[list[Sample], list[Prepared]]:
    """Read and prepare every row (raising :class:`DataError` naming the first bad file)."""
    samples, prepared = [], []
    for r, row in enumerate(rows.rows):
        prep = prepare(
            row.image,
            row.label if isinstance(row.label, Path) else None,
            cfg,
            num_classes=segmentation_classes(cfg, rows.num_classes),
        )
        prepared.append(prep)
        imgs = cut_slabs(prep.image, cfg.slabs, row.image)
        targets = cut_slabs(prep.mask, cfg.slabs, row.image) if prep.mask is not None else None
        for s, img in enumerate(imgs):
            target = targets[s] if targets is not None else row.class_index
            samples.append(Sample(r, s, img, target))
    shapes = Counter(s.image.shape for s in samples)
    if len(shapes) > 1:
        common = shapes.most_common(1)[0][0]
        odd = next(s for s in samples if s.image.shape != common)
        raise DataError(
            f"{rows.rows[odd.row].image}: prepared shape {describe(odd.image.shape, channels=True)} differs from "
            f"the others' {describe(common, channels=True)}; set data.size (and data.channels) so that every "
            "image has the same shape"
        )
    return samples, prepared


def _stack(samples: list[Sample], idx: list[int], rows: RowList, task: str, like: Sample) -> ArraySplit:
    """One split's arrays, with per-sample groups (also on an empty split, so partitioners find the keys)."""
    if idx:
        images = np.stack([samples[i].image for i in idx]).astype(np.float32)
        if task == "segmentation":
            targets = np.stack([samples[i].target for i in idx]).astype(np.int64)
        else:
            targets = np.array([samples[i].target for i in idx], dtype=np.int64)
    else:
        images = np.zeros((0, *like.image.shape), np.float32)
        targets = np.zeros((0, 1, *like.image.shape[1:]), np.int64) if task == "segmentation" else np.zeros(0, np.int64)
    groups = {"row": np.array([samples[i].row for i in idx], dtype=np.int64)}
    for col in rows.rows[0].groups:
        groups[col] = np.array([rows.rows[samples[i].row].groups[col] for i in idx], dtype=str)
    if rows.has_patients:
        # pseudonymous integer codes: the IDs themselves stay in the manifest
        codes = {p: k for k, p in enumerate(dict.fromkeys(r.patient for r in rows.rows))}
        groups["patient"] = np.array([codes[rows.rows[samples[i].row].patient] for i in idx], dtype=np.int64)
    return ArraySplit(images, targets, groups)


def _patchify(split: ArraySplit, cfg: DataConfig, seed: int) -> ArraySplit:
    patch_size = tuple(cfg.patch_size or ())
    if len(split) == 0:
        return ArraySplit(
            np.zeros((0, split.images.shape[1], *patch_size), np.float32),
            np.zeros((0, 1, *patch_size), np.int64),
            dict(split.groups),
        )
    if cfg.patch_sampling == "balanced":
        images, masks = balanced_patches(
            split.images, split.targets, patch_size, per_image=cfg.patches_per_image, seed=seed
        )
    else:
        images, masks = grid_patches(split.images, split.targets, patch_size)
    per = len(images) // len(split)
    return ArraySplit(images, masks, {k: np.repeat(v, per) for k, v in split.groups.items()})


def check_model_input(
    samples: list[Sample],
    prepared: list[Prepared],
    rows: RowList,
    cfg: DataConfig,
    task: str,
    *,
    channels: int | None,
    size: tuple[int, ...] | None,
    who: str,
    expected_from: str = "the experiment's model",
) -> None:
    """Raise :class:`ModelInputError` if the prepared samples do not have the model's input ``channels`` and
    ``size``, naming ``who`` (the site), both shapes and the file to blame (or one example file).

    The samples share one shape already (:func:`load_samples`). A segmentation set trained on patches
    gives the model ``data.patch_size``-sized inputs; the whole images only need the channel count.
    """
    image = samples[0].image
    got_size = tuple(cfg.patch_size) if (task == "segmentation" and cfg.patch_size) else tuple(image.shape[1:])
    got = (int(image.shape[0]), *got_size)
    want = (
        channels if channels is not None else got[0],
        *(tuple(size) if size is not None else got_size),
    )
    if got == want:
        return
    row = rows.rows[samples[0].row]
    prep = prepared[samples[0].row]
    unset = [k for k in ("size", "channels") if getattr(cfg, k) is None]
    kept = f" (data.{' and data.'.join(unset)} not set: kept as read)" if unset else ""
    patches = got_size != tuple(image.shape[1:])
    fix = []
    if want[1:] != got[1:]:
        fix.append(f"data.{'patch_size' if patches else 'size'}: {list(want[1:])}")
    if want[0] != got[0]:
        fix.append(f"data.channels: {want[0]}")
    raise ModelInputError(
        f"{who}: its prepared {'training patches' if patches else 'images'} are {describe(got, channels=True)} but "
        f"{expected_from} expects {describe(want, channels=True)}; e.g. {row.where}: {row.image} reads as "
        f"{describe(prep.raw_shape)}, {prep.raw_channels} channel(s){kept}; prepare them with "
        f"{', '.join(fix)} (in the experiment, which every site inherits, or in the site YAML)"
    )


def load_file_dataset(
    cfg: DataConfig,
    *,
    path: Path,
    task: str,
    seed: int,
    name: str | None = None,
    expect_channels: int | None = None,
    expect_size: tuple[int, ...] | None = None,
    expected_from: str = "the experiment's model",
) -> DatasetSplits:
    """Read the files ``cfg`` describes into train/val/test arrays (patient-safe splits).

    With ``expect_channels``/``expect_size`` (a deployed site: the experiment's model input), prepared
    images of another shape are refused before anything else (:func:`check_model_input`).
    """
    rows = read_rows(cfg, path, task)
    samples, prepared = load_samples(rows, cfg, task)
    if expect_channels is not None or expect_size is not None:
        check_model_input(
            samples,
            prepared,
            rows,
            cfg,
            task,
            channels=expect_channels,
            size=expect_size,
            who=f"site {name!r}" if name else str(path),
            expected_from=expected_from,
        )
    splits = assign_splits(rows.rows, [s.row for s in samples], cfg, seed)
    by_split = {k: [i for i, s in enumerate(splits) if s == k] for k in SPLITS}
    if not by_split["train"]:
        raise DataError(
            f"{path}: no training samples after splitting {len(samples)} sample(s); lower "
            "data.val_fraction / data.test_fraction or mark rows 'train'"
        )
    if cfg.split_by == "sample":
        log.warning(
            "%s: data.split_by=sample: each patient is on both sides of the split "
            "(test scores are not patient-independent)",
            path,
        )
    parts = {k: _stack(samples, v, rows, task, samples[0]) for k, v in by_split.items()}
    if task == "segmentation":
        num_classes = segmentation_classes(cfg, rows.num_classes)  # masks were checked against it
        if cfg.patch_size is not None:
            parts["train"] = _patchify(parts["train"], cfg, seed)
    else:
        if cfg.patch_size is not None:
            raise DataError("data.patch_size: applies to segmentation only (classification resizes with data.size)")
        top = max(int(s.target) for s in samples)
        num_classes = len(cfg.classes) if cfg.classes else (rows.num_classes or max(2, top + 1))
    img_size = tuple(cfg.patch_size) if (task == "segmentation" and cfg.patch_size) else samples[0].image.shape[1:]
    return DatasetSplits(
        name=name or path.stem,
        task=task,
        num_classes=int(num_classes),
        in_channels=int(samples[0].image.shape[0]),
        img_size=tuple(int(v) for v in img_size),
        train=parts["train"],
        val=parts["val"],
        test=parts["test"],
    )


def load_manifest_dataset(exp: ExperimentConfig) -> DatasetSplits:
    """The registry's entry for ``data.kind`` in (manifest, decathlon, folders)."""
    path = exp.resolve_path(exp.data.path)
    if path is None:
        raise DataError(f"data.path: required when data.kind is {exp.data.kind!r}")
    name = {"manifest": path.stem, "decathlon": path.parent.name}.get(exp.data.kind, path.name)
    return load_file_dataset(exp.data, path=path, task=exp.task, seed=exp.seed, name=name)
