"""The hospital's privacy ledger survives: a state folder (node config or site YAML), epsilon that keeps
counting across node restarts and across runs for the same data set, and a deliberate, audited reset."""

from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml
from sitekit import experiment, message, node, write_png, write_site

from medflower import keys
from medflower.cli.commands import main
from medflower.client.app import app as hospital_app
from medflower.client.audit import verify
from medflower.client.hospital import HospitalNode
from medflower.client.privacy import _epsilon_of, site_plan
from medflower.client.state import ARCHIVE_DIR, list_ledgers, resolve_state_dir
from medflower.config import ExperimentConfig
from medflower.schema import ConfigError

SITE = "hospital-a"
N = 16  # images listed; 8 train after the 25% / 25% split


def _dp(rounds: int = 4) -> ExperimentConfig:
    return experiment(
        train={"rounds": rounds, "batch_size": 4},
        privacy={"mode": "sample", "target_epsilon": 30.0, "target_delta": 1e-3},
    )


def _metrics(reply) -> dict:
    assert not reply.has_error(), reply.error
    return dict(reply.content[keys.METRICS])


def _plan(exp: ExperimentConfig):
    return site_plan(exp, site=SITE, num_train=N // 2)


def _eps(exp: ExperimentConfig, steps: int) -> float:
    plan = _plan(exp)
    return _epsilon_of("rdp", [(plan.noise_multiplier, plan.sample_rate, steps)], plan.target_delta)


# ------------------------------------------------------------------------------------------ the folder
def test_state_folder_from_node_config_or_site_yaml(tmp_path: Path) -> None:
    site = write_site(tmp_path / "export", SITE, n=2, state_dir="../state")
    yaml_dir = HospitalNode.of(node(site)).state_dir
    assert yaml_dir is not None and yaml_dir.resolve() == (tmp_path / "state").resolve()  # relative to the YAML
    assert HospitalNode.of(node(site, **{keys.NODE_STATE_DIR: str(tmp_path / "state")})).state_dir is not None
    other = str(tmp_path / "elsewhere")
    with pytest.raises(ConfigError) as err:
        HospitalNode.of(node(site, **{keys.NODE_STATE_DIR: other}))
    assert f"node config state-dir={other!r}" in str(err.value) and "state_dir='" in str(err.value)
    assert str(site) in str(err.value)
    bare = write_site(tmp_path / "bare", SITE, n=2)
    assert HospitalNode.of(node(bare)).state_dir is None
    assert HospitalNode.of(node(bare, **{keys.NODE_STATE_DIR: other})).state_dir == Path(other)


def test_checkpoint_dir_alone_is_an_error_not_a_ledger_in_memory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'checkpoint-dir' no longer holds the privacy ledger; .* 'state-dir'"):
        resolve_state_dir(node(None, **{keys.NODE_CHECKPOINT_DIR: str(tmp_path)}), None)


# ------------------------------------------------------------------------------------------ epsilon keeps counting
def test_epsilon_keeps_counting_across_a_node_restart_and_a_second_run(tmp_path: Path, flower_identity) -> None:
    site = write_site(tmp_path / "export", SITE, n=N)
    state = str(tmp_path / "state")
    exp = _dp()
    steps = _plan(exp).steps_per_round
    m1 = _metrics(hospital_app(message(exp, server_round=1), node(site, run_id=11, **{keys.NODE_STATE_DIR: state})))
    assert m1[keys.DP_STEPS] == steps and m1[keys.DP_EPSILON] == pytest.approx(_eps(exp, steps))
    # the node restarts mid-run: a new Context (Flower's context.state is gone), the same state folder
    m2 = _metrics(hospital_app(message(exp, server_round=2), node(site, run_id=11, **{keys.NODE_STATE_DIR: state})))
    assert m2[keys.DP_STEPS] == 2 * steps and m2[keys.DP_EPSILON] == pytest.approx(_eps(exp, 2 * steps))
    # a second run (new run id) on the same data set continues the same ledger
    m3 = _metrics(hospital_app(message(exp, server_round=1), node(site, run_id=12, **{keys.NODE_STATE_DIR: state})))
    assert m3[keys.DP_STEPS] == 3 * steps and m3[keys.DP_EPSILON] == pytest.approx(_eps(exp, 3 * steps))
    assert m1[keys.DP_EPSILON] < m2[keys.DP_EPSILON] < m3[keys.DP_EPSILON]
    (ledger,) = list_ledgers(state)
    assert ledger.site == SITE and ledger.steps == 3 * steps and ledger.runs == (11, 12) and ledger.rounds == 3
    assert ledger.epsilon == pytest.approx(m3[keys.DP_EPSILON])
    # the audit log saw the same epsilon, before and after each round
    sent = [e for e in verify(state).entries if e["event"] == "sent"]
    assert [e["epsilon_before"] for e in sent] == pytest.approx([0.0, m1[keys.DP_EPSILON], m2[keys.DP_EPSILON]])
    assert [e["epsilon_after"] for e in sent] == pytest.approx([m[keys.DP_EPSILON] for m in (m1, m2, m3)])


def test_a_run_that_would_exceed_the_budget_with_earlier_runs_is_refused(tmp_path: Path, flower_identity) -> None:
    """The budget caps what the data set has spent over all runs, not only this one."""
    site = write_site(tmp_path / "export", SITE, n=N, state_dir="state")
    exp = _dp(rounds=2)  # the noise spends (almost) the whole budget in 2 rounds
    for rnd in (1, 2):
        assert _metrics(hospital_app(message(exp, server_round=rnd), node(site, run_id=1)))[keys.DP_EXHAUSTED] == 0
    again = _metrics(
        hospital_app(message(exp, server_round=1), node(site, run_id=2))
    )  # the same experiment, resubmitted
    assert again[keys.DP_EXHAUSTED] == 1 and again[keys.NUM_EXAMPLES] == 0


def test_same_data_is_the_source_the_site_yaml_names_not_the_files_contents(tmp_path: Path, flower_identity) -> None:
    site = write_site(tmp_path / "export", SITE, n=N, state_dir="../state")
    exp = _dp()
    steps = _plan(exp).steps_per_round
    hospital_app(message(exp, server_round=1), node(site))
    # re-exported / touched files and an added image: the same patients, the same ledger
    write_png(tmp_path / "export" / "images" / "img_000.png", 0, seed=99)
    os.utime(tmp_path / "export" / "manifest.csv", (1, 1))
    with (tmp_path / "export" / "manifest.csv").open("a") as f:
        write_png(tmp_path / "export" / "images" / "new.png", 1, seed=98)
        f.write("images/new.png,1\n")
    m = _metrics(hospital_app(message(exp, server_round=2), node(site)))
    assert m[keys.DP_STEPS] > steps  # kept counting
    assert len(list_ledgers(tmp_path / "state")) == 1
    # another data source named by the site YAML is another data set: its own ledger
    other = write_site(tmp_path / "other", SITE, n=N, state_dir="../state")
    m = _metrics(hospital_app(message(exp, server_round=1), node(other)))
    assert m[keys.DP_STEPS] == steps
    assert sorted(led.steps for led in list_ledgers(tmp_path / "state"))[0] == steps
    assert len(list_ledgers(tmp_path / "state")) == 2


# ------------------------------------------------------------------------------------------ a deliberate reset
def test_a_reset_is_deliberate_archived_and_audited(tmp_path: Path, flower_identity) -> None:
    site = write_site(tmp_path / "export", SITE, n=N, state_dir="../state")
    state = tmp_path / "state"
    exp = _dp()
    steps = _plan(exp).steps_per_round
    for rnd in (1, 2):
        hospital_app(message(exp, server_round=rnd), node(site))

    def cli(*args: str) -> tuple[int, str]:
        out = io.StringIO()
        with redirect_stdout(out):
            code = main(["site", "ledger", str(state), *args])
        return code, out.getvalue()

    code, text = cli()
    assert code == 0 and f"site {SITE}" in text and f"{2 * steps} steps in 2 round(s)" in text and "epsilon " in text
    code, _ = cli("--reset")  # a reset needs a reason
    assert code == 2 and len(list_ledgers(state)) == 1
    code, text = cli("--reset", "--reason", "new consent period approved by the DPO")
    assert code == 0 and "archived" in text
    assert list_ledgers(state) == [] and len(list((state / ARCHIVE_DIR).glob("*.json"))) == 1
    check = verify(state)
    assert check.ok, check.problem
    reset = [e for e in check.entries if e["event"] == "ledger-reset"]
    assert len(reset) == 1 and reset[0]["reason"] == "new consent period approved by the DPO"
    assert reset[0]["steps"] == 2 * steps and reset[0]["epsilon_before"] > 0 and reset[0]["epsilon_after"] == 0
    # the data set's next round starts a new ledger
    m = _metrics(hospital_app(message(exp, server_round=3), node(site)))
    assert m[keys.DP_STEPS] == steps


def test_ledger_files_are_json_a_hospital_can_read(tmp_path: Path, flower_identity) -> None:
    site = write_site(tmp_path / "export", SITE, n=N, state_dir="state")
    hospital_app(message(_dp(), server_round=1), node(site, run_id=5))
    (path,) = (tmp_path / "export" / "state").glob("privacy-ledger-*.json")
    data = json.loads(path.read_text())
    assert data["site"] == SITE and len(data["data_key"]) == 64 and data["pending"] is None
    assert data["rounds"][0]["run_id"] == 5 and data["rounds"][0]["delta"] == 1e-3
    assert yaml.safe_load((tmp_path / "export" / "site.yaml").read_text())["state_dir"] == "state"
