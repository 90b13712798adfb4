"""A hospital's audit trail: every message its node received and every reply it sent, hash-chained.

``<state>/audit.jsonl`` is append-only JSON Lines, one entry per event, written by the hospital
ClientApp (:mod:`medflower.client.hospital`) before it does any work (``received``) and before its
reply leaves (``sent``); ``medflower site ledger --reset`` adds ``ledger-reset``. An entry holds:

* ``seq`` (0, 1, ...), ``time`` (UTC), ``event``, ``run_id``, ``round``, ``message_type``;
* ``experiment_sha256``: :func:`experiment_fingerprint` of the experiment the message carried;
* ``arrays_sha256``: per ArrayRecord, :func:`arrays_fingerprint` of the arrays received or sent;
* on ``sent``: ``metrics`` (exactly the MetricRecord sent), ``epsilon_before`` / ``epsilon_after``
  (the data set's privacy ledger, DP-SGD only), ``refusal`` (the rule and why) and ``error``
  (``{"code", "ref"}`` of a contained error, :mod:`medflower.client.errors`);
* ``prev``: the sha256 of the previous line's bytes (64 zeros for the first).

Why a chain: each line's hash is in the next line, so editing a line or removing, inserting or
reordering lines breaks the chain at the next line. The last line has no successor, so
``audit.head`` records the last line's number and hash (written after each append): a truncated
log or an edited last line no longer matches it. :func:`verify` checks all of it and
``medflower site audit STATE_DIR`` prints the log and the verdict. The chain makes tampering
*detectable*, not impossible: whoever can write the folder can rewrite the whole chain and the head;
keeping a copy of ``audit.head`` elsewhere (or in a backup) anchors it.

Entries are canonical JSON (sorted keys, no spaces), so a line's hash does not depend on a writer's
formatting; a non-finite metric (NaN) is written as the string ``"NaN"``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from medflower.client.errors import AuditError
from medflower.fileio import atomic_write_text

AUDIT_FILE = "audit.jsonl"
HEAD_FILE = "audit.head"
GENESIS = "0" * 64


# ------------------------------------------------------------------------------------------ fingerprints
def _plain(value: Any) -> Any:
    """JSON-safe: non-finite floats become strings (JSON has no NaN), tuples lists, keys strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return _plain(value.item())
    return value


def canonical_json(value: Any) -> str:
    return json.dumps(_plain(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def experiment_fingerprint(experiment_json: str) -> str:
    """sha256 of the experiment as canonical JSON (a text that is not JSON is hashed as it is)."""
    try:
        return sha256_text(canonical_json(json.loads(experiment_json)))
    except ValueError:
        return sha256_text(experiment_json)


def arrays_fingerprint(record: ArrayRecord) -> str:
    """sha256 over the record's arrays in key order: each key, dtype, shape and C-order bytes, length-prefixed.

    Independent of Flower's serialisation, so a hospital can recompute it from a saved model.
    """
    h = hashlib.sha256()
    for key in sorted(record.keys()):
        x = np.ascontiguousarray(record[key].numpy())
        header = canonical_json([key, x.dtype.str, list(x.shape)]).encode()
        body = x.tobytes()
        h.update(len(header).to_bytes(8, "big") + header + len(body).to_bytes(8, "big") + body)
    return h.hexdigest()


def content_arrays(content: RecordDict) -> dict[str, str] | None:
    """``{record name: arrays_fingerprint}`` of every ArrayRecord in ``content`` (None: it has none)."""
    records = content.array_records
    return {name: arrays_fingerprint(rec) for name, rec in sorted(records.items())} if records else None


# ------------------------------------------------------------------------------------------ writing
def _last_line(f: IO[bytes]) -> bytes:
    """The file's last line without its newline (b"" for an empty file)."""
    f.seek(0, os.SEEK_END)
    end = f.tell()
    if end == 0:
        return b""
    f.seek(end - 1)
    if f.read(1) != b"\n":
        raise AuditError(
            f"{getattr(f, 'name', 'audit log')}: the last line is incomplete (a write was cut off); check it with "
            "`medflower site audit` and move the log aside to start a new one"
        )
    pos, chunk, tail = end - 1, 4096, b""
    while pos > 0:
        start = max(0, pos - chunk)
        f.seek(start)
        tail = f.read(pos - start) + tail
        pos = start
        if b"\n" in tail:
            break
    return tail.rsplit(b"\n", 1)[-1]


class AuditLog:
    """The append-only, hash-chained log in ``state_dir`` (see the module doc)."""

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / AUDIT_FILE
        self.head_path = self.dir / HEAD_FILE

    def _check_head(self, last: bytes, last_seq: int) -> None:
        """Before appending: the head must not be ahead of the log, nor disagree with its last line.

        Either means lines were removed or edited since the last append; continuing would overwrite
        the head, the evidence, so the node stops (:class:`AuditError`) until its operator has looked.
        """
        if not self.head_path.exists():
            if last:
                raise AuditError(f"{self.head_path} is missing while {self.path} has entries; verify the log")
            atomic_write_text(self.head_path, canonical_json({"seq": -1, "sha256": GENESIS}))
            return
        head = _read_head(self.head_path)
        if isinstance(head, str):
            raise AuditError(f"{self.head_path}: {head}")
        head_seq, head_sha = head
        if head_seq > last_seq:
            raise AuditError(f"{self.path} ends before the line {HEAD_FILE} records: the log was truncated")
        if head_seq == last_seq and last and hashlib.sha256(last).hexdigest() != head_sha:
            raise AuditError(f"{self.path}: its last line differs from what {HEAD_FILE} records: it was edited")

    def append(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Append one entry (``seq``, ``time`` and ``prev`` are added); returns it. Raises :class:`AuditError`.

        A lock on the file orders concurrent writers (one ClientApp process per message).
        """
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a+b") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                try:
                    last = _last_line(f)
                    seq = json.loads(last)["seq"] + 1 if last else 0
                    self._check_head(last, seq - 1)
                    now = time.time()
                    entry = {
                        **_plain(dict(fields)),
                        "seq": seq,
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
                        + f".{int(now * 1000) % 1000:03d}Z",
                        "prev": hashlib.sha256(last).hexdigest() if last else GENESIS,
                    }
                    line = canonical_json(entry).encode("ascii")
                    f.seek(0, os.SEEK_END)
                    f.write(line + b"\n")
                    f.flush()
                    os.fsync(f.fileno())
                    atomic_write_text(
                        self.head_path, canonical_json({"seq": seq, "sha256": hashlib.sha256(line).hexdigest()})
                    )
                finally:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        except AuditError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise AuditError(f"{self.path}: cannot append an entry: {type(err).__name__}: {err}") from err
        return entry


# ------------------------------------------------------------------------------------------ verifying
@dataclass
class AuditCheck:
    """The verdict of :func:`verify`: the entries read, the first problem (and its 1-based line), warnings."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    problem: str | None = None
    line: int | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None


def _read_head(path: Path) -> tuple[int, str] | str:
    """(seq, sha256) from ``audit.head``, or why it cannot be used."""
    if not path.is_file():
        return f"{path.name} is missing, so lines removed from the end could not be detected"
    try:
        head = json.loads(path.read_text(encoding="utf-8"))
        return int(head["seq"]), str(head["sha256"])
    except (ValueError, KeyError, TypeError) as err:
        return f"{path.name} is malformed ({err})"


def verify(state_dir: str | Path) -> AuditCheck:
    """Check the chain of ``<state_dir>/audit.jsonl`` and its head; the first broken line is reported."""
    log = AuditLog(state_dir)
    check = AuditCheck()
    if not log.path.is_file():
        check.problem = f"no audit log at {log.path}"
        return check
    data = log.path.read_bytes()
    lines = data.split(b"\n")
    if lines[-1] != b"":
        check.problem, check.line = "the last line is incomplete: the file was cut off (truncated mid-line)", len(lines)
        lines = lines[:-1]
    else:
        lines = lines[:-1]
    prev = GENESIS
    for i, raw in enumerate(lines):
        n = i + 1
        try:
            entry = json.loads(raw)
            if not isinstance(entry, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            check.problem, check.line = f"not a valid entry ({err}): edited or damaged", n
            return check
        if canonical_json(entry).encode("ascii") != raw:
            check.problem, check.line = "not in canonical form: the line was edited by hand", n
            return check
        if entry.get("prev") != prev:
            check.problem, check.line = (
                (
                    f"does not chain to line {n - 1}: line {n - 1} was edited, or lines before this one were "
                    "removed, inserted or reordered"
                    if n > 1
                    else "the first line does not start the chain: lines before it were removed"
                ),
                n,
            )
            return check
        if entry.get("seq") != i:
            check.problem, check.line = f"has seq {entry.get('seq')!r}, expected {i}: lines were reordered", n
            return check
        check.entries.append(entry)
        prev = hashlib.sha256(raw).hexdigest()
    if check.problem is not None:
        return check
    head = _read_head(log.head_path)
    if isinstance(head, str):
        check.problem, check.line = head, None
        return check
    head_seq, head_sha = head
    if head_seq >= len(lines):
        check.problem, check.line = (
            f"the log ends at line {len(lines)} but {HEAD_FILE} records {head_seq + 1} lines: lines were removed "
            "from the end (truncated)",
            len(lines) + 1,
        )
        return check
    if head_seq >= 0 and hashlib.sha256(lines[head_seq]).hexdigest() != head_sha:
        check.problem, check.line = f"differs from what {HEAD_FILE} recorded: the line was edited", head_seq + 1
        return check
    extra = len(lines) - 1 - head_seq
    if extra > 0:
        check.warnings.append(
            f"{extra} line(s) after the last one {HEAD_FILE} records (a node stopped between writing a line "
            "and its head, or lines were appended by hand)"
        )
    return check


# ------------------------------------------------------------------------------------------ printing
def _short(value: Any, width: int = 12) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ",".join(_short(v, 8) for v in value.values())
    return str(value)[:width]


def _eps(entry: Mapping[str, Any]) -> str:
    before, after = entry.get("epsilon_before"), entry.get("epsilon_after")
    if before is None and after is None:
        return "-"
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, (int, float)) else str(v))  # noqa: E731
    return f"{fmt(before)}->{fmt(after)}"


def _outcome(entry: Mapping[str, Any]) -> str:
    if entry.get("error"):
        err = entry["error"]
        return f"error {err.get('code')} ref {err.get('ref')}"
    if entry.get("refusal"):
        return f"refused {entry['refusal']}"
    if entry.get("event") == "ledger-reset":
        return f"{entry.get('ledger')}: {entry.get('reason')}"
    metrics = entry.get("metrics") or {}
    shown = {k: metrics[k] for k in ("num-examples", "train-loss", "eval-loss") if k in metrics}
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())


def format_table(entries: Iterable[Mapping[str, Any]]) -> list[str]:
    """A readable table of the entries: one row each (hashes shortened to 12 characters)."""
    header = ("line", "time (UTC)", "event", "run", "round", "type", "experiment", "arrays", "epsilon", "outcome")
    rows = [header]
    for e in entries:
        rows.append(
            (
                str(int(e.get("seq", -1)) + 1),
                str(e.get("time", ""))[:23],
                str(e.get("event", "")),
                _short(e.get("run_id")),
                _short(e.get("round")),
                _short(e.get("message_type")),
                _short(e.get("experiment_sha256")),
                _short(e.get("arrays_sha256")),
                _eps(e),
                _outcome(e),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows]


def run_audit(state_dir: str | Path, *, out: IO[str], quiet: bool = False) -> int:
    """``medflower site audit STATE_DIR``: print the log and verify it; 0 when the chain is intact."""
    check = verify(state_dir)
    if not quiet:
        for line in format_table(check.entries):
            print(line, file=out)
    for w in check.warnings:
        print(f"WARNING: {w}", file=out)
    if check.ok:
        print(f"audit log OK: {len(check.entries)} entries, chain and head intact", file=out)
        return 0
    where = f"line {check.line}: " if check.line is not None else ""
    print(f"audit log BROKEN: {where}{check.problem}", file=out)
    return 1
