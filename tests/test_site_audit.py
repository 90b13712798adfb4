"""The audit trail: every message received and reply sent, hash-chained; tampering of every kind is found."""

from __future__ import annotations

import io
import itertools
import json
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from sitekit import experiment, message, node, refusal_of, write_site

from medflower import keys
from medflower.cli.commands import main
from medflower.client.app import app as hospital_app
from medflower.client.audit import (
    AUDIT_FILE,
    HEAD_FILE,
    AuditLog,
    arrays_fingerprint,
    canonical_json,
    experiment_fingerprint,
    sha256_text,
    verify,
)
from medflower.client.errors import AuditError

SITE = "hospital-a"


def _log(tmp_path: Path, n: int = 5) -> Path:
    log = AuditLog(tmp_path)
    for i in range(n):
        log.append(
            {"event": "sent", "run_id": 1, "round": i + 1, "metrics": {"num-examples": 10 + i, "auc": float("nan")}}
        )
    return tmp_path


def _lines(state: Path) -> list[str]:
    return (state / AUDIT_FILE).read_text().splitlines(keepends=True)


def _write(state: Path, lines: list[str]) -> None:
    (state / AUDIT_FILE).write_text("".join(lines))


def _audit_cli(state: Path) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["site", "audit", str(state)])
    return code, out.getvalue()


# ------------------------------------------------------------------------------------------ the chain
def test_an_intact_log_verifies_and_prints(tmp_path: Path) -> None:
    state = _log(tmp_path)
    check = verify(state)
    assert check.ok and not check.warnings and [e["seq"] for e in check.entries] == [0, 1, 2, 3, 4]
    lines = _lines(state)
    assert json.loads(lines[0])["prev"] == "0" * 64
    assert all(json.loads(b)["prev"] == sha256_text(a.rstrip("\n")) for a, b in itertools.pairwise(lines))
    assert json.loads(lines[0])["metrics"]["auc"] == "nan"  # JSON has no NaN
    code, text = _audit_cli(state)
    assert code == 0 and "audit log OK: 5 entries" in text
    assert text.splitlines()[0].split()[:3] == ["line", "time", "(UTC)"] and "num-examples=14" in text


def _edit_field(lines: list[str], i: int) -> list[str]:
    entry = json.loads(lines[i])
    entry["metrics"]["num-examples"] = 10**9
    lines[i] = canonical_json(entry) + "\n"
    return lines


TAMPERING = {
    # name: (how, the first broken line verify reports)
    "edit a field": (lambda ls: _edit_field(ls, 1), 3),
    "edit the last line": (lambda ls: _edit_field(ls, 4), 5),
    "edit the formatting": (
        lambda ls: [*ls[:2], json.dumps(json.loads(ls[2]), indent=1).replace("\n", " ") + "\n", *ls[3:]],
        3,
    ),
    "delete a line": (lambda ls: ls[:2] + ls[3:], 3),
    "delete the first line": (lambda ls: ls[1:], 1),
    "reorder lines": (lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], 2),
    "truncate": (lambda ls: ls[:3], 4),
    "truncate mid-line": (lambda ls: [*ls[:4], ls[4][:40]], 5),
    "insert a line": (lambda ls: [*ls[:2], ls[1], *ls[2:]], 3),
}


@pytest.mark.parametrize("how, line", TAMPERING.values(), ids=TAMPERING.keys())
def test_tampering_is_found_at_the_first_broken_line(tmp_path: Path, how, line: int) -> None:
    state = _log(tmp_path)
    _write(state, how(_lines(state)))
    check = verify(state)
    assert not check.ok and check.line == line, (check.line, check.problem)
    code, text = _audit_cli(state)
    assert code == 1 and f"audit log BROKEN: line {line}: " in text


def test_a_missing_head_is_reported(tmp_path: Path) -> None:
    state = _log(tmp_path)
    (state / HEAD_FILE).unlink()
    check = verify(state)
    assert not check.ok and "audit.head is missing" in str(check.problem)
    assert _audit_cli(tmp_path / "nothing")[0] == 1  # no log at all is no proof either


def test_a_node_stopped_between_a_line_and_its_head_is_a_warning_not_a_break(tmp_path: Path) -> None:
    state = _log(tmp_path, 3)
    head = (state / HEAD_FILE).read_text()
    AuditLog(state).append({"event": "received"})
    (state / HEAD_FILE).write_text(head)  # the head's update was lost
    check = verify(state)
    assert check.ok and check.warnings and "1 line(s) after" in check.warnings[0]


def test_the_writer_stops_on_a_tampered_log_instead_of_hiding_it(tmp_path: Path) -> None:
    state = _log(tmp_path)
    _write(state, _lines(state)[:3])  # truncated: appending would overwrite the head, the evidence
    with pytest.raises(AuditError, match="truncated"):
        AuditLog(state).append({"event": "received"})
    state2 = _log(tmp_path / "b")
    _write(state2, _edit_field(_lines(state2), 4))
    with pytest.raises(AuditError, match="edited"):
        AuditLog(state2).append({"event": "received"})


# ------------------------------------------------------------------------------------------ fingerprints
def test_fingerprints_are_canonical() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.ones(3, dtype=np.int64)
    one = ArrayRecord({"w": Array(a), "b": Array(b)})
    two = ArrayRecord({"b": Array(b.copy()), "w": Array(a.copy())})
    assert arrays_fingerprint(one) == arrays_fingerprint(two)  # key order does not matter
    changed = a.copy()
    changed[1, 2] = np.nextafter(changed[1, 2], np.inf)
    assert arrays_fingerprint(ArrayRecord({"w": Array(changed), "b": Array(b)})) != arrays_fingerprint(one)
    assert arrays_fingerprint(ArrayRecord({"w": Array(a.reshape(3, 2)), "b": Array(b)})) != arrays_fingerprint(one)
    assert arrays_fingerprint(ArrayRecord({"w": Array(a.astype(np.float64)), "b": Array(b)})) != arrays_fingerprint(one)
    assert experiment_fingerprint('{"b": 1, "a": [1, 2]}') == experiment_fingerprint('{"a":[1,2],"b":1}')


# ------------------------------------------------------------------------------------------ the hospital node
def test_a_hospital_node_logs_every_message_and_reply(tmp_path: Path, flower_identity) -> None:
    site = write_site(tmp_path / "export", SITE, n=12, policy={"allow_test_evaluation": False}, state_dir="state")
    state = tmp_path / "export" / "state"
    exp = experiment()
    train_msg = message(exp, "train", server_round=3)
    replies = [
        hospital_app(train_msg, node(site, run_id=4)),
        hospital_app(message(exp, "evaluate", server_round=3), node(site, run_id=4)),
        hospital_app(message(exp, "evaluate", server_round=3, split="test"), node(site, run_id=4)),
    ]
    check = verify(state)
    assert check.ok, check.problem
    entries = check.entries
    assert [(e["event"], e["message_type"]) for e in entries] == [
        ("received", "train"),
        ("sent", "train"),
        ("received", "evaluate"),
        ("sent", "evaluate"),
        ("received", "evaluate"),
        ("sent", "evaluate"),
    ]
    assert all(e["run_id"] == 4 and e["round"] == 3 for e in entries)
    assert {e["experiment_sha256"] for e in entries} == {sha256_text(canonical_json(json.loads(exp.to_json())))}
    assert entries[0]["arrays_sha256"] == {keys.ARRAYS: arrays_fingerprint(train_msg.content[keys.ARRAYS])}
    sent_train = entries[1]
    assert sent_train["arrays_sha256"] == {keys.ARRAYS: arrays_fingerprint(replies[0].content[keys.ARRAYS])}
    assert sent_train["metrics"] == pytest.approx(dict(replies[0].content[keys.METRICS]))
    assert sent_train["refusal"] is None and sent_train["error"] is None and sent_train["epsilon_before"] is None
    assert entries[3]["arrays_sha256"] is None and entries[3]["metrics"][keys.NUM_EXAMPLES] > 0
    assert entries[5]["refusal"] == refusal_of(replies[2]) and str(refusal_of(replies[2])).startswith(
        "policy.allow_test_evaluation: "
    )
    code, text = _audit_cli(state)
    assert code == 0 and "refused policy.allow_test_evaluation" in text


def test_a_node_whose_log_cannot_be_continued_sends_no_weights(tmp_path: Path, flower_identity) -> None:
    site = write_site(tmp_path / "export", SITE, n=8, state_dir="state")
    state = tmp_path / "export" / "state"
    exp = experiment()
    assert not hospital_app(message(exp), node(site)).has_error()
    _write(state, _lines(state)[:1])  # someone removed the last line
    reply = hospital_app(message(exp, server_round=2), node(site))
    assert reply.has_error() and reply.error.reason.startswith("audit-error: ") and "(ref " in reply.error.reason
    assert not reply.has_content()


def test_a_node_without_a_state_folder_keeps_no_log(tmp_path: Path, flower_identity) -> None:
    site = write_site(tmp_path / "export", SITE, n=8)
    assert not hospital_app(message(experiment()), node(site)).has_error()
    assert not list(tmp_path.rglob(AUDIT_FILE))
