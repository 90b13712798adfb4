"""The Flower app components of ``flwr run .`` (``[tool.flwr.app.components]`` in pyproject.toml).

A top-level module of the app bundle (FAB), not installed with medflower. Why not name
``medflower.cli.apps:clientapp`` there directly: in Flower 1.42's simulation runtime one thread
imports the ServerApp while another checks the ClientApp component with
``importlib.util.find_spec`` (``flwr/supercore/object_ref.py``, ``validate``), outside Flower's
import lock. For a dotted name that check imports the parent packages, and can meet ``medflower``
half-initialised by the other thread, before its ``__init__`` has extended ``__path__`` to the
layers: ``medflower.cli`` is then not found (or found in another installed medflower). A top-level
name has no parent to import, so the check imports nothing; the import below runs later, under
Flower's import lock, when ``medflower`` is complete.
"""

from __future__ import annotations

from medflower.cli import apps

clientapp = apps.clientapp  # an assignment: Flower's check looks for one
