"""medflower: federated learning for medical imaging on Flower.

The shared package (this folder) holds what the coordinator and the hospitals must agree on: the
model zoo (:mod:`medflower.models`), task metrics (:mod:`medflower.metrics`), the experiment config
schema and method registry (:mod:`medflower.config`, :mod:`medflower.methods`), message keys
(:mod:`medflower.keys`) and data loaders (:mod:`medflower.data`). It imports none of the layers
above it. The layers install as ``medflower.server``, ``medflower.client``,
``medflower.strategies``, ``medflower.simulation``, ``medflower.deploy`` and ``medflower.cli``;
``server`` and ``client`` never import each other.

Why ``__path__`` is extended below: the repository keeps those layers as top-level folders
(``server/``, ``client/``, ...) and setuptools maps them under ``medflower`` when it installs.
Two layouts import straight from the source tree without that mapping: a checkout on
``sys.path`` (tests, ``python -m``), and the app bundle (FAB) that ``flwr run`` ships, which Flower
unpacks and puts first on ``sys.path``. In both, the folder above this one is the project root,
recognised by its ``pyproject.toml`` naming this project; only then is it searched for the
``medflower.<layer>`` subpackages, so an installed copy never picks up unrelated folders.
"""

from __future__ import annotations

from pathlib import Path as _Path

__version__ = "0.1.0"


def _project_root() -> _Path | None:
    root = _Path(__file__).resolve().parent.parent
    try:
        head = (root / "pyproject.toml").read_text(encoding="utf-8")[:400]
    except OSError:
        return None
    return root if 'name = "medflower"' in head else None


_root = _project_root()
if _root is not None and not any((_Path(p) / "server").is_dir() for p in __path__):
    __path__.append(str(_root))
