"""The ``medflower`` command (installed as ``medflower.cli``): the top layer.

It imports the layers below it (``medflower.server``, ``.client``, ``.simulation``, ``.deploy``)
and none of them imports it. :mod:`medflower.cli.commands` builds the parser; each subcommand's
module imports its heavy implementation inside the handler, so ``medflower --help`` starts in a
fraction of a second. :mod:`medflower.cli.apps` holds the ClientApp component ``flwr run .`` loads.

This ``__init__`` imports nothing: a hospital's ClientApp process imports ``medflower.cli.apps``,
and must not load the parsers (the simulator's commands among them) on the way.
"""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    """The ``medflower`` argument parser (see :mod:`medflower.cli.commands`)."""
    from medflower.cli import commands  # here, not at the top: see the module doc

    return commands.build_parser()


def main(argv: list[str] | None = None) -> int:
    """The ``medflower`` console script (see :mod:`medflower.cli.commands`)."""
    from medflower.cli import commands  # here, not at the top: see the module doc

    return commands.main(argv)
