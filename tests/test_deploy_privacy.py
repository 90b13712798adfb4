"""What a hospital node sends: model arrays and scalar metrics only (plus its public site name).

The hospital's data here are real DICOM files whose tags and paths carry identifying strings
(patient name, MRN, institution, a patient-named folder), named by the hospital's site YAML. The
hospital ClientApp (``medflower.client.app:app``) is called as Flower calls it, and every record of
every reply is inspected: record names, keys, types, shapes and sizes, and the serialized bytes are
searched for the identifiers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from medflower import keys
from medflower.client.app import app as hospital_app
from medflower.config import ExperimentConfig
from medflower.modelspec import build_experiment_model
from medflower.threshold import BINS

SECRETS = ("Doe^Jane", "MRN-424242", "St Elsewhere General", "PATIENT_DOE_JANE", "1.2.826.0.1.3680043")
ALLOWED_METRIC_KEYS = {keys.NUM_EXAMPLES, keys.TRAIN_LOSS, keys.EVAL_LOSS}


def _write_dicom(path: Path, pixels: np.ndarray, idx: int) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(prefix="1.2.826.0.1.3680043.8.498.")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.InstitutionName = "Doe^Jane", f"MRN-424242-{idx}", "St Elsewhere General"
    ds.StudyInstanceUID = ds.SeriesInstanceUID = generate_uid(prefix="1.2.826.0.1.3680043.8.498.")
    ds.Modality, ds.Rows, ds.Columns = "OT", pixels.shape[0], pixels.shape[1]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def dicom_site(tmp_path_factory: pytest.TempPathFactory) -> ExperimentConfig:
    root = tmp_path_factory.mktemp("export") / "PATIENT_DOE_JANE"
    rng = np.random.default_rng(0)
    for label in ("benign", "malignant"):
        (root / label).mkdir(parents=True)
        for i in range(12):
            img = rng.integers(0, 1000, (16, 16)) + (400 if label == "malignant" else 0)
            _write_dicom(root / label / f"Doe_Jane_{label}_{i}.dcm", img, i)
    return ExperimentConfig.from_dict(
        {
            "name": "privacy",
            "data": {
                "kind": "folders",
                "path": str(root),
                "size": [16, 16],
                "val_fraction": 0.25,
                "test_fraction": 0.25,
            },
            "partition": {"kind": "iid", "num_sites": 1, "min_site_size": 1},
            "model": {"name": "cnn"},
            "train": {"batch_size": 4},
        }
    )


def _context(exp: ExperimentConfig) -> Context:
    """A hospital's node: its site YAML names the export folder (preparation comes from ``exp``)."""
    site = Path(str(exp.data.path)).parent / "site.yaml"
    data = {"kind": "folders", "path": exp.data.path, "val_fraction": 0.25, "test_fraction": 0.25}
    site.write_text(yaml.safe_dump({"name": "hospital-a", "task": "classification", "data": data}))
    return Context(
        run_id=1,
        node_id=7,
        state=RecordDict(),
        run_config={},
        node_config={keys.NODE_SITE_CONFIG: str(site)},
    )


def _instruction(exp: ExperimentConfig, kind: str, split: str = "val") -> Message:
    model = build_experiment_model(exp)
    cfg = ConfigRecord({keys.EXPERIMENT: exp.to_json(), keys.SERVER_ROUND: 1, keys.EVAL_SPLIT: split})
    return Message(
        content=RecordDict({keys.ARRAYS: ArrayRecord(model.state_dict()), keys.CONFIG: cfg}),
        dst_node_id=7,
        message_type=kind,
    )


def _serialized(content: RecordDict) -> bytes:
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).SerializeToString()


def _check_reply(reply: Message, exp: ExperimentConfig, *, with_arrays: bool) -> None:
    content = reply.content
    expected = {keys.METRICS, keys.SITE} | ({keys.ARRAYS} if with_arrays else set())
    assert set(content.keys()) == expected
    # scalars only, under known names; the one exception is the validation split's score histograms
    # (binary tasks): BINS counts per true class, from which the coordinator picks the threshold
    (metrics,) = content.metric_records.values()
    assert isinstance(metrics, MetricRecord)
    for k, v in metrics.items():
        if k.startswith(f"val-{keys.SCORE_HIST}"):
            assert isinstance(v, list) and len(v) == BINS, (k, v)
            assert all(isinstance(c, int) and c >= 0 for c in v), (k, v)
            continue
        assert isinstance(v, (int, float)) and not isinstance(v, bool), (k, v)
        assert k in ALLOWED_METRIC_KEYS or k.startswith(("val-", "test-")), k
    # the site's public name and how it prepares images (medflower.data.preparation), nothing else
    (site,) = content.config_records.values()
    assert set(site.keys()) == {keys.SITE_NAME, keys.PREPARATION}
    prep = json.loads(str(site[keys.PREPARATION]))
    assert set(prep) == {"reader", "kind", "intensity", "geometry", "channels", "size"}, prep
    assert "/" not in json.dumps({k: v for k, v in prep.items() if k != "intensity"}), prep  # no paths
    name = str(site[keys.SITE_NAME])
    assert len(name) <= 64 and "/" not in name and "\\" not in name
    # the model's own tensors, nothing more: same keys, shapes and dtypes as the model
    model_state = build_experiment_model(exp).state_dict()
    array_bytes = 0
    if with_arrays:
        (arrays,) = content.array_records.values()
        assert list(arrays.keys()) == list(model_state.keys())
        for k, a in arrays.items():
            assert tuple(a.shape) == tuple(model_state[k].shape), k
            assert np.dtype(a.dtype) == model_state[k].numpy().dtype, k
            array_bytes += a.numpy().nbytes
    else:
        assert not content.array_records
    wire = _serialized(content)
    for secret in SECRETS:
        assert secret.encode() not in wire, secret
    assert len(wire) < array_bytes + 4096  # room for names and scalars only: no images ride along


def test_train_reply_holds_only_the_model_and_scalars(dicom_site, flower_identity) -> None:
    reply = hospital_app(_instruction(dicom_site, "train"), _context(dicom_site))
    assert not reply.has_error()
    _check_reply(reply, dicom_site, with_arrays=True)
    # the identifiers really were in the data the site read (the test could fail)
    files = list(Path(dicom_site.data.path).rglob("*.dcm"))
    assert files and all(b"Doe^Jane" in f.read_bytes() for f in files[:3])


@pytest.mark.parametrize("split", ["val", "test"])
def test_evaluate_reply_holds_only_scalars(dicom_site, flower_identity, split: str) -> None:
    reply = hospital_app(_instruction(dicom_site, "evaluate", split), _context(dicom_site))
    assert not reply.has_error()
    _check_reply(reply, dicom_site, with_arrays=False)
    assert reply.content[keys.METRICS][keys.NUM_EXAMPLES] > 0
