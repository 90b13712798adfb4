"""Warm ClientApp processes for a hospital's SuperNode: the heavy imports paid once, not per message.

Flower 1.42 runs every message a SuperNode receives in a new process: its SuperExec
(``flwr/supercore/superexec/run_superexec.py``) hands each task to ``SubprocessExecutor.launch``
(``flwr/supercore/superexec/executor/subprocess_executor.py``), which starts the command
``flwr-clientapp`` (``TASK_TYPE_TO_COMMAND``, found on ``PATH``). That process serves one message
and exits, so every train and every evaluate message imported torch, MONAI and Opacus again: about 6 s
of a deployed round's 7-12 s per message on a busy 2-core machine, for about 1 s of training.
Flower's ``--isolation process`` only moves the SuperExec out of the SuperNode: it still launches
one process per message. Its only pre-started ("warm") executor is the Kubernetes one.

So deploy/start-hospital.sh starts :func:`serve` beside the SuperNode: a process that imports
:data:`PRELOAD` once and listens on a Unix socket in a private (0700) folder. It puts
``deploy/bin`` first on the node's ``PATH``, where a ``flwr-clientapp`` of ours hands the SuperExec's
arguments to that process (:func:`connect`), which forks a child that runs Flower's own
``flwr-clientapp`` entry point with them. The child is a copy of the process with those modules
already imported; it then fetches the message, installs the app bundle and loads the ClientApp
exactly as before, from the bundle (the app's own modules are not preloaded, so the code that runs is
the bundle's, as deploy/README.md's "Which code runs at your hospital" says). When the socket does not
answer, ours runs Flower's ``flwr-clientapp`` itself, as if it were not there. The socket accepts only
connections from its own user (``SO_PEERCRED``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import socket
import struct
import sys
from collections.abc import Sequence
from pathlib import Path

SOCKET_ENV = "MEDFLOWER_CLIENTAPP_SOCKET"  # the serving process's socket, for deploy/bin/flwr-clientapp
# the ClientApp's heavy dependencies (not the app itself: that comes from the bundle); an optional one
# that is not installed is skipped. _preload's import order: MONAI before anything else touches it.
# torch._dynamo: torch imports it on the first optimizer a process builds (``Optimizer.add_param_group``
# is wrapped in ``torch._disable_dynamo``), 1.1 s on 2 cores, in every ClientApp process that trains.
PRELOAD = ("torch", "torch._dynamo", "monai", "opacus", "PIL.Image", "flwr.supernode.cli", "flwr.clientapp")


def run_clientapp(argv: Sequence[str]) -> int:
    """Flower's own ``flwr-clientapp`` entry point with ``argv``; its exit status."""
    from flwr.supernode.cli import flwr_clientapp

    sys.argv = ["flwr-clientapp", *argv]
    try:
        flwr_clientapp()
    except SystemExit as exc:  # flwr_exit ends the process with sys.exit
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def _child(conn: socket.socket, listener: socket.socket, argv: list[str]) -> None:
    """In the forked child: answer with its pid, then be ``flwr-clientapp``; never returns."""
    code = 1
    try:
        listener.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        conn.sendall(str(os.getpid()).encode())
        conn.close()
        code = run_clientapp(argv)
    except BaseException as exc:
        print(f"warmstart: flwr-clientapp failed: {exc!r}", file=sys.stderr, flush=True)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[2])


def _read_all(conn: socket.socket) -> bytes:
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def serve(sock_path: Path, preload: Sequence[str] = PRELOAD) -> None:
    """Import ``preload``, then fork a ``flwr-clientapp`` for each request on ``sock_path``; forever."""
    for name in preload:
        try:
            importlib.import_module(name)
        except ImportError:
            if name != "opacus":
                raise
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    sock_path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    os.chmod(sock_path, 0o600)
    listener.listen(16)
    print(f"warmstart: ClientApp processes start warm from {sock_path}", flush=True)
    while True:
        conn, _ = listener.accept()
        with conn:
            if _peer_uid(conn) != os.getuid():
                continue
            argv = json.loads(_read_all(conn) or b"[]")
            if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
                continue
            if os.fork() == 0:
                _child(conn, listener, argv)


def connect(argv: Sequence[str]) -> int:
    """``deploy/bin/flwr-clientapp``: ask the warm process for a child with ``argv``; or run it here."""
    path = os.environ.get(SOCKET_ENV, "")
    if path:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(path)
                s.sendall(json.dumps(list(argv)).encode())
                s.shutdown(socket.SHUT_WR)
                if _read_all(s).strip().isdigit():
                    return 0  # the forked child serves the message (the SuperExec never waits on us)
        except OSError as exc:
            print(f"warmstart: {path} did not answer ({exc}); starting flwr-clientapp cold", file=sys.stderr)
    return run_clientapp(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """``serve --socket PATH`` (start-hospital.sh) or ``connect ARGS...`` (deploy/bin/flwr-clientapp)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["connect"]:  # Flower's arguments, passed on untouched
        return connect(args[1:])
    ap = argparse.ArgumentParser(prog="warmstart.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="import the ClientApp's dependencies once; fork a flwr-clientapp per message")
    s.add_argument("--socket", type=Path, required=True)
    s.add_argument("--preload", default=",".join(PRELOAD), help="modules to import first (comma-separated)")
    sub.add_parser("connect", help="what deploy/bin/flwr-clientapp runs, with Flower's arguments")
    ns = ap.parse_args(args)
    serve(ns.socket, [m for m in ns.preload.split(",") if m])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
