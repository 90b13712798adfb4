"""Errors that leak nothing: a failing hospital sends a code, a generic reason and a reference id; the full
error (paths, manifest text, traceback) stays in the site's own log under that id."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from flwr.app import Context, Message
from sitekit import experiment, message, node, write_site

from medflower import keys
from medflower.client import app as app_module
from medflower.client.app import app as hospital_app
from medflower.client.app import build_client_app
from medflower.client.audit import verify
from medflower.client.errors import ERROR_CODE, ERRORS_FILE, classify
from medflower.client.hospital import hospital_guard, hospital_ledger_place, load_hospital_site
from medflower.config import ExperimentConfig
from medflower.data.base import DataError
from medflower.schema import ConfigError

PATIENT_DIR = "PATIENT_DOE_JANE_MRN424242"  # a folder named after a patient, as exports often are
CELL = "Malignant per Dr Smith 2024-01-02"  # manifest cell text that is no class label
SECRETS = (PATIENT_DIR, "Doe_Jane", CELL, "Dr Smith", "/tmp/", "manifest.csv", "Traceback")
REASON = re.compile(r"^([a-z-]+): ([a-z' ,]+) \(ref ([0-9a-f]{8})\)$")


def _parts(reply: Message) -> tuple[str, str]:
    """(code, ref) of a contained error reply; its reason has exactly the fixed form."""
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == ERROR_CODE
    m = REASON.match(reply.error.reason)
    assert m, reply.error.reason
    return m.group(1), m.group(3)


def _site_records(caplog: pytest.LogCaptureFixture, ref: str) -> list[str]:
    return [
        r.getMessage() + (r.exc_text or "")
        for r in caplog.records
        if r.name == "medflower.site" and ref in r.getMessage()
    ]


def _corrupt_png(root: Path) -> tuple[str, str]:
    bad = root / PATIENT_DIR / "Doe_Jane_corrupt.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    return (f"{PATIENT_DIR}/Doe_Jane_corrupt.png", "1")


def _corrupt_nifti(root: Path) -> tuple[str, str]:
    bad = root / PATIENT_DIR / "Doe_Jane_brain.nii.gz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage that is no NIfTI volume" * 3)
    return (f"{PATIENT_DIR}/Doe_Jane_brain.nii.gz", "0")


def _bad_cell(root: Path) -> tuple[str, str]:
    return ("images/img_000.png", CELL)


def _missing_file(root: Path) -> tuple[str, str]:
    return (f"{PATIENT_DIR}/Doe_Jane_missing.png", "1")


BAD = {"corrupt png": _corrupt_png, "corrupt nifti": _corrupt_nifti, "bad cell": _bad_cell, "missing": _missing_file}


# ------------------------------------------------------------------------------------------ one node
@pytest.mark.parametrize("bad", BAD.values(), ids=BAD.keys())
def test_a_bad_file_reaches_the_coordinator_as_a_code_and_a_reference(
    tmp_path: Path, flower_identity, caplog: pytest.LogCaptureFixture, bad
) -> None:
    root = tmp_path / "export"
    row = bad(root)
    site = write_site(root, "hospital-b", n=8, extra_rows=[row], state_dir="state")
    reply = hospital_app(message(experiment(), "train"), node(site))
    code, ref = _parts(reply)
    assert code == "data-error" and reply.error.reason == f"data-error: the site's data could not be read (ref {ref})"
    # the site keeps the whole story under the same reference: its log, its errors file, its audit entry
    logged = _site_records(caplog, ref)
    assert logged and any(row[0] in t or CELL in t for t in logged), logged
    errors = (root / "state" / ERRORS_FILE).read_text()
    assert f"=== ref {ref} " in errors and "Traceback" in errors and (row[0] in errors or CELL in errors)
    (sent,) = [e for e in verify(root / "state").entries if e["event"] == "sent"]
    assert sent["error"] == {"code": "data-error", "ref": ref} and sent["arrays_sha256"] is None


@pytest.mark.parametrize(
    "raised, code",
    [
        (FloatingPointError(f"local training diverged in /data/{PATIENT_DIR}"), "training-diverged"),
        (MemoryError(f"cannot allocate for /data/{PATIENT_DIR}"), "out-of-memory"),
        (RuntimeError(f"something about {CELL}"), "internal-error"),
        (KeyError(f"/data/{PATIENT_DIR}/x.png"), "internal-error"),
        (ConfigError(f"/data/{PATIENT_DIR}/site.yaml: data.size"), "config-error"),
        (PermissionError(f"[Errno 13] Permission denied: '/data/{PATIENT_DIR}'"), "data-error"),
    ],
)
def test_any_exception_is_contained(
    tmp_path: Path, flower_identity, caplog: pytest.LogCaptureFixture, monkeypatch, raised: Exception, code: str
) -> None:
    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(app_module, "train_epochs", fail)  # the pipeline the hospital app runs
    site = write_site(tmp_path / "export", "hospital-b", n=8)
    reply = hospital_app(message(experiment(), "train"), node(site))
    got, ref = _parts(reply)
    assert got == code and PATIENT_DIR not in reply.error.reason and CELL not in reply.error.reason
    assert any(PATIENT_DIR in t or CELL in t for t in _site_records(caplog, ref))


def test_a_malformed_message_is_a_message_error(tmp_path: Path, flower_identity) -> None:
    site = write_site(tmp_path / "export", "hospital-b", n=4)
    msg = message(experiment(), "train")
    msg.content[keys.CONFIG][keys.EXPERIMENT] = '{"train": {"rounds": "many"}}'
    assert _parts(hospital_app(msg, node(site)))[0] == "message-error"


def test_classes_follow_the_exception_type_never_its_text() -> None:
    assert classify(DataError("x")).code == "data-error"
    assert classify(ValueError("data-error: file not found")).code == "internal-error"
    assert classify(OSError("x")).code == "data-error"


def test_the_simulation_keeps_full_errors(flower_identity) -> None:
    """A researcher's simulated sites hold the researcher's data: the full error is what they need."""

    def load(context: Context, exp: ExperimentConfig):
        raise DataError(f"/data/{PATIENT_DIR}/img.png: cannot read as PNG")

    with pytest.raises(DataError, match=PATIENT_DIR):
        build_client_app(load_site=load)(message(experiment(), "train"), node())


# ------------------------------------------------------------------------------------------ a federation
class SiteSide:
    """Wraps the ClientApp the in-process grid calls, so that a log handler can tell whose record it is:
    in a real deployment a site's records (its readers', MONAI's) are written on the hospital's machine."""

    def __init__(self, app) -> None:
        self.app, self.active = app, False

    def __call__(self, msg: Message, context: Context) -> Message:
        self.active = True
        try:
            return self.app(msg, context)
        finally:
            self.active = False


class SplitLog(logging.Handler):
    def __init__(self, side: SiteSide) -> None:
        super().__init__(logging.DEBUG)
        self.side = side
        self.coordinator: list[str] = []
        self.site: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.side.active:
            self.site.append(record)
        else:
            self.coordinator.append(record.getMessage() + ("\n" + self.format(record) if record.exc_info else ""))


@pytest.mark.slow
def test_no_path_or_manifest_text_reaches_the_coordinator(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from medflower.simulation.inprocess import InProcessGrid, simulate_inprocess

    caplog.set_level(logging.DEBUG)
    sites = [write_site(tmp_path / "a", "hospital-a", n=12, seed=1)]
    for name, bad in (("hospital-b", _corrupt_png), ("hospital-c", _bad_cell), ("hospital-d", _corrupt_nifti)):
        root = tmp_path / name
        sites.append(write_site(root, name, n=12, extra_rows=[bad(root)], state_dir="state"))
    exp = experiment(partition={"num_sites": 4})
    side = SiteSide(
        build_client_app(load_site=load_hospital_site, guard=hospital_guard, locate_ledger=hospital_ledger_place)
    )
    grid = InProcessGrid(side, num_sites=4, node_configs=[{keys.NODE_SITE_CONFIG: str(s)} for s in sites])  # type: ignore[arg-type]
    split = SplitLog(side)
    logging.getLogger().addHandler(split)
    try:
        summary = simulate_inprocess(exp, tmp_path / "out", grid=grid)
    finally:
        logging.getLogger().removeHandler(split)
    text = (tmp_path / "out" / "summary.json").read_text()
    assert json.loads(text) == summary
    assert split.coordinator and any("no reply from" in t for t in split.coordinator)
    for secret in (*SECRETS, str(tmp_path)):
        assert secret not in text, secret
        assert not [t for t in split.coordinator if secret in t], secret
    # every failure the coordinator recorded is a code and a reference that the failing site's log explains
    failures = [f for r in summary["rounds"] for f in r["failures"] + r["evaluate_failures"]]
    assert {f["site"] for f in failures} == {"node-1002", "node-1003", "node-1004"}  # no site name without a reply
    site_log = [r.getMessage() for r in split.site if r.name == "medflower.site"]
    for f in failures:
        m = REASON.match(f["reason"])
        assert m and m.group(1) == "data-error", f
        explained = [t for t in site_log if f"ref {m.group(3)}:" in t]
        assert len(explained) == 1 and (PATIENT_DIR in explained[0] or CELL in explained[0]), f
    assert summary["rounds"][0]["sites_train"].keys() == {"hospital-a"}
