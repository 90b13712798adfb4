"""``medflower site check`` and the site YAML, on the real shared NIfTI, DICOM and PNG files.

Broken inputs (a truncated NIfTI, a mask on another grid, a missing file) are made in tmp_path from
the real files.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import yaml

from medflower.cli import main as cli_main
from medflower.client.site import load_site_config, run_check
from medflower.config import ConfigError, ExperimentConfig

NIFTI = "nifti"
ISBI = "segmentation/isbi2012_em_membrane"


def _site(tmp_path: Path, task: str, data: dict, name: str = "test-hospital") -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump({"name": name, "task": task, "data": data}))
    return path


def _manifest(tmp_path: Path, header: list[str], rows: list[list[str]]) -> str:
    (tmp_path / "manifest.csv").write_text("\n".join(",".join(map(str, r)) for r in [header, *rows]) + "\n")
    return "manifest.csv"


def _check(site: Path) -> tuple[int, str]:
    out = io.StringIO()
    rc = run_check(site, out=out)
    return rc, out.getvalue()


def _nifti_site(tmp_path: Path, image: Path, mask: Path) -> Path:
    return _site(
        tmp_path, "segmentation", {"kind": "manifest", "path": _manifest(tmp_path, ["image", "label"], [[image, mask]])}
    )


def test_nifti_image_and_mask_pass(shared_data: Path, tmp_path: Path) -> None:
    rc, out = _check(
        _nifti_site(
            tmp_path, shared_data / NIFTI / "anatomical.nii", shared_data / NIFTI / "monai_anatomical_label.nii.gz"
        )
    )
    assert rc == 0, out
    assert "readable: 1/1" in out and "2.0x2.0x2.0" in out and "site check OK" in out
    # stored 33x41x25 LAS; reoriented to PLS its anterior-posterior axis (41) is the rows
    assert "axes: rows x columns x slices" in out and "volumes reoriented to PLS" in out
    assert "shapes as read (rows x columns x slices): 41x33x25" in out
    assert "prepared (channels x rows x columns x slices): 1x41x33x25" in out


def test_png_folder_pair_passes_with_label_balance(shared_data: Path, tmp_path: Path) -> None:
    site = _site(
        tmp_path,
        "segmentation",
        {
            "kind": "folders",
            "path": str(shared_data / ISBI),
            "image_dir": "image",
            "label_dir": "label",
            "mask_values": [0, 255],
        },
    )
    rc, out = _check(site)
    assert rc == 0, out
    assert "readable: 30/30" in out and "stored mask values: [0, 255]" in out
    assert "axes: rows x columns (row 0 at the top)" in out and "shapes as read (rows x columns): 512x512 (x30)" in out
    assert "class 1: 78." in out  # the white (cell) pixels of the ISBI masks


def _dicom_identifiers(paths: list[Path]) -> set[str]:
    """Identifying header values of the files (to prove none is printed)."""
    import pydicom

    values = set()
    for p in paths:
        files = sorted(p.iterdir()) if p.is_dir() else [p]
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            for tag in (
                "PatientName",
                "PatientID",
                "PatientBirthDate",
                "StudyDate",
                "SeriesDate",
                "AcquisitionDate",
                "InstitutionName",
                "ReferringPhysicianName",
                "AccessionNumber",
            ):
                v = str(ds.get(tag, "") or "").strip()
                if len(v) >= 3:
                    values.add(v)
    return values


@pytest.mark.parametrize("files", [["CT_small.dcm", "MR_small.dcm"], ["monai_CT_DICOM"], ["emri_small.dcm"]])
def test_dicom_files_and_series_pass_and_no_identifier_is_printed(
    shared_data: Path, tmp_path: Path, files: list[str]
) -> None:
    paths = [shared_data / "dicom" / f for f in files]
    rows = [[p, k % 2, f"pseudo-{k}"] for k, p in enumerate(paths)]
    site = _site(
        tmp_path,
        "classification",
        {"kind": "manifest", "path": _manifest(tmp_path, ["image", "label", "patient_id"], rows)},
    )
    rc, out = _check(site)
    assert rc == 0, out
    assert f"readable: {len(files)}/{len(files)}" in out and "dicom" in out
    if files == ["monai_CT_DICOM"]:
        assert "16x16x4" in out  # the 4-slice series read as one volume
    if files == ["emri_small.dcm"]:
        assert "(rows x columns x slices): 64x64x10" in out  # a multi-frame file: its frames are the slices
    identifiers = _dicom_identifiers(paths)
    assert identifiers, "the test files should carry identifying tags to look for"
    leaked = [v for v in identifiers if v in out]
    assert not leaked, f"site check printed DICOM header values: {leaked}"
    assert "pseudo-" not in out  # manifest patient IDs are not printed either


def test_truncated_nifti_fails_naming_the_file(shared_data: Path, tmp_path: Path) -> None:
    src = (shared_data / NIFTI / "anatomical.nii").read_bytes()
    broken = tmp_path / "truncated.nii"
    broken.write_bytes(src[: len(src) // 2])
    rc, out = _check(_nifti_site(tmp_path, broken, shared_data / NIFTI / "monai_anatomical_label.nii.gz"))
    assert rc == 1
    assert "truncated.nii" in out and "ERROR" in out and "site check FAILED" in out


def test_mask_on_another_grid_fails_naming_the_mask(shared_data: Path, tmp_path: Path) -> None:
    import nibabel as nib
    import numpy as np

    label = nib.load(shared_data / NIFTI / "monai_anatomical_label.nii.gz")
    data = np.asarray(label.dataobj)
    shifted = tmp_path / "shifted_label.nii.gz"  # same voxels, origin moved 10 mm
    aff = label.affine.copy()
    aff[0, 3] += 10.0
    nib.save(nib.Nifti1Image(data, aff), shifted)
    cropped = tmp_path / "cropped_label.nii.gz"  # one slice short
    nib.save(nib.Nifti1Image(data[..., :-1], label.affine), cropped)
    for mask, why in ((shifted, "affine"), (cropped, "shape")):
        rc, out = _check(_nifti_site(tmp_path, shared_data / NIFTI / "anatomical.nii", mask))
        assert rc == 1, out
        assert f"{mask.name}: not on the grid" in out and why in out


def test_missing_file_fails_naming_it(shared_data: Path, tmp_path: Path) -> None:
    rows = [
        [shared_data / ISBI / "image" / "0.png", shared_data / ISBI / "label" / "0.png"],
        [tmp_path / "gone.png", shared_data / ISBI / "label" / "1.png"],
    ]
    site = _site(
        tmp_path,
        "segmentation",
        {"kind": "manifest", "mask_values": [0, 255], "path": _manifest(tmp_path, ["image", "label"], rows)},
    )
    rc, out = _check(site)
    assert rc == 1
    assert "manifest.csv row 3" in out and "gone.png: file not found" in out and "readable: 1/2" in out


def test_patient_in_two_explicit_splits_fails_without_its_id(shared_data: Path, tmp_path: Path) -> None:
    img = shared_data / ISBI
    rows = [
        [img / "image" / f"{i}.png", img / "label" / f"{i}.png", "DOE^JANE", s] for i, s in enumerate(["train", "test"])
    ]
    site = _site(
        tmp_path,
        "segmentation",
        {
            "kind": "manifest",
            "mask_values": [0, 255],
            "path": _manifest(tmp_path, ["image", "label", "patient_id", "split"], rows),
        },
    )
    rc, out = _check(site)
    assert rc == 1 and "more than one split" in out and "row 2 (train)" in out and "row 3 (test)" in out
    assert "DOE" not in out


def test_cli_site_check_exit_codes(shared_data: Path, tmp_path: Path, capsys) -> None:
    good = _nifti_site(
        tmp_path, shared_data / NIFTI / "anatomical.nii", shared_data / NIFTI / "monai_anatomical_label.nii.gz"
    )
    assert cli_main(["site", "check", str(good)]) == 0
    assert cli_main(["site", "check", str(tmp_path / "nope.yaml")]) == 2
    assert "site file not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"name": "Dr Smith's PC", "task": "classification", "data": {"kind": "manifest", "path": "m.csv"}}, "name:"),
        ({"name": "a", "task": "classification", "data": {"kind": "synthetic"}}, "data.kind: a site reads its own"),
        ({"name": "a", "data": {"kind": "manifest", "path": "m.csv"}}, "task: required"),
        ({"name": "a", "task": "detection", "data": {"kind": "manifest", "path": "m.csv"}}, "task: invalid value"),
    ],
)
def test_site_yaml_errors_name_the_file_and_key(tmp_path: Path, raw: dict, match: str) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=f"site.yaml: .*{match}"):
        load_site_config(path)


def test_site_inherits_preparation_from_the_experiment_and_keeps_its_own(tmp_path: Path) -> None:
    site = _site(
        tmp_path,
        "segmentation",
        {"kind": "folders", "path": "data", "image_dir": "img", "val_fraction": 0.3, "mask_values": [0, 1]},
    )
    exp = ExperimentConfig.from_dict(
        {
            "task": "segmentation",
            "data": {
                "kind": "synthetic",
                "size": [64, 64],
                "intensity": "window",
                "window": [0, 255],
                "mask_values": [0, 255],
                "val_fraction": 0.05,
            },
        }
    )
    cfg = load_site_config(site, exp)
    assert cfg.data.size == (64, 64) and cfg.data.window == (0.0, 255.0)  # from the experiment
    assert cfg.data.mask_values == (0, 1) and cfg.data.val_fraction == 0.3  # the site's own
    assert cfg.data_path() == tmp_path / "data"
    with pytest.raises(ConfigError, match="task is 'segmentation' but the experiment"):
        load_site_config(site, ExperimentConfig.from_dict({"task": "classification"}))


def test_deployed_client_trains_on_its_site_yaml(shared_data: Path, tmp_path: Path, flower_identity) -> None:
    """The ClientApp with ``site-config`` (deployment) reads the hospital's files, not a simulated partition."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from medflower import keys
    from medflower.client.app import app as hospital_app
    from medflower.modelspec import build_experiment_model

    root = tmp_path / "hospital"
    for sub in ("image", "label"):
        (root / sub).mkdir(parents=True)
        for i in range(6):
            shutil.copy(shared_data / ISBI / sub / f"{i}.png", root / sub / f"{i}.png")
    site = _site(
        tmp_path,
        "segmentation",
        {
            "kind": "folders",
            "path": "hospital",
            "image_dir": "image",
            "label_dir": "label",
            "val_fraction": 0.2,
            "test_fraction": 0.2,
        },
        name="st-elsewhere",
    )
    exp = ExperimentConfig.from_dict(
        {
            "task": "segmentation",
            "data": {
                "kind": "synthetic",
                "size": [32, 32],
                "intensity": "window",
                "window": [0, 255],
                "mask_values": [255, 0],
            },
            "model": {"name": "unet", "in_channels": 1, "out_channels": 2, "img_size": [32, 32]},
            "train": {"batch_size": 2},
        }
    )
    model = build_experiment_model(exp)
    ctx = Context(
        run_id=1, node_id=1, node_config={keys.NODE_SITE_CONFIG: str(site)}, state=RecordDict(), run_config={}
    )
    cfg = ConfigRecord({keys.EXPERIMENT: exp.to_json(), keys.SERVER_ROUND: 1})
    msg = Message(
        content=RecordDict({keys.ARRAYS: ArrayRecord(model.state_dict()), keys.CONFIG: cfg}),
        dst_node_id=1,
        message_type="train",
    )
    reply = hospital_app(msg, ctx)
    assert reply.content[keys.SITE][keys.SITE_NAME] == "st-elsewhere"
    assert reply.content[keys.METRICS][keys.NUM_EXAMPLES] == 4  # 6 images: 1 val, 1 test, 4 train
    cfg_ev = ConfigRecord({keys.EXPERIMENT: exp.to_json(), keys.SERVER_ROUND: 1, keys.EVAL_SPLIT: "test"})
    ev = hospital_app(
        Message(
            content=RecordDict({keys.ARRAYS: reply.content[keys.ARRAYS], keys.CONFIG: cfg_ev}),
            dst_node_id=1,
            message_type="evaluate",
        ),
        ctx,
    )
    m = ev.content[keys.METRICS]
    assert 0.0 <= m["test-dice"] <= 1.0 and m["test-hd95"] >= 0.0
