"""One axis convention for every reader: the same picture, written in every format medflower reads, is
prepared into the same array, ``(C, rows, columns)`` in 2D and ``(C, rows, columns, slices)`` in 3D.

The picture is asymmetric and not square (20 rows x 40 columns, a bright block in the top-left corner,
a gradient along rows, columns and slices), so any transpose or flip changes the array. Files are
written here from one numpy array; DICOM files carry orientation and position tags like an axial CT,
and NIfTI volumes carry the matching affine, stored in two voxel orders (as the array is, and as a
DICOM-to-NIfTI converter stores it). The shared real data checks a brain MR volume and its mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from medflower.config.data import DataConfig
from medflower.data.base import DataError, ModelInputError
from medflower.data.medmnist import load_medmnist
from medflower.data.readers import AXCODES_3D, prepare, read_image

ROWS, COLS, SLICES = 20, 40, 6
DR, DC, DS = 0.8, 0.5, 2.5  # mm between rows, between columns, between slices
ORIGIN = (10.0, 20.0, -30.0)  # RAS position of the first row's first column of the first slice
# the whole intensity range of the pictures (<= 255, so that 8-bit formats hold it) maps to [0, 1]
CFG = DataConfig(kind="folders", path="x", intensity="window", window=(0.0, 255.0))


def _picture() -> np.ndarray:
    r, c = np.mgrid[0:ROWS, 0:COLS]
    img = (r * 3 + c * 2).astype(np.uint8)  # 0 .. 135: rises down the rows and along the columns
    img[:5, :8] = 250  # bright top-left block
    return img


def _volume() -> np.ndarray:
    r, c, s = np.mgrid[0:ROWS, 0:COLS, 0:SLICES]
    vol = (r * 3 + c * 2 + s * 15).astype(np.uint16)  # 0 .. 210
    vol[:5, :8, :2] = 250  # bright block in the top-left corner of the two lowest slices
    return vol


PICTURE, VOLUME = _picture(), _volume()


def test_the_pictures_are_asymmetric() -> None:
    for a in (PICTURE, VOLUME):
        assert not np.array_equal(a, a[::-1]) and not np.array_equal(a, a[:, ::-1])
        assert a.shape[0] != a.shape[1]  # a transpose changes the shape
    assert not np.array_equal(VOLUME, VOLUME[..., ::-1])


# ---------------------------------------------------------------------------------------------- writers
def _pls_affine() -> np.ndarray:
    """RAS affine of a (rows, columns, slices) array of an axial slice stack: rows run towards
    posterior (-y), columns towards the patient's left (-x), slices towards superior (+z)."""
    x, y, z = ORIGIN
    return np.array([[0, -DC, 0, x], [-DR, 0, 0, y], [0, 0, DS, z], [0, 0, 0, 1]], dtype=np.float64)


def _write_nifti(path: Path, vol: np.ndarray, layout: str) -> Path:
    """``pls``: the array as it is; ``las``: as a DICOM-to-NIfTI converter stores it (first voxel axis
    along the columns, second along the rows reversed, so that the axes point left, anterior, superior)."""
    import nibabel as nib

    if layout == "pls":
        data, affine = vol, _pls_affine()
    else:
        x, y, z = ORIGIN
        data = np.ascontiguousarray(vol.transpose(1, 0, 2)[:, ::-1, :])
        affine = np.array(
            [[-DC, 0, 0, x], [0, DR, 0, y - DR * (vol.shape[0] - 1)], [0, 0, DS, z], [0, 0, 0, 1]], dtype=np.float64
        )
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _dicom_dataset(pixels: np.ndarray, *, rgb: bool = False, frames: int = 1, geometry: bool = True):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage if (rgb or frames > 1) else CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT" if rgb else "CT"
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if rgb else pixels.shape[-2:]
    if rgb:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = np.ascontiguousarray(pixels.astype(np.uint8)).tobytes()
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = np.ascontiguousarray(pixels.astype(np.uint16)).tobytes()
    if frames > 1:
        ds.NumberOfFrames = frames
    if geometry:
        ds.PixelSpacing = [DR, DC]  # between rows, between columns
        ds.SliceThickness = DS
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]  # axial: along a row -> left, down a column -> posterior
        ds.ImagePositionPatient = [-ORIGIN[0], -ORIGIN[1], ORIGIN[2]]  # LPS
    ds.InstanceNumber = 1
    return ds


def _write_dicom(path: Path, pixels: np.ndarray, **kw) -> Path:
    _dicom_dataset(pixels, **kw).save_as(path, enforce_file_format=True)
    return path


def _write_series(folder: Path, vol: np.ndarray, *, descending: bool = False) -> Path:
    """One file per slice, file names shuffled; ``descending``: instance 1 is the top slice (as many
    CT exports number them), so the reader stacks them downwards and Orientation turns them back."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True)
    series, study = generate_uid(), generate_uid()
    n = vol.shape[-1]
    for k in range(n):
        ds = _dicom_dataset(vol[:, :, k])
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series, study
        ds.ImagePositionPatient = [-ORIGIN[0], -ORIGIN[1], ORIGIN[2] + k * DS]
        ds.InstanceNumber = n - k if descending else k + 1
        ds.save_as(folder / f"IM{(k * 5) % n:04d}", enforce_file_format=True)  # names say nothing of the order
    return folder


def _write_pil(path: Path, pixels: np.ndarray, **save) -> Path:
    from PIL import Image

    Image.fromarray(pixels).save(path, **save)
    return path


def _write_npz(path: Path, images: np.ndarray) -> Path:
    """A MedMNIST-style file whose three splits all hold ``images`` (labels 0, 1, 0, ...)."""
    labels = (np.arange(len(images)) % 2).reshape(-1, 1)
    np.savez(
        path, **{f"{s}_{k}": v for s in ("train", "val", "test") for k, v in (("images", images), ("labels", labels))}
    )
    return path


def _prepared(path: Path, cfg: DataConfig = CFG, mask: Path | None = None):
    return prepare(path, mask, cfg, num_classes=2)


# ----------------------------------------------------------------------------------------------- 2D
def _all_2d(tmp_path: Path) -> dict[str, np.ndarray]:
    """The picture written in every format, prepared; 1-slice volumes give their only slice."""
    pic = PICTURE
    files = {
        "png": _write_pil(tmp_path / "a.png", pic),
        "bmp": _write_pil(tmp_path / "a.bmp", pic),
        "tiff": _write_pil(tmp_path / "a.tif", pic),
        "tiff-16bit": _write_pil(tmp_path / "a16.tiff", pic.astype(np.uint16)),
        "npy": tmp_path / "a.npy",
        "dicom": _write_dicom(tmp_path / "a.dcm", pic),
        "dicom-no-geometry": _write_dicom(tmp_path / "b.dcm", pic, geometry=False),
        "nifti-1-slice": _write_nifti(tmp_path / "a.nii.gz", pic[..., None], "pls"),
        "nifti-1-slice-converter": _write_nifti(tmp_path / "b.nii.gz", pic[..., None], "las"),
        "dicom-series-1-slice": _write_series(tmp_path / "series1", pic[..., None]),
    }
    np.save(files["npy"], pic)
    import nibabel as nib

    nib.save(nib.Nifti1Image(pic, np.eye(4)), tmp_path / "two.nii.gz")  # a 2D NIfTI: taken as stored
    files["nifti-2d"] = tmp_path / "two.nii.gz"
    out = {}
    for name, path in files.items():
        prep = _prepared(path)
        out[name] = prep.image[..., 0] if prep.image.ndim == 4 else prep.image
        assert prep.raw_shape[:2] == (ROWS, COLS), f"{name}: read as {prep.raw_shape}"
    return out


def test_2d_every_format_prepares_the_same_array(tmp_path: Path) -> None:
    want = PICTURE[None].astype(np.float32) / 255.0
    got = _all_2d(tmp_path)
    for name, arr in got.items():
        assert arr.shape == (1, ROWS, COLS), f"{name}: {arr.shape}"
        np.testing.assert_allclose(arr, want, atol=1e-6, err_msg=name)
    assert np.all(got["png"][0, :5, :8] > 0.95) and got["png"][0, -1, -1] < 0.6  # the block is top-left


def test_2d_jpeg_agrees_up_to_its_compression(tmp_path: Path) -> None:
    want = PICTURE[None].astype(np.float32) / 255.0
    arr = _prepared(_write_pil(tmp_path / "a.jpg", PICTURE, quality=95)).image
    assert arr.shape == (1, ROWS, COLS)
    assert np.abs(arr - want).mean() < 0.01 and np.abs(arr - want).max() < 0.08
    assert np.abs(arr - want[:, ::-1]).mean() > 0.05 and np.abs(arr - want[:, :, ::-1]).mean() > 0.05  # not flipped


def test_2d_medmnist_npz_is_rows_by_columns_like_the_files(tmp_path: Path) -> None:
    p = tmp_path / "m.npz"
    _write_npz(p, np.stack([PICTURE] * 2))
    ds = load_medmnist(p)
    assert ds.img_size == (ROWS, COLS)
    png = _prepared(_write_pil(tmp_path / "a.png", PICTURE)).image
    np.testing.assert_allclose(ds.train.images[0] * 0.5 + 0.5, png, atol=1e-6)  # .npz is scaled to [-1, 1]


def test_2d_rgb_png_dicom_and_npz_agree(tmp_path: Path) -> None:
    rgb = np.stack([PICTURE, PICTURE[:, ::-1], np.full_like(PICTURE, 60)], axis=-1)  # (rows, columns, 3)
    want = np.moveaxis(rgb, -1, 0).astype(np.float32) / 255.0
    png = _prepared(_write_pil(tmp_path / "c.png", rgb)).image
    dcm = _prepared(_write_dicom(tmp_path / "c.dcm", rgb, rgb=True)).image
    np.testing.assert_allclose(png, want, atol=1e-6)
    np.testing.assert_allclose(dcm, want, atol=1e-6)
    p = tmp_path / "c.npz"
    _write_npz(p, rgb[None])
    np.testing.assert_allclose(load_medmnist(p).train.images[0] * 0.5 + 0.5, want, atol=1e-6)


def test_2d_size_is_rows_then_columns_and_masks_follow(tmp_path: Path) -> None:
    """``data.size`` is [rows, columns]; a mask is read and resized with its image."""
    cfg = DataConfig(kind="folders", path="x", intensity="window", window=(0.0, 255.0), size=(10, 20))
    mask = (PICTURE == 250).astype(np.uint8)
    png = _prepared(_write_pil(tmp_path / "a.png", PICTURE), cfg, _write_pil(tmp_path / "m.png", mask))
    dcm = _prepared(_write_dicom(tmp_path / "a.dcm", PICTURE), cfg)
    assert png.image.shape == dcm.image.shape == (1, 10, 20)
    np.testing.assert_allclose(png.image, dcm.image, atol=1e-6)
    assert png.image[0, :2, :4].mean() > 0.85 and png.image[0, 5:, 10:].max() < 0.7  # the block stays top-left
    assert png.mask is not None and png.mask.shape == (1, 10, 20)
    np.testing.assert_array_equal(png.mask[0], mask[::2, ::2])  # nearest neighbour: every second row and column


# ----------------------------------------------------------------------------------------------- 3D
def test_3d_every_format_prepares_the_same_volume(tmp_path: Path) -> None:
    np.save(tmp_path / "v.npy", VOLUME)
    files = {
        "npy": tmp_path / "v.npy",
        "nifti": _write_nifti(tmp_path / "v.nii.gz", VOLUME, "pls"),
        "nifti-converter": _write_nifti(tmp_path / "w.nii.gz", VOLUME, "las"),
        "dicom-series": _write_series(tmp_path / "asc", VOLUME),
        "dicom-series-numbered-downwards": _write_series(tmp_path / "desc", VOLUME, descending=True),
        # a multi-frame file (frames in order, no per-frame geometry): its frames are the slices
        "dicom-multi-frame": _write_dicom(
            tmp_path / "mf.dcm", np.moveaxis(VOLUME, -1, 0), frames=SLICES, geometry=False
        ),
    }
    want = VOLUME[None].astype(np.float32) / 255.0
    for name, path in files.items():
        prep = _prepared(path)
        assert prep.raw_shape == (ROWS, COLS, SLICES), f"{name}: read as {prep.raw_shape}"
        np.testing.assert_allclose(prep.image, want, atol=1e-6, err_msg=name)
        if name.startswith(("nifti", "dicom-series")):
            assert prep.spacing == (DR, DC, DS), f"{name}: spacing {prep.spacing}"
    p = tmp_path / "v.npz"  # MedMNIST 3D stores (N, slices, rows, columns)
    _write_npz(p, np.moveaxis(VOLUME.astype(np.uint8), -1, 0)[None])
    ds = load_medmnist(p)
    assert ds.img_size == (ROWS, COLS, SLICES)
    np.testing.assert_allclose(ds.train.images[0] * 0.5 + 0.5, want, atol=1e-6)


def test_3d_dicom_series_with_a_converted_nifti_mask_stays_aligned(tmp_path: Path) -> None:
    """A mask in another format than its image is on the image's grid once both follow the convention."""
    image = _write_series(tmp_path / "series", VOLUME, descending=True)
    mask = _write_nifti(tmp_path / "mask.nii.gz", (VOLUME == 250).astype(np.uint8), "las")
    prep = _prepared(image, DataConfig(kind="folders", path="x", intensity="none"), mask)
    assert prep.mask is not None and prep.mask.shape == (1, ROWS, COLS, SLICES)
    np.testing.assert_array_equal(prep.mask[0], (VOLUME == 250).astype(np.int64))
    assert np.all(prep.image[0][prep.mask[0] == 1] == 250)


def test_3d_read_volumes_point_the_stated_way(tmp_path: Path) -> None:
    import nibabel as nib

    for path in (_write_nifti(tmp_path / "w.nii.gz", VOLUME, "las"), _write_series(tmp_path / "s", VOLUME)):
        img = read_image(path)
        assert "".join(nib.aff2axcodes(np.asarray(img.affine))) == AXCODES_3D == "PLS"
    ras = read_image(tmp_path / "w.nii.gz", orientation="RAS")  # data.orientation replaces the default
    assert "".join(nib.aff2axcodes(np.asarray(ras.affine))) == "RAS" and tuple(ras.shape[1:]) == (COLS, ROWS, SLICES)
    with pytest.raises(DataError, match="data.orientation 'RAS' applies to volumes"):
        read_image(_write_pil(tmp_path / "a.png", PICTURE), orientation="RAS")


# -------------------------------------------------------------------------------------- real shared data
def test_real_brain_mr_and_its_mask_stay_aligned(shared_data: Path) -> None:
    """A real NIfTI volume (stored L, A, S) and its tumour mask: both come out as the stored voxels
    reoriented to PLS by nibabel's own orientation tools, and the tumour covers the same voxels."""
    import nibabel as nib
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    brain = shared_data / "segmentation" / "brain_mr_tumour"
    image, mask = brain / "brain1_image.nii.gz", brain / "brain1_label.nii.gz"
    prep = _prepared(image, DataConfig(kind="folders", path="x", intensity="none"), mask)
    stored = nib.load(image)
    to_pls = ornt_transform(io_orientation(stored.affine), axcodes2ornt(tuple(AXCODES_3D)))
    want_img = apply_orientation(np.asarray(stored.dataobj, dtype=np.float32), to_pls)
    want_mask = apply_orientation(np.asarray(nib.load(mask).dataobj), to_pls)
    np.testing.assert_array_equal(prep.image[0], want_img)
    assert prep.mask is not None
    np.testing.assert_array_equal(prep.mask[0], want_mask.astype(np.int64))
    raw_img, raw_mask = np.asarray(stored.dataobj, dtype=np.float64), np.asarray(nib.load(mask).dataobj) > 0
    assert prep.mask.sum() == raw_mask.sum() > 0
    assert prep.image[0][prep.mask[0] > 0].mean() == pytest.approx(raw_img[raw_mask].mean())


def test_real_dicom_and_png_are_their_pixel_rasters(shared_data: Path) -> None:
    """Row 0 of the prepared array is the file's first row of pixels, for a real DICOM and a real PNG."""
    import pydicom
    from PIL import Image

    ct = shared_data / "dicom" / "CT_small.dcm"
    ds = pydicom.dcmread(ct)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(_prepared(ct, DataConfig(kind="folders", path="x", intensity="none")).image[0], hu)
    png = shared_data / "segmentation" / "isbi2012_em_membrane" / "image" / "0.png"
    pixels = np.asarray(Image.open(png), dtype=np.float32)
    prep = _prepared(png, DataConfig(kind="folders", path="x", intensity="none"))
    np.testing.assert_array_equal(prep.image[0], pixels)


# ------------------------------------------------------------------------------------------- bad input
def _site_of(tmp_path: Path, name: str, pixels: np.ndarray, n: int = 6) -> Path:
    root = tmp_path / name
    (root / "images").mkdir(parents=True)
    rows = ["image,label"]
    for i in range(n):
        _write_pil(root / "images" / f"img_{i:03d}.png", np.clip(pixels.astype(int) + 3 * i, 0, 255).astype(np.uint8))
        rows.append(f"images/img_{i:03d}.png,{i % 2}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    site = {"name": name, "task": "classification", "data": {"kind": "manifest", "path": "manifest.csv"}}
    (root / "site.yaml").write_text(yaml.safe_dump(site))
    return root / "site.yaml"


def _experiment(**model):
    from medflower.config import ExperimentConfig

    return ExperimentConfig.from_dict(
        {
            "task": "classification",
            "data": {"kind": "synthetic", "synthetic_samples": 60, "synthetic_size": 16},
            "model": {"name": "cnn", **model},
        }
    )


@pytest.mark.parametrize(
    "model, want",
    [
        ({"in_channels": 1, "img_size": [COLS, ROWS]}, "1x40x20 (channels x rows x columns)"),  # transposed
        ({"in_channels": 3, "img_size": [ROWS, COLS]}, "3x20x40 (channels x rows x columns)"),  # colour model
        ({}, "1x16x16 (channels x rows x columns)"),  # sized by the experiment's data (16x16 synthetic)
    ],
)
def test_a_site_whose_images_do_not_fit_the_model_is_refused_naming_both_shapes(
    tmp_path: Path, model: dict, want: str
) -> None:
    from medflower.client.site import load_site_data

    site = _site_of(tmp_path, "st-wide", PICTURE)
    with pytest.raises(ModelInputError) as info:
        load_site_data(site, _experiment(**model))
    text = str(info.value)
    assert text.startswith("site 'st-wide': its prepared images are 1x20x40 (channels x rows x columns)"), text
    assert f"expects {want}" in text
    assert "img_000.png reads as 20x40 (rows x columns), 1 channel(s)" in text and "data.size" in text


def test_a_site_whose_images_fit_the_model_loads(tmp_path: Path) -> None:
    from medflower.client.site import load_site_data

    data = load_site_data(_site_of(tmp_path, "st-fits", PICTURE), _experiment(in_channels=1, img_size=[ROWS, COLS]))
    assert data.name == "st-fits" and data.train.images.shape[1:] == (1, ROWS, COLS)


def test_the_hospital_node_refuses_before_training(tmp_path: Path, flower_identity, caplog, monkeypatch) -> None:
    """Through the hospital's ClientApp: a config-error reply (nothing trained, no weights), and the
    site's own log names the site and both shapes."""
    from sitekit import message, node

    from medflower.client import app as app_module
    from medflower.client.app import app as hospital_app

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(app_module, "train_epochs", no_training)
    exp = _experiment()  # the model is sized by the experiment's 16x16 data
    reply = hospital_app(message(exp, "train"), node(_site_of(tmp_path, "st-wide", PICTURE)))
    assert reply.has_error() and reply.error.reason.startswith("config-error: ")
    logged = " ".join(r.getMessage() for r in caplog.records if r.name == "medflower.site")
    assert "site 'st-wide'" in logged and "1x20x40" in logged and "1x16x16" in logged


def test_segmentation_patches_are_checked_against_the_model(tmp_path: Path) -> None:
    """Trained on ``data.patch_size`` patches, a segmentation model takes patches: those are compared."""
    from medflower.data.manifest import load_file_dataset

    root = tmp_path / "seg"
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
    for i in range(3):
        _write_pil(root / "images" / f"{i}.png", PICTURE)
        _write_pil(root / "labels" / f"{i}.png", (PICTURE == 250).astype(np.uint8))
    cfg = DataConfig(kind="folders", path="x", patch_size=(8, 8), val_fraction=0.0, test_fraction=0.0)
    with pytest.raises(
        ModelInputError, match=r"prepared training patches are 1x8x8 .* expects 1x16x16 .*patch_size: \[16, 16\]"
    ):
        load_file_dataset(
            cfg, path=root, task="segmentation", seed=0, name="seg", expect_channels=1, expect_size=(16, 16)
        )
    ds = load_file_dataset(
        cfg, path=root, task="segmentation", seed=0, name="seg", expect_channels=1, expect_size=(8, 8)
    )
    assert ds.img_size == (8, 8) and ds.train.images.shape[1:] == (1, 8, 8)
