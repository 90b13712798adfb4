"""A hospital's site YAML: its public name and where its images are; ``medflower site check``.

The IT team of a hospital writes this file once, next to its data::

    name: st-mary-radiology        # public: the only thing about the site the federation sees
    task: segmentation             # classification (labels) or segmentation (mask files)
    data:
      kind: manifest               # manifest (CSV) | decathlon (dataset.json) | folders
      path: /data/fl/manifest.csv  # relative paths resolve from this YAML's folder
      patient_column: patient_id   # optional; one patient never spans train and test

Keys under ``data:`` are those of an experiment's ``data:`` section (:class:`DataConfig`). How
images are *prepared* (size, spacing, intensity window, ...) must be the same at every site, so
preparation keys the site YAML leaves out are taken from the experiment the coordinator sends
(:data:`medflower.config.data.PREPARATION_KEYS`); the site's own split fractions and columns stay.

Two more sections belong to the hospital alone, never to the coordinator:

* ``policy:`` (:class:`~medflower.client.policy.SitePolicy`): the models, strategies, privacy, rounds
  and evaluations the site agrees to; every message is checked against it before any work;
* ``state_dir:`` the node's state folder (privacy ledgers, audit log: :mod:`medflower.client.state`),
  relative to this YAML; node config ``state-dir`` names it too.

The SuperNode reads it through ``--node-config "site-config='site.yaml'"``
(:func:`load_site_data`, called by :mod:`medflower.client.app`). Loading is the very code the simulator uses
(:func:`medflower.data.manifest.load_file_dataset`), so a federation rehearsed in simulation reads
a hospital's files the same way.

``medflower site check SITE.yaml`` reads every file once before the hospital joins and reports
counts, label balance, shapes, spacings, unreadable files, masks on the wrong grid and patients
that cross splits. It prints paths, shapes and spacings only: never a DICOM header value (names,
IDs, dates) and never a patient ID from the manifest (rows are named instead).
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medflower.client.policy import SitePolicy
from medflower.config import ExperimentConfig, load_experiment
from medflower.config.data import FILE_KINDS, PREPARATION_KEYS, DataConfig
from medflower.data import SiteData
from medflower.data.base import DataError
from medflower.data.manifest import assign_splits, load_file_dataset, patient_crossings, read_rows
from medflower.data.preparation import fingerprint
from medflower.data.readers import AXCODES_3D, axes_of, file_format, prepare, segmentation_classes
from medflower.schema import ConfigError, from_dict, read_yaml_mapping, to_dict

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class SiteConfig:
    """The site YAML. ``name`` is public; ``data`` says where the files are (see module doc)."""

    name: str
    task: Literal["classification", "segmentation"]
    data: DataConfig
    policy: SitePolicy = field(default_factory=SitePolicy)  # what the hospital agrees to (client/policy.py)
    state_dir: str | None = None  # the node's state folder (client/state.py); relative to this YAML
    # the YAML's folder (relative paths resolve from it); not a YAML key
    base_dir: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ConfigError(
                f"name: {self.name!r} is not a valid public site name: 1-64 letters, digits, "
                "'.', '_' or '-', starting with a letter or digit (no patient or staff names)"
            )
        if self.data.kind not in FILE_KINDS:
            raise ConfigError(
                "data.kind: a site reads its own files; valid choices are "
                + ", ".join(repr(k) for k in FILE_KINDS)
                + f" (got {self.data.kind!r})"
            )

    def data_path(self) -> Path:
        p = Path(self.data.path or "").expanduser()
        return p if p.is_absolute() or not self.base_dir else Path(self.base_dir) / p

    def state_path(self) -> Path | None:
        """``state_dir`` resolved from the YAML's folder (None when the YAML names none)."""
        if not self.state_dir:
            return None
        p = Path(self.state_dir).expanduser()
        return p if p.is_absolute() or not self.base_dir else Path(self.base_dir) / p


def _read_yaml(path: Path) -> dict[str, Any]:
    return read_yaml_mapping(path, what="site", keys_hint="keys name, task, data, policy, state_dir")


def load_site_config(path: str | Path, exp: ExperimentConfig | None = None) -> SiteConfig:
    """Read and validate a site YAML; with ``exp``, fill the preparation keys it omits from ``exp.data``.

    Errors name the file and the key. With ``exp``, a task that differs from the experiment's is an
    error (a site with masks cannot join a classification study).
    """
    path = Path(path)
    raw = _read_yaml(path)
    if exp is not None and isinstance(raw.get("data"), dict):
        inherited = {k: v for k, v in to_dict(exp.data).items() if k in PREPARATION_KEYS and k not in raw["data"]}
        raw = {**raw, "data": {**inherited, **raw["data"]}}
    try:
        site = from_dict(SiteConfig, raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    if exp is not None and site.task != exp.task:
        raise ConfigError(f"{path}: task is {site.task!r} but the experiment {exp.name!r} is {exp.task!r}")
    return replace(site, base_dir=str(path.resolve().parent))


def load_site_data(site_yaml_path: str | Path, exp: ExperimentConfig) -> SiteData:
    """The hospital's own train/val/test arrays, prepared as ``exp`` prescribes (cached per process)."""
    path = Path(site_yaml_path).resolve()
    mtime = path.stat().st_mtime_ns if path.is_file() else 0
    return _load_site(str(path), mtime, exp.to_json())


@lru_cache(maxsize=2)
def _load_site(path: str, mtime: int, exp_json: str) -> SiteData:
    exp = ExperimentConfig.from_json(exp_json)
    site = load_site_config(path, exp)
    channels, size, source = _model_input(exp)
    try:
        ds = load_file_dataset(
            site.data,
            path=site.data_path(),
            task=site.task,
            seed=exp.seed,
            name=site.name,
            expect_channels=channels,
            expect_size=size,
            expected_from=source,
        )
    except DataError as err:  # every data error of a site names the site
        text = str(err)
        raise DataError(text if text.startswith(f"site {site.name!r}") else f"site {site.name!r}: {text}") from err
    info = {"num_classes": ds.num_classes, "preparation": fingerprint(site.data, ds).to_json()}  # sent: no paths
    return SiteData(site.name, ds.train, ds.val, ds.test, info)


def _model_input(exp: ExperimentConfig) -> tuple[int, tuple[int, ...], str]:
    """The input the experiment's model is built for: channels, size (rows x columns [x slices]), and
    where they come from; the very sizes :func:`medflower.modelspec.build_experiment_model` uses."""
    m = exp.model
    if m.in_channels is not None and m.img_size is not None:
        return m.in_channels, tuple(m.img_size), "the experiment's model (model.in_channels, model.img_size)"
    from medflower.modelspec import model_spec  # lazy: imports the model zoo, which `site check` does not need

    spec = model_spec(exp)  # the sizes model.* leaves open come from the experiment's data set
    return spec.in_channels, tuple(spec.img_size), "the experiment's model (sized by model.* and the experiment's data)"


# ------------------------------------------------------------------------------------------ site check
@dataclass
class CheckReport:
    lines: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _counts(counter: Counter, fmt: Any = str) -> str:
    return ", ".join(f"{fmt(k)} (x{n})" for k, n in counter.most_common(6)) + (
        f", ... {len(counter) - 6} more" if len(counter) > 6 else ""
    )


def _shape(t: tuple) -> str:
    return "x".join(str(v) for v in t)


def check_site(site: SiteConfig, *, seed: int = 0) -> CheckReport:
    """Read every file of ``site`` once (with its preparation) and collect what a person must know."""
    rep = CheckReport()
    cfg, path = site.data, site.data_path()
    rep.lines.append(f"site {site.name!r}: {site.task}, data.kind {cfg.kind}, {path.resolve()}")
    try:
        rows = read_rows(cfg, path, site.task)
    except DataError as err:
        rep.errors.append(str(err))
        return rep
    n = len(rows.rows)
    rep.lines.append(
        f"listed: {n} image(s)"
        + (
            f", {len({r.patient for r in rows.rows if r.patient})} patient(s)"
            if rows.has_patients
            else " (no patient column: each image is treated as its own patient)"
        )
    )
    formats: Counter[str] = Counter()
    shapes: Counter[tuple[int, ...]] = Counter()
    spacings: Counter[tuple[float, ...]] = Counter()
    channels: Counter[int] = Counter()
    prepared_shapes: Counter[tuple[int, ...]] = Counter()
    labels: Counter[int] = Counter()
    mask_values: Counter[int] = Counter()
    voxels: Counter[str] = Counter()
    seen: dict[str, str] = {}
    ok_rows = []
    for r, row in enumerate(rows.rows):
        key = str(row.image.resolve())
        if key in seen:
            rep.warnings.append(f"{row.where}: image {row.image} is also listed at {seen[key]}")
        seen.setdefault(key, row.where)
        try:
            formats[file_format(row.image) if row.image.exists() else "missing"] += 1
            prep = prepare(
                row.image,
                row.label if isinstance(row.label, Path) else None,
                cfg,
                num_classes=segmentation_classes(cfg, rows.num_classes),
            )
        except DataError as err:
            rep.errors.append(f"{row.where}: {err}")
            continue
        ok_rows.append(r)
        shapes[prep.raw_shape] += 1
        spacings[prep.spacing] += 1
        channels[prep.raw_channels] += 1
        prepared_shapes[prep.image.shape] += 1
        if prep.mask is not None:
            mask_values.update(prep.mask_values)
            values, counts = np.unique(prep.mask, return_counts=True)
            voxels.update(dict(zip(values.tolist(), counts.tolist(), strict=True)))
        else:
            labels[int(row.label)] += 1  # type: ignore[arg-type]
    rep.lines.append(f"readable: {len(ok_rows)}/{n}; formats: {_counts(formats)}")
    if ok_rows:
        dims = sorted({len(s) - 1 for s in prepared_shapes})
        axes = axes_of(dims[0]) if len(dims) == 1 else "rows x columns (x slices)"
        oriented = ""
        if 3 in dims:
            oriented = (
                f", volumes reoriented to {cfg.orientation} (data.orientation)"
                if cfg.orientation
                else f", volumes reoriented to {AXCODES_3D}: rows anterior->posterior, columns right->left, "
                "slices inferior->superior"
            )
        rep.lines.append(f"axes: {axes} (row 0 at the top{oriented}), the same for every file format")
        rep.lines.append(f"shapes as read ({axes}): {_counts(shapes, _shape)}")
        rep.lines.append(f"channels as stored: {_counts(channels)}")
        rep.lines.append(f"spacings as read (mm, {axes}): {_counts(spacings, _shape)}")
        rep.lines.append(f"prepared (channels x {axes}): {_counts(prepared_shapes, _shape)}")
        if len(dims) > 1:
            rep.errors.append(
                f"images are {' and '.join(f'{d}D' for d in dims)}; one site's images must all be 2D or all 3D"
            )
        elif len(prepared_shapes) > 1 and cfg.size is None:
            rep.warnings.append(
                f"images differ in shape ({_counts(prepared_shapes, _shape)}); the experiment's "
                "data.size must resize them (check with --experiment EXP.yaml)"
            )
        elif len(prepared_shapes) > 1:
            rep.errors.append(
                f"prepared images differ in shape ({_counts(prepared_shapes, _shape)}); set "
                "data.size (and data.channels) so that every image has the same shape"
            )
    if site.task == "classification" and labels:
        names = cfg.classes or ()
        total = sum(labels.values())
        rep.lines.append(
            "label balance: "
            + ", ".join(
                f"{names[k] if k < len(names) else k}: {labels[k]} ({100 * labels[k] / total:.1f}%)"
                for k in sorted(labels)
            )
        )
        if len(labels) < 2:
            rep.warnings.append("only one class present: this site cannot train a classifier on its own")
    if site.task == "segmentation" and voxels:
        total = sum(voxels.values())
        rep.lines.append(f"stored mask values: {sorted(mask_values)}")
        rep.lines.append(
            "class balance (voxels): "
            + ", ".join(f"class {k}: {100 * v / total:.2f}%" for k, v in sorted(voxels.items()))
        )
    crossing = patient_crossings(rows.rows, [r.split for r in rows.rows])
    for c in crossing[:20]:
        rep.errors.append("one patient is in more than one split: " + ", ".join(c) + " (rows shown, not the ID)")
    if ok_rows and not crossing:
        units = [r for r in ok_rows for _ in range(cfg.slabs)]
        try:
            splits = Counter(assign_splits(rows.rows, units, cfg, seed=seed))
            rep.lines.append(
                f"splits (seed {seed}): train {splits['train']}, val {splits['val']}, "
                f"test {splits['test']}" + (f" ({cfg.slabs} slabs per volume)" if cfg.slabs > 1 else "")
            )
            if not splits["train"]:
                rep.errors.append("no training samples after splitting; lower data.val_fraction/test_fraction")
        except DataError as err:
            rep.errors.append(str(err))
        if cfg.split_by == "sample":
            rep.warnings.append("data.split_by is 'sample': each patient is on both sides of the split")
    return rep


def _check_device(rep: CheckReport, exp: ExperimentConfig, site_name: str) -> None:
    """Can this machine train the experiment as ``train.device`` / ``train.precision`` ask? (the site's
    own hardware: the check a coordinator cannot make for it, see medflower/device.py)."""
    from medflower.device import describe, resolve_amp  # here: torch, which the data checks do not need

    try:
        amp = resolve_amp(exp.train.device, exp.train.precision, where=f"site {site_name!r}")
    except ConfigError as err:
        rep.errors.append(str(err))
        return
    rep.lines.append(f"device: {describe(amp.device)} (train.device {exp.train.device!r}), precision {amp.precision}")


def run_check(site_yaml: str | Path, experiment: str | Path | None = None, *, out: Any = None) -> int:
    """``medflower site check``: print the report; 0 if the data are usable, 1 on errors."""
    out = out or sys.stdout
    exp = load_experiment(experiment) if experiment else None
    site = load_site_config(site_yaml, exp)
    rep = check_site(site, seed=exp.seed if exp is not None else 0)
    if exp is not None:
        _check_device(rep, exp, site.name)
    for line in rep.lines:
        print(line, file=out)
    for w in rep.warnings:
        print(f"WARNING: {w}", file=out)
    for e in rep.errors:
        print(f"ERROR: {e}", file=out)
    verdict = "FAILED" if rep.errors else "OK"
    print(f"site check {verdict}: {len(rep.errors)} error(s), {len(rep.warnings)} warning(s)", file=out)
    return 1 if rep.errors else 0
