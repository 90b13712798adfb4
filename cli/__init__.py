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


def console() -> None:
    """The installed ``medflower`` script and ``python -m medflower.cli``: :func:`main`, then a quick exit.

    Why not ``sys.exit``: after a simulation the interpreter spends about a second tearing down torch's
    and Flower's modules and freeing memory the operating system frees anyway at exit; on a 15 s run that
    is 7 % of the wall time (issue 11's engine bar). Once every ``atexit`` handler has run (logging's
    flush among them) and both streams are flushed, nothing is left to lose. When other threads are
    still alive (a command that leaves one running), under a profiler or tracer (``python -m cProfile``
    writes its output after ``main`` returns), or with ``MEDFLOWER_NORMAL_EXIT=1``, it exits the usual
    way. In-process callers (the tests) call :func:`main` and are not affected."""
    import atexit
    import os
    import sys
    import threading

    code = main()
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    watched = sys.getprofile() is not None or sys.gettrace() is not None
    if (
        threading.active_count() > 1
        or watched
        or run_exitfuncs is None
        or os.environ.get("MEDFLOWER_NORMAL_EXIT") == "1"
    ):
        sys.exit(code)
    run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
