"""Reading one medical image file (or DICOM series) and preparing it into a fixed-size array.

All decoding is MONAI's: ``LoadImage`` with ``NibabelReader`` (NIfTI), ``PydicomReader`` (a DICOM
file, or a folder holding one series), ``PILReader`` (PNG/JPEG/BMP/TIFF) or ``NumpyReader``
(``.npy``); preparation is a chain of MONAI transforms (``Orientation``, ``Spacing``, ``Resize`` or
``ResizeWithPadOrCrop``, ``ScaleIntensity``/``NormalizeIntensity``/``ScaleIntensityRange``). What is
written here is only the glue MONAI has no transform for: choosing the reader from the path, the
channel-count adapter (RGB to grey and back), the image-vs-mask grid check and mapping stored mask
values (e.g. 0/255 PNG masks) to class indices.

Privacy: DICOM headers are read by pydicom but never leave this module. Only the pixel array, the
spatial shape and the voxel spacing are returned; errors name the file and the exception type, not
header values (pydicom's warnings and messages can quote tag values such as a patient's name).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom.misc import is_dicom

from medflower.config.data import DataConfig
from medflower.data.base import DataError

# MONAI logs a warning about an optional GPU DICOM decoder on every PydicomReader: not actionable here
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)

NIFTI = (".nii", ".nii.gz")
DICOM = (".dcm", ".dicom")
PIL_IMAGES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NUMPY = (".npy",)
SUPPORTED = NIFTI + DICOM + PIL_IMAGES + NUMPY
GRID_ATOL_MM = 1e-2  # image and mask affines may differ by float rounding, not by a voxel

# MONAI is imported inside the functions that decode or transform images ("MONAI: lazy" below): it
# takes seconds to import, and this module is also loaded by `medflower node check`, which only lists
# a site's files (manifest.read_rows) and answers in about a second without it.


def file_format(path: Path) -> str:
    """``nifti``, ``dicom``, ``image`` or ``numpy`` from the path (a folder is a DICOM series).

    A file without a known suffix is DICOM if pydicom's preamble check says so (DICOM exports often
    have no suffix at all).
    """
    name = path.name.lower()
    if path.is_dir():
        return "dicom"
    if name.endswith(NIFTI):
        return "nifti"
    if name.endswith(DICOM):
        return "dicom"
    if name.endswith(PIL_IMAGES):
        return "image"
    if name.endswith(NUMPY):
        return "numpy"
    if path.is_file() and is_dicom(path):
        return "dicom"
    raise DataError(
        f"{path}: unsupported file type; supported: {', '.join(SUPPORTED)}, or a folder holding one DICOM series"
    )


def _reader(fmt: str) -> Any:
    from monai.data import NibabelReader, NumpyReader, PILReader, PydicomReader  # MONAI: lazy (see top)

    if fmt == "nifti":
        return NibabelReader()
    if fmt == "dicom":
        return PydicomReader()
    if fmt == "image":
        return PILReader()
    return NumpyReader()


def read_image(path: str | Path) -> Any:
    """Read ``path`` as a channel-first MONAI ``MetaTensor`` (float32, affine attached).

    Raises :class:`DataError` naming the file when it is missing, empty, truncated or not readable
    by the reader its type selects.
    """
    from monai.transforms import LoadImage  # MONAI: lazy (see top)

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    fmt = file_format(path)
    if path.is_dir() and not any(p.is_file() for p in path.iterdir()):
        raise DataError(f"{path}: empty folder (expected the files of one DICOM series)")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom/nibabel warnings may quote header values
            img = LoadImage(reader=_reader(fmt), image_only=True, ensure_channel_first=True, dtype=np.float32)(
                str(path)
            )
    except Exception as err:
        detail = type(err).__name__ if fmt == "dicom" else f"{type(err).__name__}: {_first_line(err)}"
        raise DataError(f"{path}: cannot read as {fmt}: {detail}") from None
    if img.ndim not in (3, 4):
        raise DataError(f"{path}: has {img.ndim - 1} spatial dimensions after reading; expected 2D or 3D")
    if not torch.isfinite(img).all():
        raise DataError(f"{path}: holds NaN or infinite values")
    return img


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else ""


def spacing_of(img: Any) -> tuple[float, ...]:
    """Voxel spacing (mm) from the image's affine (1.0 per axis for PNG/JPEG)."""
    return tuple(round(float(v), 4) for v in img.pixdim)


def grid_mismatch(image: Any, mask: Any) -> str | None:
    """Why ``mask`` is not on ``image``'s voxel grid (shape or affine), or None if it is."""
    if tuple(image.shape[1:]) != tuple(mask.shape[1:]):
        return f"mask shape {tuple(mask.shape[1:])} differs from image shape {tuple(image.shape[1:])}"
    a, b = np.asarray(image.affine, dtype=np.float64), np.asarray(mask.affine, dtype=np.float64)
    if a.shape != b.shape or not np.allclose(a, b, atol=GRID_ATOL_MM):
        return (
            f"mask affine differs from image affine (spacing {spacing_of(mask)} vs {spacing_of(image)}; "
            "origin or orientation may differ)"
        )
    return None


@dataclass
class Prepared:
    image: np.ndarray  # float32 (C, *spatial)
    mask: np.ndarray | None  # int64 (1, *spatial) class indices
    raw_shape: tuple[int, ...]  # spatial shape as stored
    raw_channels: int
    spacing: tuple[float, ...]  # as stored
    mask_values: tuple[int, ...] = ()  # distinct stored mask values (before mapping)


def _adapt_channels(img: Any, channels: int | None, path: Path) -> Any:
    """Bring the channel count to ``channels``: RGB(A) to grey by luminance, grey to RGB by repeat.

    MONAI has ``RepeatChannel`` (used) but no colour-to-grey transform, hence the few lines here.
    """
    c = img.shape[0]
    if channels is None or c == channels:
        return img
    if c == 4 and channels == 3:  # RGBA: drop alpha
        return img[:3]
    if c in (3, 4) and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=img.dtype).reshape(3, *([1] * (img.ndim - 1)))
        return (img[:3] * w).sum(0, keepdim=True)
    if c == 1:
        from monai.transforms import RepeatChannel  # MONAI: lazy (see top)

        return RepeatChannel(repeats=channels)(img)
    raise DataError(f"{path}: has {c} channels; data.channels is {channels} and medflower converts only grey<->RGB(A)")


def _mask_to_classes(mask: np.ndarray, cfg: DataConfig, num_classes: int, path: Path) -> np.ndarray:
    values = np.unique(mask)
    if not np.allclose(values, np.round(values)):
        raise DataError(f"{path}: mask holds non-integer values; a mask must hold label values")
    mask = np.round(mask).astype(np.int64)
    if cfg.mask_values is not None:
        lut = {int(v): i for i, v in enumerate(cfg.mask_values)}
        bad = sorted(set(np.unique(mask).tolist()) - set(lut))
        if bad:
            raise DataError(f"{path}: mask values {bad[:10]} are not in data.mask_values {list(cfg.mask_values)}")
        out = np.zeros_like(mask)
        for v, i in lut.items():
            out[mask == v] = i
        return out
    if mask.min() < 0 or mask.max() >= num_classes:
        raise DataError(
            f"{path}: mask values {np.unique(mask).tolist()[:10]} fall outside the class indices "
            f"0..{num_classes - 1}; set data.mask_values to map stored values (e.g. [0, 255]) to "
            "classes, or data.num_classes"
        )
    return mask


def segmentation_classes(cfg: DataConfig, listed: int | None = None) -> int:
    """Class count of a segmentation set: ``num_classes``, else ``mask_values``, else the count the
    data set lists (``dataset.json`` labels), else 2 (binary masks)."""
    return cfg.num_classes or (len(cfg.mask_values) if cfg.mask_values else None) or listed or 2


def prepare(image_path: Path, mask_path: Path | None, cfg: DataConfig, *, num_classes: int | None = None) -> Prepared:
    """Read ``image_path`` (and its mask) and apply the configured preparation with MONAI transforms.

    Mask values must be class indices below ``num_classes`` (default :func:`segmentation_classes`).
    """
    from monai import transforms as mt  # MONAI: lazy (see top)

    img = read_image(image_path)
    raw_shape, raw_channels, spacing = tuple(img.shape[1:]), int(img.shape[0]), spacing_of(img)
    mask = None
    if mask_path is not None:
        mask = read_image(mask_path)
        if mask.shape[0] == 3 and torch.equal(mask[0], mask[1]) and torch.equal(mask[0], mask[2]):
            mask = mask[:1]  # an RGB-saved grey mask
        if mask.shape[0] != 1:
            raise DataError(f"{mask_path}: a mask must have one channel, got {mask.shape[0]}")
        why = grid_mismatch(img, mask)
        if why:
            raise DataError(f"{mask_path}: not on the grid of its image {image_path.name}: {why}")
    nd = img.ndim - 1
    for key in ("spacing", "size", "patch_size"):
        value = getattr(cfg, key)
        if value is not None and len(value) != nd:
            raise DataError(f"{image_path}: is {nd}D {raw_shape} but data.{key} has {len(value)} values")
    img = _adapt_channels(img, cfg.channels, image_path)
    stored_values: tuple[int, ...] = ()
    if mask is not None:
        stored_values = tuple(int(v) for v in torch.unique(mask).tolist()[:256])
    try:
        if cfg.orientation is not None:
            img = mt.Orientation(axcodes=cfg.orientation)(img)
            mask = mt.Orientation(axcodes=cfg.orientation)(mask) if mask is not None else None
        if cfg.spacing is not None:
            img = mt.Spacing(pixdim=cfg.spacing, mode="bilinear")(img)
            mask = mt.Spacing(pixdim=cfg.spacing, mode="nearest")(mask) if mask is not None else None
        if cfg.size is not None:
            if cfg.fit == "resize":
                linear = "bilinear" if nd == 2 else "trilinear"
                img = mt.Resize(cfg.size, mode=linear, anti_aliasing=True)(img)
                mask = mt.Resize(cfg.size, mode="nearest")(mask) if mask is not None else None
            else:
                img = mt.ResizeWithPadOrCrop(cfg.size)(img)
                mask = mt.ResizeWithPadOrCrop(cfg.size)(mask) if mask is not None else None
        if cfg.intensity == "minmax":
            img = mt.ScaleIntensity(minv=0.0, maxv=1.0)(img)
        elif cfg.intensity == "zscore":
            img = mt.NormalizeIntensity(channel_wise=True)(img)
        elif cfg.intensity == "window":
            assert cfg.window is not None  # DataConfig requires data.window with intensity 'window'
            lo, hi = cfg.window
            img = mt.ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(img)
    except (RuntimeError, ValueError, IndexError) as err:
        raise DataError(f"{image_path}: preparation failed: {type(err).__name__}: {_first_line(err)}") from None
    x = np.ascontiguousarray(torch.as_tensor(img).numpy(), dtype=np.float32)
    m = None
    if mask is not None:
        m = _mask_to_classes(
            np.asarray(torch.as_tensor(mask).numpy()),
            cfg,
            num_classes or segmentation_classes(cfg),
            mask_path or image_path,
        )
    return Prepared(x, m, raw_shape, raw_channels, spacing, stored_values)


def cut_slabs(array: np.ndarray, slabs: int, path: Path) -> list[np.ndarray]:
    """Split a (C, X, Y, Z) array into ``slabs`` equal parts along Z (the slice axis)."""
    if slabs == 1:
        return [array]
    if array.ndim != 4:
        raise DataError(f"{path}: data.slabs needs 3D volumes, this image is 2D")
    depth = array.shape[-1]
    if depth % slabs:
        raise DataError(f"{path}: its {depth} slices do not divide into data.slabs={slabs}; set data.size")
    return list(np.split(array, slabs, axis=-1))


def grid_patches(images: np.ndarray, masks: np.ndarray, patch_size: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """MONAI ``GridPatch``: non-overlapping patches covering each image (zero-padded at the border)."""
    from monai.transforms import GridPatch  # MONAI: lazy (see top)

    grid = GridPatch(patch_size=patch_size, pad_mode="constant")
    xs, ys = [], []
    for x, y in zip(images, masks, strict=True):
        xs.append(_numpy(grid(torch.from_numpy(x))))
        ys.append(_numpy(grid(torch.from_numpy(y))))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int64)


def balanced_patches(
    images: np.ndarray, masks: np.ndarray, patch_size: tuple[int, ...], *, per_image: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """MONAI ``RandCropByPosNegLabel``: ``per_image`` crops per image, centred on foreground and
    background voxels in equal proportion (only background where an image has no foreground).

    Small lesions fill few grid patches; balanced crops keep them in about half of the training
    patches. Seeded, so every process that loads the data set draws the same patches.
    """
    from monai.transforms import RandCropByPosNegLabel  # MONAI: lazy (see top)

    crop = RandCropByPosNegLabel(spatial_size=patch_size, pos=1.0, neg=1.0, num_samples=per_image, allow_smaller=True)
    crop.set_random_state(seed=seed)
    xs, ys = [], []
    for x, y in zip(images, masks, strict=True):
        fg = torch.from_numpy((y > 0).astype(np.int64))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns when an image has no foreground
            xi = crop(torch.from_numpy(x), label=fg)
            yi = crop(torch.from_numpy(y), label=fg, randomize=False)
        xs += [_numpy(t) for t in xi]
        ys += [_numpy(t) for t in yi]
    shapes = {a.shape[1:] for a in xs}
    if shapes != {tuple(patch_size)}:
        raise DataError(f"data.patch_size: {list(patch_size)} exceeds the prepared images {sorted(shapes)}")
    return np.stack(xs).astype(np.float32), np.stack(ys).astype(np.int64)


def _numpy(t: Any) -> np.ndarray:
    """A MetaTensor or tensor as a plain numpy array (metadata dropped)."""
    return np.asarray(torch.as_tensor(t).detach().cpu().numpy())
