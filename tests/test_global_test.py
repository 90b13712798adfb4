"""The coordinator's global test: same preparation as the sites', or the run refuses; no data, no test.

Synthetic images only (PNG exports and an ``.npz`` made here from the same arrays).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from medflower import keys
from medflower.config import ExperimentConfig
from medflower.data import load_dataset
from medflower.data.preparation import Preparation, fingerprint, pixel_differences
from medflower.schema import from_dict
from medflower.server.globaltest import NO_DATA_NOTE, GlobalTest, PreparationMismatch
from medflower.server.participation import waiting_line


def _synthetic_images(n: int = 24) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n) % 2
    return images, labels


def _png_export(root: Path) -> Path:
    from PIL import Image

    images, labels = _synthetic_images()
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        (root / str(lab)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, "L").save(root / str(lab) / f"img{i:03d}.png")
    return root


def _npz(path: Path) -> Path:
    images, labels = _synthetic_images()
    parts = {"train": slice(0, 12), "val": slice(12, 16), "test": slice(16, 24)}
    arrays = {f"{k}_images": images[s] for k, s in parts.items()} | {
        f"{k}_labels": labels[s, None] for k, s in parts.items()
    }
    np.savez(path, **arrays)
    return path


def _exp(data: dict, **model) -> ExperimentConfig:
    return from_dict(
        ExperimentConfig,
        {
            "name": "t",
            "task": "classification",
            "data": data,
            "partition": {"num_sites": 2},
            "model": {"name": "cnn", **model},
        },
    )


def _reply(flower_identity, site: str, preparation: Preparation) -> Message:
    site_rec = ConfigRecord({keys.SITE_NAME: site, keys.PREPARATION: preparation.to_json()})
    return Message(RecordDict({keys.SITE: site_rec}), dst_node_id=7, message_type="train")


def test_same_files_in_another_listing_prepare_the_same_pixels(tmp_path: Path) -> None:
    """folders and manifest read the same PNGs through the same readers: no difference that matters."""
    export = _png_export(tmp_path / "export")
    manifest = tmp_path / "m.csv"
    rows = [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted(export.rglob("*.png"))]
    manifest.write_text("image,label\n" + "\n".join(rows) + "\n")
    a = _exp({"kind": "folders", "path": str(export)})
    b = _exp({"kind": "manifest", "path": str(manifest)})
    fa, fb = fingerprint(a.data, load_dataset(a)), fingerprint(b.data, load_dataset(b))
    assert fa.kind != fb.kind and pixel_differences(fa, fb) == []
    assert Preparation.from_json(fa.to_json()) == fa and str(tmp_path) not in fa.to_json()  # no paths sent


def test_a_coordinator_with_the_sites_images_in_another_format_refuses_the_run(tmp_path: Path, flower_identity) -> None:
    """The issue's case: the coordinator's .npz ([-1, 1]) against the hospitals' PNG exports ([0, 1])."""
    sites = _exp({"kind": "folders", "path": str(_png_export(tmp_path / "export"))})
    site_prep = fingerprint(sites.data, load_dataset(sites))
    coordinator = GlobalTest(_exp({"kind": "medmnist", "path": str(_npz(tmp_path / "same.npz"))}))
    assert coordinator.runs and coordinator.preparation is not None
    assert pixel_differences(coordinator.preparation, site_prep) == ["reader", "intensity", "geometry"]
    with pytest.raises(PreparationMismatch) as err:
        coordinator.check(_reply(flower_identity, "hospital-a", site_prep), view=None)  # type: ignore[arg-type]
    text = str(err.value)
    assert "coordinator: medmnist (medmnist), intensity medmnist" in text
    assert "hospital-a: folders (files), intensity minmax" in text and "data.kind: none" in text
    # the same preparation passes; a reply without one (a simulated site) is not judged
    same = GlobalTest(sites)
    assert same.check(_reply(flower_identity, "hospital-a", site_prep), view=None) is None  # type: ignore[arg-type]


def test_a_coordinator_without_data_runs_no_global_test_and_says_so(caplog) -> None:
    test = GlobalTest(_exp({"kind": "none"}, in_channels=1, out_channels=2, img_size=[28, 28]))
    assert not test.runs and test.note == NO_DATA_NOTE and test(1, None) == {}  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match="data.kind is 'none'.*model.in_channels, model.out_channels and model.img_size"
    ):
        load_dataset(_exp({"kind": "none"}))


def test_the_waiting_line_names_the_hospitals_and_where_n_comes_from() -> None:
    line = waiting_line(3, [11, 12], {11: "hospital-a"})
    assert line.startswith("waiting for 3 hospitals (2 connected: hospital-a, node-12)")
    assert "partition.num_sites" in line


def test_status_names_each_hospital_and_the_round_reached(tmp_path: Path) -> None:
    from medflower.deploy.status import node_rows, run_progress

    directory = tmp_path / "sites.json"
    entries = {
        "11": {"name": "hospital-a", "key_sha256": "ab" * 32},
        "12": {"name": "hospital-b", "key_sha256": "cd" * 32},
    }
    directory.write_text(json.dumps({"format": 1, "sites": entries}))
    nodes = [
        {"node-id": "11", "status": "online", "online-at": "2026-11-30 03:00:00"},
        {"node-id": "12", "status": "offline", "offline-at": "2026-11-30 02:00:00"},
    ]
    rows = node_rows(directory, nodes)
    assert [(r.name, r.node_id, r.key_sha256) for r in rows] == [
        ("hospital-a", 11, "ab" * 8),
        ("hospital-b", 12, "cd" * 8),
    ]
    assert rows[0].seen.startswith("connected") and rows[1].seen == "not connected; last seen 2026-11-30 02:00:00"
    out = tmp_path / "run"
    assert "no round finished yet" in run_progress(out)
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "checkpoint.json").write_text(json.dumps({"round": 2, "experiment_name": "demo"}))
    assert "experiment demo: round 2 done (in progress" in run_progress(out)
