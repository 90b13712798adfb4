"""No layer imports one above it: the import graph, read from every module's source with ``ast``.

The layers, bottom to top (each installs as ``medflower.<folder>``):

* ``medflower/`` — shared: config, keys, models, data. It may import ``medflower.strategies`` (the
  method registry reads the strategies), none of the others;
* ``strategies/`` — the aggregation methods;
* ``client/`` — a hospital's node; ``server/`` — the coordinator (neither imports the other);
* ``simulation/`` — simulated federations (it drives client and server);
* ``deploy/`` — certificates, node checks, the deployment lab;
* ``cli/`` — the ``medflower`` command and the ``flwr run`` component: the top, which imports them all
  (with the app bundle's top-level modules, e.g. ``flwr_components.py``).

Every import counts: at module top, inside functions (a lazy import is still a dependency), under
``TYPE_CHECKING``, relative ones, bare top-level names (``import client`` resolves to the folder in
a checkout) and ``importlib.import_module("...")`` with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = "medflower"
LAYER_DIRS = ("strategies", "client", "server", "simulation", "deploy", "cli")  # installed as medflower.<dir>
FORBIDDEN: dict[str, frozenset[str]] = {
    SHARED: frozenset({"client", "server", "simulation", "deploy", "cli"}),
    "strategies": frozenset({"client", "server", "simulation", "deploy", "cli"}),
    "client": frozenset({"server", "simulation", "deploy", "cli"}),
    "server": frozenset({"client", "simulation", "deploy", "cli"}),
    "simulation": frozenset({"deploy", "cli"}),
    "deploy": frozenset({"cli"}),
    "cli": frozenset(),
}
# Violations in modules this branch does not own, each with the change that removes it. strict:
# when the import goes, the test XPASSes and fails, so the entry is deleted with the fix.
KNOWN: dict[str, str] = {}


def module_name(rel: Path) -> str:
    """``client/app.py`` -> ``medflower.client.app``; ``medflower/config/__init__.py`` -> ``medflower.config``."""
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts if parts[0] == SHARED else [SHARED, *parts])


def layer_of(module: str) -> str | None:
    """The layer a dotted name belongs to (None: not medflower's)."""
    parts = module.split(".")
    if parts[0] in LAYER_DIRS:  # a bare top-level name, as a checkout on sys.path would resolve it
        return parts[0]
    if parts[0] != SHARED:
        return None
    return parts[1] if len(parts) > 1 and parts[1] in LAYER_DIRS else SHARED


def imported_names(source: str, module: str, *, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, dotted name) of everything ``source`` (the module ``module``) imports, anywhere in it."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names if a.name != "*"]
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def violations(source: str, layer: str, module: str, *, is_package: bool = False) -> list[str]:
    """``line: name`` of each import of a layer that ``layer`` must not import."""
    out = []
    for line, name in imported_names(source, module, is_package=is_package):
        target = layer_of(name)
        if target is not None and target in FORBIDDEN[layer]:
            out.append(f"{line}: {name} ({target})")
    return sorted(set(out), key=lambda v: int(v.split(":")[0]))


def _modules() -> list[Path]:
    layers = [p for top in (SHARED, *LAYER_DIRS) for p in (REPO / top).rglob("*.py")]
    return sorted(p.relative_to(REPO) for p in [*layers, *REPO.glob("*.py")])


def _layer(rel: Path) -> str:
    return rel.parts[0] if len(rel.parts) > 1 else "cli"  # a top-level module of the bundle: the top


def _param(rel: Path):
    marks = [pytest.mark.xfail(strict=True, reason=f"{rel}: {KNOWN[str(rel)]}")] if str(rel) in KNOWN else []
    return pytest.param(rel, id=str(rel), marks=marks)


@pytest.mark.parametrize("rel", [_param(p) for p in _modules()])
def test_module_imports_no_layer_above_its_own(rel: Path) -> None:
    layer = _layer(rel)
    found = violations(
        (REPO / rel).read_text(encoding="utf-8"), layer, module_name(rel), is_package=rel.name == "__init__.py"
    )
    assert not found, f"{rel} ({layer}) imports a layer it must not: " + "; ".join(found)


def test_every_layer_is_checked() -> None:
    modules = _modules()
    for top in (SHARED, *LAYER_DIRS):
        assert any(p.parts[0] == top for p in modules), top
    assert set(KNOWN) <= {str(p) for p in modules}, "a KNOWN entry names a file that no longer exists"
    assert not (REPO / SHARED / "cli.py").exists()  # the command is the top layer, not the shared package


@pytest.mark.parametrize(
    "layer, module, source, expected",
    [
        (SHARED, "medflower.models", "from medflower.client.app import app", ["medflower.client"]),
        (SHARED, "medflower.config", "from medflower import simulation", ["medflower.simulation"]),
        (SHARED, "medflower.keys", "import medflower.cli", ["medflower.cli"]),
        (
            "client",
            "medflower.client.app",
            "def f():\n    from medflower.simulation.attack import poison\n",
            ["simulation"],
        ),
        ("client", "medflower.client.app", "from ..simulation import sites", ["medflower.simulation"]),
        ("client", "medflower.client.app", "import simulation.sites", ["simulation.sites"]),
        ("server", "medflower.server.app", "import medflower.client.train", ["medflower.client"]),
        (
            "server",
            "medflower.server.app",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import medflower.deploy",
            ["medflower.deploy"],
        ),
        ("strategies", "medflower.strategies", "from medflower.server.loop import site_of", ["medflower.server"]),
        (
            "simulation",
            "medflower.simulation.runner",
            "import importlib\nimportlib.import_module('medflower.cli.apps')",
            ["medflower.cli"],
        ),
        ("deploy", "medflower.deploy.lab", "from medflower.cli.commands import main", ["medflower.cli"]),
    ],
)
def test_a_forbidden_import_is_caught(layer: str, module: str, source: str, expected: list[str]) -> None:
    found = violations(source, layer, module)
    assert found, f"{layer}: {source!r} was not caught"
    assert all(any(e in v for v in found) for e in expected), found


@pytest.mark.parametrize(
    "layer, module, source",
    [
        (SHARED, "medflower.config", "from medflower.strategies import build_strategy"),  # the method registry
        (SHARED, "medflower.models", "import torch\nfrom medflower import keys\nfrom medflower.data import SiteData"),
        ("client", "medflower.client.app", "from medflower.client.train import train_epochs\nfrom . import site"),
        ("server", "medflower.server.app", "from medflower.strategies import build_strategy"),
        (
            "simulation",
            "medflower.simulation.clientapp",
            "from medflower.client.app import build_client_app\nimport medflower.server.app",
        ),
        ("deploy", "medflower.deploy.nodecheck", "from medflower.client.site import load_site_config"),
        (
            "cli",
            "medflower.cli.apps",
            "from medflower.simulation.clientapp import app\nfrom medflower.deploy import lab",
        ),
    ],
)
def test_an_allowed_import_passes(layer: str, module: str, source: str) -> None:
    assert violations(source, layer, module) == []
