"""Test helpers: a hospital's site on disk (PNG files, a manifest, a site YAML) and its node's messages.

The coordinator's experiment has no data of its own (``data.kind: none``: no global test, the model's
sizes given in ``model:``), as a coordinator whose test set is not in the hospitals' format must not
have one (its global test would be refused: medflower.server.globaltest), and every hospital site here
holds 16x16 grey PNGs of 2 classes listed in a manifest, so that the hospital's model is the
coordinator's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from medflower import keys
from medflower.config import ExperimentConfig
from medflower.modelspec import build_experiment_model

SIZE = 16


def experiment(**sections: Any) -> ExperimentConfig:
    """A small experiment: 2 sites, 2 rounds, the CNN; ``sections`` override top-level sections."""
    base: dict[str, Any] = {
        "name": "site-control",
        "data": {"kind": "none"},
        "partition": {"kind": "iid", "num_sites": 2, "min_site_size": 1},
        "model": {"name": "cnn", "in_channels": 1, "out_channels": 2, "img_size": [SIZE, SIZE]},
        "train": {"rounds": 2, "local_epochs": 1, "batch_size": 8, "lr": 0.01},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return ExperimentConfig.from_dict(base)


def write_png(path: Path, label: int, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 120, (SIZE, SIZE)) + (100 if label else 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(path)


def write_site(
    root: Path,
    name: str,
    *,
    n: int = 16,
    policy: dict[str, Any] | None = None,
    state_dir: str | None = None,
    extra_rows: list[tuple[str, str]] = (),  # type: ignore[assignment]
    seed: int = 0,
) -> Path:
    """A hospital's export under ``root``: ``n`` PNGs, ``manifest.csv`` (plus ``extra_rows`` as given)
    and ``site.yaml``; returns the site YAML's path."""
    root.mkdir(parents=True, exist_ok=True)
    rows = ["image,label"]
    for i in range(n):
        label = i % 2
        write_png(root / "images" / f"img_{i:03d}.png", label, seed * 1000 + i)
        rows.append(f"images/img_{i:03d}.png,{label}")
    rows += [f"{image},{label}" for image, label in extra_rows]
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    site: dict[str, Any] = {
        "name": name,
        "task": "classification",
        "data": {"kind": "manifest", "path": "manifest.csv", "val_fraction": 0.25, "test_fraction": 0.25},
    }
    if policy is not None:
        site["policy"] = policy
    if state_dir is not None:
        site["state_dir"] = state_dir
    path = root / "site.yaml"
    path.write_text(yaml.safe_dump(site, sort_keys=False))
    return path


def node(site_yaml: Path | str | None = None, *, run_id: int = 1, node_id: int = 7, **node_config: Any) -> Context:
    """A hospital's SuperNode context (a new one = a restarted node: ``state`` starts empty)."""
    cfg = dict(node_config)
    if site_yaml is not None:
        cfg[keys.NODE_SITE_CONFIG] = str(site_yaml)
    return Context(run_id=run_id, node_id=node_id, node_config=cfg, state=RecordDict(), run_config={})


def message(exp: ExperimentConfig, kind: str = "train", *, server_round: int = 1, split: str | None = None) -> Message:
    cfg = ConfigRecord({keys.EXPERIMENT: exp.to_json(), keys.SERVER_ROUND: server_round})
    if split is not None:
        cfg[keys.EVAL_SPLIT] = split
    arrays = ArrayRecord(build_experiment_model(exp).state_dict())
    return Message(content=RecordDict({keys.ARRAYS: arrays, keys.CONFIG: cfg}), dst_node_id=7, message_type=kind)


def refusal_of(reply: Message) -> str | None:
    """The refusal a reply states (None: not a refusal)."""
    if reply.has_error() or keys.SITE not in reply.content.config_records:
        return None
    value = reply.content.config_records[keys.SITE].get(keys.REFUSAL)
    return None if value is None else str(value)
