"""A hospital's state folder: what its node keeps across node restarts and across runs.

Flower keeps a node's ``context.state`` for one run, in memory: a restarted SuperNode, or the next
run, starts empty. What must outlive both lives in one folder the hospital names, node config
``state-dir`` (``start-hospital.sh --state DIR``) or ``state_dir:`` in its site YAML (relative to
the YAML; if both are given they must name the same folder)::

    <state>/privacy-ledger-<site>-<data key>.json   the DP-SGD ledger of one data set (client/privacy.py)
    <state>/audit.jsonl, audit.head                 every message received and reply sent (client/audit.py)
    <state>/errors.log                              full errors behind the reference ids sent (client/errors.py)
    <state>/policy-rounds.json                      training rounds taken per run (policy.max_rounds)
    <state>/ledger-archive/                         ledgers a hospital reset (``medflower site ledger --reset``)

**What counts as the same data set** (:func:`data_key`): the site's name and the *source* its site
YAML names: ``data.kind`` and the resolved ``data.path`` (the manifest, the ``dataset.json`` or the
folder). Not the files' contents, sizes or modification times, on purpose. Differential privacy
protects people, and the patients behind a data set stay the same when its files are re-exported,
touched, restored from a backup or extended with new images; a key built from contents would start
a fresh ledger at epsilon 0 on each such change, under-counting what those patients have already
spent: the one error a ledger must never make. Keyed by the source, every change inside a data set
keeps counting (the conservative error: over-counting); a new ledger begins only when the hospital
edits its site YAML to name another site or another source, or resets the ledger deliberately
(:func:`reset_ledger`, which archives the old file and records the reset in the audit log).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context

from medflower import keys
from medflower.fileio import atomic_write_text
from medflower.schema import ConfigError

LEDGER_PREFIX = "privacy-ledger-"
ARCHIVE_DIR = "ledger-archive"
ROUNDS_FILE = "policy-rounds.json"
ROUNDS_STATE_KEY = "site-policy"  # context.state ConfigRecord: training rounds taken, by run id
ROUNDS_FORMAT = 1


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def node_state_dir(context: Context) -> Path | None:
    """The node config's ``state-dir`` (None when unset); ``checkpoint-dir`` alone is an error.

    ``checkpoint-dir`` once held the privacy ledger; a node that still sets it expects its ledger to
    persist, so quietly keeping it in memory instead would restart its epsilon at 0.
    """
    folder = str(context.node_config.get(keys.NODE_STATE_DIR, "") or "")
    if folder:
        return Path(folder).expanduser()
    if str(context.node_config.get(keys.NODE_CHECKPOINT_DIR, "") or ""):
        raise ConfigError(
            f"node config {keys.NODE_CHECKPOINT_DIR!r} no longer holds the privacy ledger; name the node's "
            f"state folder with {keys.NODE_STATE_DIR!r} instead (and move privacy-ledger-*.json into it)"
        )
    return None


def resolve_state_dir(
    context: Context, yaml_state_dir: Path | None, *, site_yaml: str | Path = "site YAML"
) -> Path | None:
    """The hospital's state folder: node config ``state-dir`` or the site YAML's ``state_dir`` (resolved).

    Both given and naming different folders is an error naming both: a ledger split over two
    folders would under-count.
    """
    from_node = node_state_dir(context)
    if from_node is not None and yaml_state_dir is not None and from_node.resolve() != yaml_state_dir.resolve():
        raise ConfigError(
            f"node config {keys.NODE_STATE_DIR}={str(from_node)!r} and {site_yaml}: state_dir="
            f"{str(yaml_state_dir)!r} name different state folders; give one of them, or the same folder"
        )
    return from_node if from_node is not None else yaml_state_dir


def data_key(*, kind: str, source: str) -> str:
    """The ledger's data-set key: sha256 of the data source (see the module doc for why not contents)."""
    return hashlib.sha256(json.dumps({"kind": kind, "source": source}, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class LedgerPlace:
    """Where one data set's privacy ledger lives (``path`` None: in ``context.state`` only)."""

    path: Path | None
    data_key: str


def ledger_file(state_dir: Path, site: str, key: str) -> Path:
    return Path(state_dir) / f"{LEDGER_PREFIX}{_safe(site)}-{key[:16]}.json"


def node_ledger_place(context: Context, exp: Any, site: str) -> LedgerPlace:
    """A node without a site YAML (simulated sites): its state folder from node config, the data set from
    the experiment's ``data`` source."""
    path = exp.resolve_path(exp.data.path)
    key = data_key(kind=exp.data.kind, source=str(path.resolve()) if path is not None else "")
    state = node_state_dir(context)
    return LedgerPlace(ledger_file(state, site, key) if state is not None else None, key)


# ------------------------------------------------------------------------------ policy.max_rounds counter
def _rounds_file(state_dir: Path) -> Path:
    return Path(state_dir) / ROUNDS_FILE


def _read_rounds(state_dir: Path | None) -> dict[str, int]:
    if state_dir is None or not _rounds_file(state_dir).is_file():
        return {}
    path = _rounds_file(state_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        runs = data["runs"] if data.get("format") == ROUNDS_FORMAT else None
        if not isinstance(runs, dict):
            raise ValueError("expected {'format': 1, 'runs': {run id: rounds}}")
        return {str(k): int(v) for k, v in runs.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: malformed ({err}); refusing to guess how many rounds were trained") from err


def rounds_trained(context: Context, state_dir: Path | None, run_id: int) -> int:
    """Training rounds this node accepted in run ``run_id``: the larger of ``context.state`` and the file."""
    in_state = 0
    if ROUNDS_STATE_KEY in context.state:
        in_state = int(context.state.config_records[ROUNDS_STATE_KEY].get(str(run_id), 0))  # type: ignore[arg-type]
    return max(in_state, _read_rounds(state_dir).get(str(run_id), 0))


def count_round(context: Context, state_dir: Path | None, run_id: int) -> int:
    """Record one more training round accepted in ``run_id`` (before training: a crash still counts)."""
    n = rounds_trained(context, state_dir, run_id) + 1
    rec = context.state.config_records.get(ROUNDS_STATE_KEY) or ConfigRecord()
    rec[str(run_id)] = n
    context.state[ROUNDS_STATE_KEY] = rec
    if state_dir is not None:
        runs = _read_rounds(state_dir) | {str(run_id): n}
        atomic_write_text(_rounds_file(state_dir), json.dumps({"format": ROUNDS_FORMAT, "runs": runs}, sort_keys=True))
    return n


# ------------------------------------------------------------------------------ ledgers: list and reset
@dataclass(frozen=True)
class LedgerInfo:
    """One ledger file, as ``medflower site ledger`` shows it."""

    path: Path
    site: str
    data_key: str
    mechanism: str
    steps: int
    rounds: int
    runs: tuple[int, ...]
    delta: float | None  # the delta of its last round (None: not recorded)
    epsilon: float | None  # spent at that delta


def list_ledgers(state_dir: str | Path) -> list[LedgerInfo]:
    """Every privacy ledger in ``state_dir``; a malformed one is an error naming the file."""
    from medflower.client.privacy import PrivacyLedger  # here: it imports torch and Opacus

    out = []
    for path in sorted(Path(state_dir).glob(f"{LEDGER_PREFIX}*.json")):
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            ledger = PrivacyLedger.from_json(
                json.dumps(raw),
                site=str(raw["site"]),
                mechanism=str(raw["mechanism"]),
                data_key=raw.get("data_key", ""),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a readable privacy ledger ({err})") from err
        ledger.settle_pending()
        deltas = [r["delta"] for r in ledger.rounds if r.get("delta") is not None]
        delta = float(deltas[-1]) if deltas else None
        out.append(
            LedgerInfo(
                path=path,
                site=ledger.site,
                data_key=ledger.data_key,
                mechanism=ledger.mechanism,
                steps=ledger.steps,
                rounds=len(ledger.rounds),
                runs=tuple(sorted({int(r["run_id"]) for r in ledger.rounds if r.get("run_id") is not None})),
                delta=delta,
                epsilon=ledger.epsilon(delta) if delta is not None else None,
            )
        )
    return out


def reset_ledger(state_dir: str | Path, ledger: LedgerInfo, *, reason: str) -> Path:
    """Move ``ledger`` to ``<state>/ledger-archive/`` (kept, never deleted) and record the reset in the
    audit log; the data set's next round starts a new ledger at epsilon 0. Returns the archived path."""
    from medflower.client.audit import AuditLog  # here: audit imports numpy (and the CLI lists first)

    if not reason.strip():
        raise ValueError("a ledger reset needs a reason: it is recorded in the audit log")
    archive = Path(state_dir) / ARCHIVE_DIR
    archive.mkdir(parents=True, exist_ok=True)
    target = archive / f"{ledger.path.stem}.reset-{time.strftime('%Y%m%dT%H%M%S')}.json"
    AuditLog(state_dir).append(
        {
            "event": "ledger-reset",
            "ledger": ledger.path.name,
            "archived_as": f"{ARCHIVE_DIR}/{target.name}",
            "site": ledger.site,
            "data_key": ledger.data_key,
            "steps": ledger.steps,
            "epsilon_before": ledger.epsilon,
            "epsilon_after": 0.0,
            "delta": ledger.delta,
            "reason": reason,
        }
    )
    ledger.path.replace(target)
    return target
