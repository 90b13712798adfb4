"""The official MedMNIST .npz loader and its download code (exercised on local files only)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from medflower.config import ExperimentConfig
from medflower.data import DataError, load_dataset
from medflower.data.medmnist import MD5, download_medmnist, load_medmnist, md5sum
from medflower.data.synthetic import synthetic_classification


def test_breastmnist_loads(shared_data: Path) -> None:
    ds = load_medmnist(shared_data / "medmnist" / "breastmnist.npz")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (546, 78, 156)
    assert ds.num_classes == 2 and ds.in_channels == 1 and ds.img_size == (28, 28)
    assert ds.train.images.shape == (546, 1, 28, 28) and ds.train.images.dtype == np.float32
    assert ds.train.images.min() >= -1.0 and ds.train.images.max() <= 1.0
    assert set(np.unique(ds.test.targets)) == {0, 1}


def test_retinamnist_rgb_loads_channels_first(shared_data: Path) -> None:
    ds = load_medmnist(shared_data / "medmnist" / "retinamnist.npz")
    assert ds.in_channels == 3 and ds.num_classes == 5
    assert ds.train.images.shape == (1080, 3, 28, 28)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.npz: MedMNIST file not found"):
        load_medmnist(tmp_path / "nope.npz")


def test_truncated_file_is_named(shared_data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "breastmnist.npz"
    bad.write_bytes((shared_data / "medmnist" / "breastmnist.npz").read_bytes()[:5000])
    with pytest.raises(DataError, match=r"breastmnist\.npz: cannot read as \.npz"):
        load_medmnist(bad)


def test_wrong_keys_are_named(tmp_path: Path) -> None:
    p = tmp_path / "other.npz"
    np.savez(p, x=np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(DataError, match=r"other\.npz: not a MedMNIST file: missing key\(s\) train_images"):
        load_medmnist(p)


def test_length_mismatch_is_named(tmp_path: Path) -> None:
    p = tmp_path / "m.npz"
    arrays = {f"{s}_images": np.zeros((4, 28, 28), np.uint8) for s in ("train", "val", "test")}
    arrays |= {f"{s}_labels": np.zeros((4, 1), np.uint8) for s in ("train", "val", "test")}
    arrays["val_labels"] = np.zeros((3, 1), np.uint8)
    np.savez(p, **arrays)
    with pytest.raises(DataError, match=r"m\.npz: val_images has 4 items but val_labels has 3"):
        load_medmnist(p)


def _volumes_npz(path: Path, side: int) -> Path:
    """A synthetic 3D MedMNIST-format file: each volume is one constant grey value (0, 51, ..., 255)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        values = rng.integers(0, 6, n) * 51
        arrays[f"{split}_images"] = np.broadcast_to(values[:, None, None, None], (n, side, side, side)).astype(np.uint8)
        arrays[f"{split}_labels"] = (values[:, None] > 120).astype(np.uint8)
    np.savez(path, **arrays)
    return path


def test_data_size_resizes_medmnist_volumes(tmp_path: Path) -> None:
    """data.size applies to MedMNIST files (AdrenalMNIST3D is stored at 64³, the paper's baselines are 28³)."""
    path = _volumes_npz(tmp_path / "synthetic3d_16.npz", 16)
    raw = load_medmnist(path)

    def exp(**data: object) -> ExperimentConfig:
        return ExperimentConfig.from_dict(
            {"data": {"kind": "medmnist", "path": str(path), **data}, "model": {"spatial_dims": 3}}
        )

    small = load_dataset(exp(size=[8, 8, 8]))
    assert small.img_size == (8, 8, 8) and small.train.images.shape == (6, 1, 8, 8, 8)
    assert small.train.images.dtype == np.float32
    # a constant volume stays that constant when interpolated: the values, labels and order are kept
    np.testing.assert_allclose(small.train.images[:, 0, 4, 4, 4], raw.train.images[:, 0, 0, 0, 0], atol=1e-5)
    assert (small.train.targets == raw.train.targets).all() and len(small.test) == 2
    padded = load_dataset(exp(size=[20, 20, 20], fit="pad_crop"))
    assert padded.img_size == (20, 20, 20) and (padded.val.images[:, 0, 0, 0, 0] == 0.0).all()  # pad: 0
    with pytest.raises(DataError, match=r"synthetic3d_16\.npz: its images are 3D \(16, 16, 16\) but data.size has 2"):
        load_dataset(exp(size=[8, 8]))


def test_download_verifies_md5_from_a_local_url(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "medmnist" / "breastmnist.npz"
    assert md5sum(src) == MD5["breastmnist.npz"]
    got = download_medmnist("breastmnist", tmp_path / "cache", url=src.resolve().as_uri())
    assert got.name == "breastmnist.npz" and md5sum(got) == MD5["breastmnist.npz"]
    # a cached, verified file is not fetched again (the URL now points nowhere)
    again = download_medmnist("breastmnist", tmp_path / "cache", url=(tmp_path / "gone").as_uri())
    assert again == got


def test_download_rejects_bad_checksum_and_leaves_nothing(shared_data: Path, tmp_path: Path) -> None:
    fake = tmp_path / "fake.npz"
    shutil.copy(shared_data / "medmnist" / "retinamnist.npz", fake)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="MD5 mismatch"):
        download_medmnist("breastmnist", cache, url=fake.as_uri())
    assert list(cache.iterdir()) == []


def test_download_failure_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="download failed"):
        download_medmnist("breastmnist", tmp_path, url=(tmp_path / "missing.npz").as_uri())


def test_synthetic_is_deterministic_and_named_synthetic() -> None:
    a = synthetic_classification(samples=100, seed=1)
    b = synthetic_classification(samples=100, seed=1)
    c = synthetic_classification(samples=100, seed=2)
    assert a.synthetic and "synthetic" in a.name
    np.testing.assert_array_equal(a.train.images, b.train.images)
    assert not np.array_equal(a.train.images, c.train.images)
    assert set(np.unique(a.train.targets)) == {0, 1}
