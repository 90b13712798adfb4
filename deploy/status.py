"""``medflower deploy status``: the administrator's view of the federation, in one table.

Flower's ``flwr supernode ls`` lists node ids and their status but no hospital names, and ``flwr ls``
lists runs but not how far one has come. The site directory (:mod:`medflower.deploy.sites`) knows
the names and key fingerprints, and a run's output folder holds its checkpoint digest (the last
round done) and, once it ends, ``summary.json``. This joins the three, read-only: for every
registered hospital its name, node id, key fingerprint (16 hex digits, as ``medflower node
fingerprint`` and ``medflower node check`` print it) and whether it is connected or when it was
last seen; then the runs Flower reports as running, and, for each ``--output-dir`` given, the round
its checkpoint reached.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medflower.deploy.sites import FlwrError, flwr_json, list_nodes, read_sites

DIGEST = Path("checkpoint") / "checkpoint.json"  # medflower.server.checkpoint's digest, in an output-dir


@dataclass(frozen=True)
class NodeRow:
    name: str
    node_id: int
    key_sha256: str
    seen: str  # "connected since ...", "last seen ...", "never connected", ...


def _seen(node: dict[str, Any] | None) -> str:
    """Flower's node record (``flwr supernode ls --format json``) in words."""
    if node is None:
        return "not known to Flower (registered with another SuperLink?)"
    status = str(node.get("status", ""))
    if status == "online":
        return f"connected (since {node.get('online-at') or '?'})"
    if status == "offline":
        return f"not connected; last seen {node.get('offline-at') or node.get('online-at') or '?'}"
    if status == "registered":
        return "never connected"
    return status or "unknown"


def node_rows(directory: Path, nodes: list[dict[str, Any]] | None) -> list[NodeRow]:
    """Every registered site with what Flower says of its node (``nodes`` None: Flower not asked)."""
    by_id = {str(n.get("node-id")): n for n in nodes or []}
    return [
        NodeRow(
            s.name,
            s.node_id,
            s.key_sha256[:16],
            _seen(by_id.get(str(s.node_id))) if nodes is not None else "unknown (Flower not asked)",
        )
        for s in sorted(read_sites(directory).values(), key=lambda s: s.name)
    ]


def run_progress(output_dir: Path) -> str:
    """How far the run writing to ``output_dir`` has come, from its checkpoint digest and summary."""
    digest_path = Path(output_dir) / DIGEST
    summary = Path(output_dir) / "summary.json"
    try:
        digest = json.loads(digest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        digest = None
    except (OSError, ValueError) as err:
        return f"{output_dir}: unreadable checkpoint digest {digest_path} ({err})"
    rounds = None
    try:
        exp = json.loads(summary.read_text(encoding="utf-8")).get("experiment", {}) if summary.is_file() else {}
        rounds = exp.get("train", {}).get("rounds")
    except (OSError, ValueError):
        pass
    if digest is None:
        return f"{output_dir}: no round finished yet (no {DIGEST})"
    done = f"round {digest.get('round')}" + (f" of {rounds}" if rounds else "")
    state = "finished, summary.json written" if summary.is_file() else "in progress"
    name, saved = digest.get("experiment_name", "?"), digest.get("saved_at", "?")
    return f"{output_dir}: experiment {name}: {done} done ({state}; saved {saved})"


def _table(header: tuple[str, ...], body: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *body]
    )


def status_report(
    directory: Path, *, connection: str | None = None, output_dirs: list[Path] | None = None, ask_flower: bool = True
) -> str:
    """The text ``medflower deploy status`` prints."""
    nodes: list[dict[str, Any]] | None = None
    runs: list[dict[str, Any]] = []
    notes: list[str] = []
    if ask_flower:
        try:
            nodes = list_nodes(connection)
            runs = list(flwr_json(["ls", *([connection] if connection else [])], what="list runs").get("runs", []))
        except FlwrError as err:
            notes.append(f"Flower not reachable: {err}")
    rows = node_rows(directory, nodes)
    lines = [f"hospitals registered in {directory}:"]
    if rows:
        lines.append(
            _table(
                ("site", "node id", "key sha256", "connection"),
                [(r.name, str(r.node_id), r.key_sha256, r.seen) for r in rows],
            )
        )
    else:
        lines.append("  none (medflower deploy register)")
    running = [r for r in runs if str(r.get("status", "")).startswith(("running", "starting", "pending"))]
    if nodes is not None:
        lines.append("runs in progress: " + (", ".join(f"{r['run-id']} ({r['status']})" for r in running) or "none"))
    lines += [run_progress(d) for d in output_dirs or []]
    return "\n".join([*lines, *notes])
