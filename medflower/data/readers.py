"""Reading one medical image file (or DICOM series) and preparing it into a fixed-size array.

All decoding is MONAI's: ``LoadImage`` with ``NibabelReader`` (NIfTI), ``PydicomReader`` (a DICOM
file, or a folder holding one series), ``PILReader`` (PNG/JPEG/BMP/TIFF) or ``NumpyReader``
(``.npy``); preparation is a chain of MONAI transforms (``Orientation``, ``Spacing``, ``Resize`` or
``ResizeWithPadOrCrop``, ``ScaleIntensity``/``NormalizeIntensity``/``ScaleIntensityRange``). What is
written here is only the glue MONAI has no transform for: choosing the reader from the path, the
channel-count adapter (RGB to grey and back), the image-vs-mask grid check and mapping stored mask
values (e.g. 0/255 PNG masks) to class indices.

**One axis convention** (docs/hospital-data.md, "Image axes"): every reader yields the same array
``(C, rows, columns)`` for a 2D image and ``(C, rows, columns, slices)`` for a volume, as numpy and
the MedMNIST ``.npz`` files hold pictures (``image[0, 0]`` is the top-left pixel):

* PNG/JPEG/BMP/TIFF: rows top to bottom, columns left to right (``PILReader(reverse_indexing=False)``;
  MONAI's default reverses them into columns x rows);
* a DICOM file: its pixel raster, ``Rows`` x ``Columns`` (``PydicomReader(swap_ij=False)``; MONAI's
  default swaps them); a multi-frame file: rows x columns x frames;
* ``.npy`` (and ``.npz``): taken as stored, already rows x columns (x slices);
* a volume with a known orientation (NIfTI, a DICOM series with orientation/position tags) is brought by
  MONAI's ``Orientation`` to the axis codes :data:`AXCODES_3D` (``PLS``): rows run anterior to posterior,
  columns from the patient's right to left, slices inferior to superior. These are the rows and columns
  of an axial slice as a radiologist views it, and those of an axial DICOM series as stored, so a DICOM
  series and its NIfTI conversion give the same array. ``data.orientation`` replaces ``PLS`` with other
  axis codes. A 2D NIfTI (two dimensions) is taken as stored, rows x columns.

Masks are read by the same code, so they follow their images.

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

from medflower._preload import require_monai
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
    from pydicom.misc import is_dicom  # here: pydicom's import (0.1 s) only when a file has no known suffix

    if path.is_file() and is_dicom(path):
        return "dicom"
    raise DataError(
        f"{path}: unsupported file type; supported: {', '.join(SUPPORTED)}, or a folder holding one DICOM series"
    )


AXCODES_3D = "PLS"  # volumes: rows anterior->posterior, columns right->left, slices inferior->superior
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # axis codes name directions in RAS space (both readers' affines)
AXES = {2: "rows x columns", 3: "rows x columns x slices"}


def axes_of(ndim: int) -> str:
    """What the spatial axes of a prepared array are: ``rows x columns`` (2D) or ``... x slices`` (3D)."""
    return AXES.get(ndim, f"{ndim} axes")


def describe(shape: tuple[int, ...], *, channels: bool = False) -> str:
    """``20x40 (rows x columns)``, or ``1x20x40 (channels x rows x columns)`` with ``channels``."""
    spatial = len(shape) - (1 if channels else 0)
    axes = ("channels x " if channels else "") + axes_of(spatial)
    return f"{'x'.join(str(int(v)) for v in shape)} ({axes})"


def _dicom_layout(path: Path) -> tuple[int, int]:
    """(samples per pixel, frames) of a DICOM file, or of the first file of a series folder.

    Read from the header only (no pixels), so that the reader can be told where the colour axis is.
    """
    import pydicom  # here: only DICOM needs it

    first = path
    if path.is_dir():
        first = next((p for p in sorted(path.iterdir()) if p.is_file()), path)
    try:
        ds = pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["SamplesPerPixel", "NumberOfFrames"])
        return int(ds.get("SamplesPerPixel") or 1), int(ds.get("NumberOfFrames") or 1)
    except Exception:  # LoadImage reports an unreadable file, naming it
        return 1, 1


def _reader(fmt: str, samples: int = 1) -> Any:
    """The MONAI reader of ``fmt``, set to the rows x columns convention (see the module doc)."""
    require_monai()
    from monai.data import NibabelReader, NumpyReader, PILReader, PydicomReader  # MONAI: lazy (see top)

    if fmt == "nifti":
        return NibabelReader()  # voxel axes as stored; read_image reorients volumes (Orientation)
    if fmt == "dicom":
        # swap_ij=False: pydicom's raster, Rows x Columns (MONAI's default swaps it to Columns x Rows);
        # a colour DICOM's samples are its last axis (without channel_dim they would read as slices)
        return PydicomReader(swap_ij=False, channel_dim=-1 if samples > 1 else None)
    if fmt == "image":
        return PILReader(reverse_indexing=False)  # rows x columns (MONAI's default gives columns x rows)
    return NumpyReader()


def _has_orientation(img: Any, fmt: str, frames: int) -> bool:
    """Whether the file states where its axes point (so that ``Orientation`` can be applied)."""
    if fmt == "nifti":
        return True
    # a DICOM file or series with ImageOrientationPatient (0020,0037); MONAI gives the others (and
    # multi-frame files, whose geometry is per frame) an identity affine that means nothing
    return fmt == "dicom" and frames == 1 and "00200037" in img.meta


def read_image(path: str | Path, *, orientation: str | None = None) -> Any:
    """Read ``path`` as a channel-first MONAI ``MetaTensor`` (float32, affine attached) in the axis
    convention of the module doc: ``(C, rows, columns)`` or ``(C, rows, columns, slices)``.

    A volume with a known orientation is brought to ``orientation`` (default :data:`AXCODES_3D`).
    Raises :class:`DataError` naming the file when it is missing, empty, truncated or not readable
    by the reader its type selects.
    """
    require_monai()
    from monai.transforms import LoadImage, Orientation  # MONAI: lazy (see top)

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    fmt = file_format(path)
    if path.is_dir() and not any(p.is_file() for p in path.iterdir()):
        raise DataError(f"{path}: empty folder (expected the files of one DICOM series)")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    samples, frames = _dicom_layout(path) if fmt == "dicom" else (1, 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom/nibabel warnings may quote header values
            img = LoadImage(reader=_reader(fmt, samples), image_only=True, ensure_channel_first=True, dtype=np.float32)(
                str(path)
            )
    except Exception as err:
        detail = type(err).__name__ if fmt == "dicom" else f"{type(err).__name__}: {_first_line(err)}"
        raise DataError(f"{path}: cannot read as {fmt}: {detail}") from None
    if img.ndim not in (3, 4):
        raise DataError(f"{path}: has {img.ndim - 1} spatial dimensions after reading; expected 2D or 3D")
    if not torch.isfinite(img).all():
        raise DataError(f"{path}: holds NaN or infinite values")
    if fmt == "dicom" and frames > 1 and path.is_file() and img.ndim == 4:
        # A multi-frame file reads frames first, (C, frames, rows, columns). MONAI has no option to stack
        # frames last as it does a series' slices, hence this move of an axis: rows x columns x frames.
        # MONAI does not read a multi-frame file's (per-frame) geometry, so no affine is disturbed: it
        # is set to the identity (1 mm per axis, no orientation), as MONAI gives files without geometry.
        img = img.movedim(1, -1)
        img.affine = torch.eye(4, dtype=torch.float64)
    if orientation is not None and (img.ndim != 4 or len(orientation) != 3):
        raise DataError(
            f"{path}: is {img.ndim - 1}D but data.orientation {orientation!r} applies to volumes (3 axis "
            "codes); 2D images are read as rows x columns"
        )
    if img.ndim == 4 and _has_orientation(img, fmt, frames):
        try:
            img = Orientation(axcodes=orientation or AXCODES_3D, labels=RAS_LABELS)(img)
        except (RuntimeError, ValueError) as err:
            raise DataError(f"{path}: cannot reorient to {orientation or AXCODES_3D}: {_first_line(err)}") from None
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
        got, want = describe(tuple(mask.shape[1:])), describe(tuple(image.shape[1:]))
        return f"mask shape {got} differs from image shape {want}"
    a, b = np.asarray(image.affine, dtype=np.float64), np.asarray(mask.affine, dtype=np.float64)
    if a.shape != b.shape or not np.allclose(a, b, atol=GRID_ATOL_MM):
        return (
            f"mask affine differs from image affine (spacing {spacing_of(mask)} vs {spacing_of(image)}; "
            "origin or orientation may differ)"
        )
    return None


@dataclass
class Prepared:
    image: np.ndarray  # float32 (C, rows, columns[, slices])
    mask: np.ndarray | None  # int64 (1, rows, columns[, slices]) class indices
    raw_shape: tuple[int, ...]  # spatial shape as read: rows x columns (x slices), before resampling
    raw_channels: int
    spacing: tuple[float, ...]  # as read (mm per row, column, slice), before resampling
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
        require_monai()
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
    require_monai()
    from monai import transforms as mt  # MONAI: lazy (see top)

    # image and mask come in the axis convention (module doc), so the grid check below compares a
    # DICOM series with its NIfTI mask once both are reoriented
    img = read_image(image_path, orientation=cfg.orientation)
    raw_shape, raw_channels, spacing = tuple(img.shape[1:]), int(img.shape[0]), spacing_of(img)
    mask = None
    if mask_path is not None:
        mask = read_image(mask_path, orientation=cfg.orientation)
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
            raise DataError(f"{image_path}: is {nd}D {describe(raw_shape)} but data.{key} has {len(value)} values")
    img = _adapt_channels(img, cfg.channels, image_path)
    stored_values: tuple[int, ...] = ()
    if mask is not None:
        stored_values = tuple(int(v) for v in torch.unique(mask).tolist()[:256])
    try:
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
    """Split a (C, rows, columns, slices) array into ``slabs`` equal parts along the slice axis."""
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
    require_monai()
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
    require_monai()
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
