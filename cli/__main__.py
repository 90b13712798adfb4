"""``python -m medflower.cli``: the ``medflower`` command."""

from __future__ import annotations

from medflower.cli import console

console()
