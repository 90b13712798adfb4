"""The official MedMNIST v2 / MedMNIST+ ``.npz`` files: loading, and download with an MD5 check.

The download code is real (the files' Zenodo record and the MD5s the ``medmnist`` package records)
but medflower never downloads in tests: tests exercise it against local files via ``file://`` URLs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from medflower.data.base import ArraySplit, DataError, DatasetSplits

# MedMNIST v3 Zenodo record (holds every flag at 28, 64, 128 and 224 pixels)
ZENODO = "https://zenodo.org/records/10519652/files/{file}?download=1"
# MD5 of the official 28x28 files, as recorded by the `medmnist` package (INFO[flag]["MD5"])
MD5 = {
    "breastmnist.npz": "750601b1f35ba3300ea97c75c52ff8f6",
    "retinamnist.npz": "bd4c0672f1bba3e3a89f0e4e876791e4",
}
KEYS = ("train_images", "train_labels", "val_images", "val_labels", "test_images", "test_labels")


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def medmnist_filename(flag: str, size: int = 28) -> str:
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def download_medmnist(
    flag: str, root: str | Path, *, size: int = 28, url: str | None = None, md5: str | None = None
) -> Path:
    """Download ``flag`` into ``root`` (if absent) and verify its MD5; returns the file's path.

    A file whose checksum does not match is removed and reported; nothing half-written is left
    behind (the download goes to a temporary file that is renamed only once verified).
    """
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    fname = medmnist_filename(flag, size)
    target = root / fname
    expected = md5 if md5 is not None else MD5.get(fname)
    if target.is_file() and (expected is None or md5sum(target) == expected):
        return target
    src = url or ZENODO.format(file=fname)
    fd, tmp = tempfile.mkstemp(dir=root, suffix=".part")
    os.close(fd)
    try:
        with urllib.request.urlopen(src, timeout=60) as resp, open(tmp, "wb") as out:
            shutil.copyfileobj(resp, out)
        got = md5sum(Path(tmp))
        if expected is not None and got != expected:
            raise DataError(f"{src}: MD5 mismatch (got {got}, expected {expected}); the download was discarded")
        os.replace(tmp, target)
    except OSError as err:
        raise DataError(f"{src}: download failed: {err}") from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def _to_nchw(images: np.ndarray, path: Path, key: str) -> np.ndarray:
    """``(N, C, rows, columns)`` or ``(N, C, rows, columns, slices)``: medflower's axis convention
    (:mod:`medflower.data.readers`), which every file reader follows too."""
    if images.ndim == 3:  # (N, rows, columns) grey: as numpy holds pictures, kept
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3):  # (N, rows, columns, C)
        images = np.moveaxis(images, -1, 1)
    elif images.ndim == 4:
        # 3D grey (OrganMNIST3D etc.) is stored (N, slices, rows, columns): MedMNIST shows images[:, d]
        # as pictures. The convention puts slices last, as MONAI's readers do for NIfTI and DICOM
        # series; the arrays come from an .npz, not a file MONAI reads, so the axis is moved here.
        images = np.moveaxis(images, 1, -1)[:, None]
    else:
        raise DataError(
            f"{path}: {key} has shape {images.shape}; expected (N, rows, columns), (N, rows, columns, C) "
            "or (N, slices, rows, columns)"
        )
    x = images.astype(np.float32)
    if images.dtype == np.uint8:
        x /= 255.0
    return (x - 0.5) / 0.5


def load_medmnist(path: str | Path) -> DatasetSplits:
    """Load an official MedMNIST ``.npz`` (grey or RGB, 2D or 3D, any published size)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: MedMNIST file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in KEYS if k not in npz.files]
            if missing:
                raise DataError(f"{path}: not a MedMNIST file: missing key(s) {', '.join(missing)}")
            raw = {k: npz[k] for k in KEYS}
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{path}: cannot read as .npz: {err}") from err
    splits = {}
    for split in ("train", "val", "test"):
        labels = raw[f"{split}_labels"]
        if labels.ndim == 2 and labels.shape[1] > 1:
            raise DataError(f"{path}: {split}_labels has shape {labels.shape}: multi-label sets are not supported")
        labels = labels.reshape(-1).astype(np.int64)
        images = _to_nchw(raw[f"{split}_images"], path, f"{split}_images")
        if len(images) != len(labels):
            raise DataError(f"{path}: {split}_images has {len(images)} items but {split}_labels has {len(labels)}")
        if not np.isfinite(images).all():
            raise DataError(f"{path}: {split}_images holds non-finite values")
        splits[split] = ArraySplit(images, labels)
    all_labels = np.concatenate([s.targets for s in splits.values()])
    if all_labels.min() < 0:
        raise DataError(f"{path}: labels must be >= 0")
    return DatasetSplits(
        name=path.stem,
        task="classification",
        num_classes=int(all_labels.max()) + 1,
        in_channels=splits["train"].images.shape[1],
        img_size=tuple(splits["train"].images.shape[2:]),
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
    )


def resize_medmnist(splits: DatasetSplits, size: tuple[int, ...], fit: str, *, source: str) -> DatasetSplits:
    """Every image of ``splits`` brought to ``size`` (``data.size``), as the file readers do it.

    MedMNIST stores each set at fixed sizes (AdrenalMNIST3D is 64³ here while MedMNIST v2's published
    baselines are at 28³); ``fit: resize`` interpolates with MONAI's ``Resize`` (linear, anti-aliased),
    ``pad_crop`` pads (with 0, mid-grey after the [-1, 1] scaling) or crops around the centre with
    ``ResizeWithPadOrCrop``. The images are transformed in chunks, one image-channel per MONAI channel.
    """
    nd = len(splits.img_size)
    if len(size) != nd:
        raise DataError(f"{source}: its images are {nd}D {splits.img_size} but data.size has {len(size)} values")
    size = tuple(int(v) for v in size)
    if size == tuple(splits.img_size):
        return splits
    from medflower._preload import require_monai  # MONAI costs ~2 s to import: only when resizing

    require_monai()
    import monai.transforms as mt
    import torch

    transform: mt.Transform
    if fit == "resize":
        transform = mt.Resize(size, mode="bilinear" if nd == 2 else "trilinear", anti_aliasing=True)
    else:
        transform = mt.ResizeWithPadOrCrop(size)

    def one(split: ArraySplit) -> ArraySplit:
        chunks = []
        for i in range(0, len(split.images), 64):
            x = torch.from_numpy(np.ascontiguousarray(split.images[i : i + 64]))
            n, c = x.shape[:2]
            out = torch.as_tensor(transform(x.reshape(n * c, *x.shape[2:])))
            chunks.append(out.reshape(n, c, *size).numpy().astype(np.float32))
        images = np.concatenate(chunks) if chunks else np.zeros((0, splits.in_channels, *size), np.float32)
        return ArraySplit(images, split.targets, split.groups)

    return DatasetSplits(
        name=splits.name,
        task=splits.task,
        num_classes=splits.num_classes,
        in_channels=splits.in_channels,
        img_size=size,
        train=one(splits.train),
        val=one(splits.val),
        test=one(splits.test),
        synthetic=splits.synthetic,
    )
