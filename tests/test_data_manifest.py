"""Hospital-style data sets (CSV manifest, Decathlon dataset.json, folder pairs) on the real shared files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from medflower.config import ConfigError, ExperimentConfig, load_experiment
from medflower.config.data import DataConfig
from medflower.data import load_dataset
from medflower.data.base import DataError
from medflower.data.manifest import load_file_dataset
from medflower.data.readers import balanced_patches

ISBI = "segmentation/isbi2012_em_membrane"
BRAIN = "segmentation/brain_mr_tumour"


def _isbi_cfg(**kw) -> DataConfig:
    base = {
        "kind": "folders",
        "path": "x",
        "image_dir": "image",
        "label_dir": "label",
        "size": (32, 32),
        "intensity": "window",
        "window": (0.0, 255.0),
        "mask_values": (255, 0),
    }
    return DataConfig(**(base | kw))


def _write_manifest(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")
    return path


def _isbi_subset(shared_data: Path, tmp_path: Path, n: int) -> Path:
    """A folder pair with the first ``n`` real ISBI image/mask pairs (symlinks: fast, nothing copied)."""
    root = tmp_path / "isbi"
    for sub in ("image", "label"):
        (root / sub).mkdir(parents=True)
        for i in range(n):
            (root / sub / f"{i}.png").symlink_to(shared_data / ISBI / sub / f"{i}.png")
    return root


def test_folder_pair_segmentation_is_resized_and_mapped(shared_data: Path, tmp_path: Path) -> None:
    ds = load_file_dataset(_isbi_cfg(), path=_isbi_subset(shared_data, tmp_path, 10), task="segmentation", seed=0)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (7, 1, 2)  # 10 images, 10% val, 20% test
    assert ds.train.images.shape[1:] == (1, 32, 32) and ds.train.targets.shape[1:] == (1, 32, 32)
    assert ds.num_classes == 2 and ds.in_channels == 1 and ds.img_size == (32, 32)
    assert ds.train.images.min() >= 0.0 and ds.train.images.max() <= 1.0  # window [0, 255] -> [0, 1]
    assert set(np.unique(ds.train.targets).tolist()) == {0, 1}
    # mask_values [255, 0]: the (black) membranes are class 1, a minority of the pixels
    assert 0.1 < ds.train.targets.mean() < 0.4
    rows = [set(s.groups["row"].tolist()) for s in (ds.train, ds.val, ds.test)]
    assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])


def test_unexpected_mask_values_name_the_file(shared_data: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"label/0\.png.*mask values \[0, 255\].*data.mask_values"):
        load_file_dataset(
            _isbi_cfg(mask_values=None), path=_isbi_subset(shared_data, tmp_path, 2), task="segmentation", seed=0
        )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_patient_never_spans_two_splits(shared_data: Path, tmp_path: Path, seed: int) -> None:
    img = shared_data / ISBI
    rows = [[str(img / "image" / f"{i}.png"), str(img / "label" / f"{i}.png"), f"patient-{i // 3}"] for i in range(15)]
    csv = _write_manifest(tmp_path / "m.csv", ["image", "label", "patient_id"], rows)
    cfg = _isbi_cfg(kind="manifest", val_fraction=0.2, test_fraction=0.3)
    ds = load_file_dataset(cfg, path=csv, task="segmentation", seed=seed)
    patients = [set(s.groups["patient"].tolist()) for s in (ds.train, ds.val, ds.test)]
    assert all(patients)  # every split has someone
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    assert sum(len(p) for p in patients) == 5


def test_explicit_split_with_a_crossing_patient_is_refused_without_printing_the_id(
    shared_data: Path, tmp_path: Path
) -> None:
    img = shared_data / ISBI
    rows = [
        [str(img / "image" / f"{i}.png"), str(img / "label" / f"{i}.png"), "MRN-0042", s]
        for i, s in enumerate(["train", "train", "test"])
    ]
    csv = _write_manifest(tmp_path / "m.csv", ["image", "label", "patient_id", "split"], rows)
    with pytest.raises(DataError, match=r"m\.csv row 4") as err:
        load_file_dataset(_isbi_cfg(kind="manifest"), path=csv, task="segmentation", seed=0)
    assert "MRN-0042" not in str(err.value)


def test_explicit_split_column_is_kept(shared_data: Path, tmp_path: Path) -> None:
    img = shared_data / ISBI
    split = ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    rows = [[str(img / "image" / f"{i}.png"), str(img / "label" / f"{i}.png"), s] for i, s in enumerate(split)]
    csv = _write_manifest(tmp_path / "m.csv", ["image", "label", "split"], rows)
    ds = load_file_dataset(_isbi_cfg(kind="manifest"), path=csv, task="segmentation", seed=3)
    assert ds.test.groups["row"].tolist() == [8, 9] and ds.val.groups["row"].tolist() == [6, 7]


def test_classification_manifest_with_class_names_and_rgb(shared_data: Path, tmp_path: Path) -> None:
    from PIL import Image

    src = shared_data / ISBI / "image"
    rows = []
    for i in range(12):  # an RGB export of real grey images: channels: 1 converts back by luminance
        p = tmp_path / f"rgb{i}.png"
        grey = np.asarray(Image.open(src / f"{i}.png").resize((48, 48)))
        Image.fromarray(np.stack([grey] * 3, axis=-1)).save(p)
        rows.append([p.name, ["normal", "abnormal"][i % 2]])
    csv = _write_manifest(tmp_path / "m.csv", ["image", "diagnosis"], rows)
    cfg = DataConfig(
        kind="manifest", path="x", label_column="diagnosis", classes=("normal", "abnormal"), channels=1, size=(32, 32)
    )
    ds = load_file_dataset(cfg, path=csv, task="classification", seed=0)
    assert ds.in_channels == 1 and ds.num_classes == 2
    allx = np.concatenate([ds.train.targets, ds.val.targets, ds.test.targets])
    assert sorted(allx.tolist()) == [0] * 6 + [1] * 6
    rgb = load_file_dataset(DataConfig(**{**cfg.__dict__, "channels": 3}), path=csv, task="classification", seed=0)
    assert rgb.in_channels == 3
    _write_manifest(csv, ["image", "diagnosis"], [*rows, ["rgb0.png", "unknown"]])
    with pytest.raises(DataError, match=r"m\.csv row 14.*'unknown'.*normal"):
        load_file_dataset(cfg, path=csv, task="classification", seed=0)


def test_missing_column_lists_the_columns(tmp_path: Path) -> None:
    csv = _write_manifest(tmp_path / "m.csv", ["path", "label"], [["a.png", "0"]])
    with pytest.raises(DataError, match=r"missing column\(s\) 'image'.*'path', 'label'"):
        load_file_dataset(DataConfig(kind="manifest", path="x"), path=csv, task="classification", seed=0)


def test_decathlon_dataset_json_3d_slabs_and_patches(shared_data: Path, tmp_path: Path) -> None:
    brain = shared_data / BRAIN
    meta = {
        "name": "brain",
        "labels": {"0": "background", "1": "tumour"},
        "modality": {"0": "MR"},
        "training": [
            {
                "image": str(brain / f"brain{i}_image.nii.gz"),
                "label": str(brain / f"brain{i}_label.nii.gz"),
                "patient_id": f"brain{i}",
            }
            for i in (1, 2)
        ],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    cfg = DataConfig(
        kind="decathlon",
        path="x",
        size=(32, 32, 16),
        slabs=2,
        split_by="sample",
        val_fraction=0.0,
        test_fraction=0.5,
        intensity="zscore",
        patch_size=(16, 16, 8),
    )
    ds = load_file_dataset(cfg, path=tmp_path / "dataset.json", task="segmentation", seed=0)
    assert ds.num_classes == 2 and ds.img_size == (16, 16, 8)
    # each patient: 2 slabs of 32x32x8, one train and one test; train slabs become 2x2x1 grid patches
    assert ds.test.images.shape == (2, 1, 32, 32, 8)
    assert sorted(ds.test.groups["patient"].tolist()) == [0, 1]
    assert ds.train.images.shape == (8, 1, 16, 16, 8) and ds.train.targets.shape == (8, 1, 16, 16, 8)
    assert sorted(set(ds.train.groups["patient"].tolist())) == [0, 1]
    # balanced patches (MONAI RandCropByPosNegLabel) are seeded: the same in every process
    a = balanced_patches(ds.test.images, ds.test.targets, (16, 16, 8), per_image=3, seed=0)
    b = balanced_patches(ds.test.images, ds.test.targets, (16, 16, 8), per_image=3, seed=0)
    c = balanced_patches(ds.test.images, ds.test.targets, (16, 16, 8), per_image=3, seed=1)
    assert a[0].shape == (6, 1, 16, 16, 8) and a[1].shape == (6, 1, 16, 16, 8)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and not np.array_equal(a[0], c[0])


def test_experiment_manifest_paths_resolve_from_the_yaml_and_partition_by_patient(
    shared_data: Path, tmp_path: Path
) -> None:
    brain = shared_data / BRAIN
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    rows = [[str(brain / f"brain{i}_image.nii.gz"), str(brain / f"brain{i}_label.nii.gz"), f"p{i}"] for i in (1, 2)]
    _write_manifest(data_dir / "brain.csv", ["image", "label", "patient_id"], rows)
    exp_yaml = tmp_path / "exp.yaml"
    exp_yaml.write_text(
        yaml.safe_dump(
            {
                "task": "segmentation",
                "data": {
                    "kind": "manifest",
                    "path": "data/brain.csv",
                    "size": [32, 32, 16],
                    "slabs": 4,
                    "split_by": "sample",
                    "val_fraction": 0.25,
                    "test_fraction": 0.25,
                },
                "partition": {"kind": "natural", "group": "patient", "num_sites": 2, "min_site_size": 1},
                "model": {"name": "unet", "spatial_dims": 3},
            }
        )
    )
    exp = load_experiment(exp_yaml)
    ds = load_dataset(exp)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (4, 2, 2)
    from medflower.simulation.sites import build_sites

    sites = build_sites(exp)
    assert [len(s.train) for s in sites] == [2, 2]
    assert [set(s.train.groups["patient"].tolist()) for s in sites] in ([{0}, {1}], [{1}, {0}])


@pytest.mark.parametrize(
    "data, match",
    [
        ({"kind": "folders"}, "data.path: required"),
        ({"intensity": "window"}, "data.window: required"),
        ({"window": [1, 0]}, "data.window"),
        ({"size": [64, 64], "patch_size": [128, 128]}, "data.patch_size.*exceeds"),
        ({"size": [64, 64, 10], "slabs": 4}, "data.slabs: 4 does not divide"),
        ({"mask_values": [0, 255], "num_classes": 3}, "data.mask_values"),
        ({"orientation": "XYZ"}, "data.orientation"),
        ({"split_by": "image"}, "split_by.*'patient', 'sample'"),
    ],
)
def test_data_config_errors_name_the_key(data: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ExperimentConfig.from_dict({"data": data})


def test_missing_shared_folder_is_a_named_error(tmp_path: Path) -> None:
    shutil.rmtree(tmp_path, ignore_errors=True)
    with pytest.raises(DataError, match="folder not found"):
        load_file_dataset(_isbi_cfg(), path=tmp_path / "nowhere", task="segmentation", seed=0)
