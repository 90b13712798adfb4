"""Shared fixtures. ``shared_data`` is the ONE way tests reach ../shared/data (real public data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medflower.runenv import quiet_flower_env

quiet_flower_env()

REPO = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path:
    env = os.environ.get("MEDFLOWER_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public data folder (../shared/data or $MEDFLOWER_SHARED_DATA); skips if absent."""
    path = _shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real test data not found at {path} (set MEDFLOWER_SHARED_DATA to its folder)")
    return path


@pytest.fixture(autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture
def flower_identity():
    """Flower 1.42 stamps Messages with a process-wide task identity; set one to build Messages in tests."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield TaskIdentity
