"""Registering hospitals: Flower's node registration and the coordinator's site directory, together.

Flower's SuperLink knows node ids and public keys but not which hospital a key belongs to
(``flwr supernode ls`` shows no names), and the coordinator must name every reply by the node that
sent it, never by what the reply says (``medflower.server.identity``). So registering a hospital
is two writes that must agree: ``flwr supernode register`` (the key may connect) and an entry in
the site directory the ServerApp reads every round (node id -> name, key fingerprint, declared
data set size). :func:`register_site` and :func:`unregister_site` do both, in the order that never
leaves a directory entry without a registered key:

* register: check the name and key are new, ``flwr supernode register``, then write the entry
  (if that write fails, the key is unregistered again);
* unregister: ``flwr supernode unregister``, then remove the entry (a key Flower no longer knows
  is removed from the directory too).

The directory is written atomically (temporary file, fsync, rename) under an exclusive lock, so a
ServerApp reading it mid-round sees the old or the new file, and two administrators never lose
each other's entry. Its format is the one :func:`medflower.server.identity.read_directory` reads.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from medflower.deploy.certs import check_site_name, key_sha256
from medflower.fileio import atomic_write_text
from medflower.keys import ENV_SITE_DIRECTORY
from medflower.server.identity import DIRECTORY_FORMAT, RegisteredSite, read_directory

FLWR_TIMEOUT_S = 120


class FlwrError(RuntimeError):
    """A ``flwr`` command failed; the message carries its output."""


@dataclass(frozen=True)
class SiteStatus:
    site: RegisteredSite
    status: str  # Flower's node status (online, offline, registered, unregistered) or "unknown"


def directory_path(directory: str | Path | None) -> Path:
    """``--directory``, else ``$MEDFLOWER_SITE_DIRECTORY`` (what start-coordinator.sh exports)."""
    value = str(directory or os.environ.get(ENV_SITE_DIRECTORY, ""))
    if not value:
        raise ValueError(
            f"--directory: give the coordinator's site directory (start-coordinator.sh uses <state>/sites.json) "
            f"or set {ENV_SITE_DIRECTORY}"
        )
    return Path(value)


def read_sites(path: Path) -> dict[int, RegisteredSite]:
    """The directory's entries; a missing file is an empty directory (nobody registered yet)."""
    return read_directory(path) if path.is_file() else {}


def _write(path: Path, sites: dict[int, RegisteredSite]) -> None:
    entries: dict[str, dict[str, Any]] = {}
    for node, s in sorted(sites.items(), key=lambda kv: kv[1].name):
        entry: dict[str, Any] = {"name": s.name, "key_sha256": s.key_sha256}
        if s.declared_examples is not None:
            entry["declared_examples"] = s.declared_examples
        entries[str(node)] = entry
    atomic_write_text(path, json.dumps({"format": DIRECTORY_FORMAT, "sites": entries}, indent=2) + "\n")
    read_directory(path)  # what the ServerApp will read: fail here, not mid-run


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def flwr_json(args: list[str], *, what: str) -> dict[str, Any]:
    """Run ``flwr ... --format json`` and return its JSON; FlwrError with its output otherwise."""
    exe = shutil.which("flwr")
    if exe is None:
        raise FlwrError("the `flwr` command is not on PATH (it comes with the flwr package)")
    try:
        res = subprocess.run([exe, *args, "--format", "json"], capture_output=True, text=True, timeout=FLWR_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise FlwrError(f"`flwr {' '.join(args)}` did not answer within {FLWR_TIMEOUT_S}s ({what})") from err
    out = res.stdout
    try:
        data = json.loads(out[out.index("{") :])
    except ValueError:
        data = {}
    if res.returncode != 0 or not data.get("success", False):
        detail = (data.get("error-message") if data else None) or (res.stderr or out).strip()[-2000:]
        raise FlwrError(f"`flwr {' '.join(args)}` failed ({what}): {detail}")
    return data


def _connection_args(connection: str | None) -> list[str]:
    return [connection] if connection else []


def _load_public_key(pub: Path) -> str:
    if not pub.is_file():
        raise ValueError(f"--key {pub}: file not found (the hospital's <site>.pub)")
    text = pub.read_text(encoding="utf-8").strip()
    try:
        key = serialization.load_ssh_public_key(text.encode())
    except (ValueError, TypeError) as err:
        raise ValueError(f"--key {pub}: not an OpenSSH public key ({err})") from err
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"--key {pub}: Flower needs an EC (NIST curve) key, got {type(key).__name__}")
    return text


def register_site(
    *,
    directory: Path,
    name: str,
    pub: Path,
    declared_examples: int | None = None,
    connection: str | None = None,
) -> RegisteredSite:
    """Register ``pub`` with the SuperLink under ``name`` and record it in the site directory."""
    check_site_name(name)
    if declared_examples is not None and declared_examples < 1:
        raise ValueError(f"--declared-examples must be a whole number >= 1, got {declared_examples}")
    fingerprint = key_sha256(_load_public_key(pub))
    with _locked(directory):
        sites = read_sites(directory)
        for s in sites.values():
            if s.name == name:
                raise ValueError(
                    f"--name {name}: already registered as node {s.node_id} in {directory}; "
                    "unregister it first (medflower deploy unregister --name) to replace its key"
                )
            if s.key_sha256 == fingerprint:
                raise ValueError(f"--key {pub}: this key is already registered, for site {s.name!r} (node {s.node_id})")
        data = flwr_json(["supernode", "register", str(pub), *_connection_args(connection), "--name", name], what=name)
        node_id = int(data["node-id"])
        if node_id in sites:
            raise ValueError(
                f"{directory}: node {node_id} is already listed (as {sites[node_id].name!r}) although Flower just "
                "assigned it; the directory is stale: unregister that name first"
            )
        site = RegisteredSite(node_id, name, fingerprint, declared_examples)
        try:
            _write(directory, {**sites, node_id: site})
        except BaseException:
            flwr_json(["supernode", "unregister", str(node_id), *_connection_args(connection)], what="undo")
            raise
    return site


def unregister_site(*, directory: Path, name: str, connection: str | None = None) -> RegisteredSite:
    """Unregister ``name``'s key from the SuperLink and remove it from the site directory.

    Flower refuses the node at once (its next request is answered 401 and the SuperNode stops); the
    ServerApp re-reads the directory at the start of each round, so from the next round on any
    reply from that node id is rejected as unregistered.
    """
    with _locked(directory):
        sites = read_sites(directory)
        match = [s for s in sites.values() if s.name == name]
        if not match:
            known = ", ".join(sorted(s.name for s in sites.values())) or "none"
            raise ValueError(f"--name {name}: not in {directory} (registered: {known})")
        site = match[0]
        nodes = {n["node-id"]: n.get("status", "") for n in list_nodes(connection)}
        if nodes.get(str(site.node_id), "unregistered") != "unregistered":
            flwr_json(["supernode", "unregister", str(site.node_id), *_connection_args(connection)], what=name)
        _write(directory, {n: s for n, s in sites.items() if n != site.node_id})
    return site


def list_nodes(connection: str | None = None) -> list[dict[str, Any]]:
    """Flower's node list (``flwr supernode ls --format json``)."""
    return list(flwr_json(["supernode", "ls", *_connection_args(connection)], what="list nodes").get("nodes", []))


def site_statuses(directory: Path, *, connection: str | None = None, ask_flower: bool = True) -> list[SiteStatus]:
    """Every registered site with Flower's status for its node ("unknown" when not asked or unreachable)."""
    sites = read_sites(directory)
    status: dict[str, str] = {}
    if ask_flower and sites:
        try:
            status = {str(n["node-id"]): str(n.get("status", "")) for n in list_nodes(connection)}
        except FlwrError:
            status = {}
    return [
        SiteStatus(s, status.get(str(s.node_id), "not known to Flower" if status else "unknown"))
        for s in sorted(sites.values(), key=lambda s: s.name)
    ]


def format_sites(rows: list[SiteStatus]) -> str:
    """A table: name, node id, key fingerprint (16 hex digits, as `medflower node check` prints), size, status."""
    header = ("site", "node id", "key sha256", "declared examples", "status")
    body = [
        (
            r.site.name,
            str(r.site.node_id),
            r.site.key_sha256[:16],
            "" if r.site.declared_examples is None else str(r.site.declared_examples),
            r.status,
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *body]
    )
