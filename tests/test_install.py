"""What ``pip install`` puts on a machine: ``medflower`` and nothing else at the top level.

The repository keeps the layers as top-level folders (``server/``, ``client/``, ...); installed,
they live under ``medflower.*`` only, so ``import client`` anywhere else still finds no module of
ours. Checked on a real (non-editable) install of this checkout into a scratch folder, imported
from another working directory, with the dependencies of this environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomli

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomli.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
FOLDERS = sorted(set(PYPROJECT["tool"]["setuptools"]["package-dir"].values()))  # medflower, server, client, ...
LAYERS = [f for f in FOLDERS if f != "medflower"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install --target`` of a copy of the sources (the checkout itself stays untouched)."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", PYPROJECT["project"]["readme"]):
        shutil.copy(REPO / name, src / name)
    for folder in FOLDERS:
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    target = root / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-build-isolation"]
    res = subprocess.run(
        [*pip, "--target", str(target), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot build medflower here (setuptools missing?): {res.stderr[-1500:]}")
    return target


def _python(code: str, site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_only_medflower_is_installed_at_the_top_level(installed: Path) -> None:
    top = {p.name for p in installed.iterdir()} - {"bin"}
    assert {n for n in top if not n.endswith((".dist-info", ".egg-info"))} == {"medflower"}, top
    for layer in LAYERS:
        assert (installed / "medflower" / layer / "__init__.py").is_file(), layer


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layers_bare_name_does_not_import_outside_the_checkout(installed: Path, tmp_path: Path, layer: str) -> None:
    res = _python(f"import {layer}", installed, tmp_path)
    assert res.returncode != 0 and f"No module named '{layer}'" in res.stderr, res.stdout + res.stderr


def test_the_installed_apps_and_command_import_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    code = (
        "import medflower, medflower.client.app, medflower.cli.apps, medflower.server.app\n"
        "from medflower.cli import build_parser\n"
        "build_parser().parse_args(['site', 'check', 'x.yaml'])\n"
        "print(medflower.__file__); print(medflower.client.app.__file__); print(medflower.__path__)\n"
    )
    res = _python(code, installed, tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    file_, client_file, path = res.stdout.splitlines()[-3:]
    assert Path(file_).is_relative_to(installed) and Path(client_file).is_relative_to(installed), res.stdout
    assert str(REPO) not in path  # the installed package does not reach back into a checkout
    assert (installed / "medflower" / "quickstart.yaml").is_file()  # package data came along
    assert (installed / "medflower" / "deploy" / "start-hospital.sh").is_file()
