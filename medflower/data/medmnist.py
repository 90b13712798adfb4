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
from collections.abc import Callable
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


def load_medmnist(path: str | Path, *, size: tuple[int, ...] | None = None, fit: str = "resize") -> DatasetSplits:
    """Load an official MedMNIST ``.npz`` (grey or RGB, 2D or 3D, any published size).

    ``size`` (``data.size``) brings every image to that size (``fit``: ``resize`` or ``pad_crop``, see
    :func:`make_resizer`), converting and resizing 64 images at a time: AdrenalMNIST3D at 64³ is 0.4 GB
    as stored but 1.7 GB as float32, which the resized set never needs at once.
    """
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
        key = f"{split}_images"
        images = _to_nchw(raw[key], path, key) if size is None else _resized(raw[key], path, key, size, fit)
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


def make_resizer(size: tuple[int, ...], fit: str) -> Callable[[np.ndarray], np.ndarray]:
    """``(N, C, *spatial)`` float32 -> ``(N, C, *size)``, as the file readers prepare images.

    ``fit: resize`` interpolates with MONAI's ``Resize`` (linear, anti-aliased), ``pad_crop`` pads (with 0,
    mid-grey after the [-1, 1] scaling) or crops around the centre with ``ResizeWithPadOrCrop``; each
    image-channel is one MONAI channel. Why: MedMNIST stores each set at fixed sizes (AdrenalMNIST3D is
    64³ here while MedMNIST v2's published baselines are at 28³).
    """
    from medflower._preload import require_monai  # MONAI costs ~2 s to import: only when resizing

    require_monai()
    import monai.transforms as mt
    import torch

    transform: mt.Transform
    if fit == "resize":
        transform = mt.Resize(size, mode="bilinear" if len(size) == 2 else "trilinear", anti_aliasing=True)
    else:
        transform = mt.ResizeWithPadOrCrop(size)

    def resize(x: np.ndarray) -> np.ndarray:
        n, c = x.shape[:2]
        out = torch.as_tensor(transform(torch.from_numpy(np.ascontiguousarray(x)).reshape(n * c, *x.shape[2:])))
        return out.reshape(n, c, *size).numpy().astype(np.float32)

    return resize


def _resized(raw: np.ndarray, path: Path, key: str, size: tuple[int, ...], fit: str, chunk: int = 64) -> np.ndarray:
    """``raw`` (as stored) converted by :func:`_to_nchw` and brought to ``size``, ``chunk`` images at a time."""
    first = _to_nchw(raw[:1], path, key)
    nd = first.ndim - 2
    if len(size) != nd:
        raise DataError(f"{path}: its images are {nd}D {first.shape[2:]} but data.size has {len(size)} values")
    size = tuple(int(v) for v in size)
    resize = make_resizer(size, fit)
    parts = [resize(_to_nchw(raw[i : i + chunk], path, key)) for i in range(0, len(raw), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, first.shape[1], *size), np.float32)
