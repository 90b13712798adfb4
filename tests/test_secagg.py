"""SecAgg+ in whole (tiny, synthetic) federations: the wire, the arithmetic, the dropouts, the methods.

The runs use the in-process grid (the real ServerApp loop and ClientApp, no Ray). A recording grid
keeps a copy of every message the coordinator receives; a capturing ClientApp keeps each site's
plaintext update *at the site* (before the SecAgg+ mod masks it). Faults are injected per protocol
stage: a site falls silent, or its reply is corrupted on the way.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from medflower import keys
from medflower.client.app import build_client_app
from medflower.config import ExperimentConfig, PrivacyConfig, SecureAggregationConfig, quickstart_experiment
from medflower.config.strategy import StrategyConfig
from medflower.server.app import FINAL_MODEL_FILE
from medflower.simulation.inprocess import InProcessGrid, simulate_inprocess
from medflower.simulation.sites import load_partition

SECAGG = SecureAggregationConfig(mode="secagg+")


def tiny(*, rounds: int = 1, sites: int = 3, name: str = "fedavg", secagg: bool = True, **sa: Any) -> ExperimentConfig:
    """Synthetic images, a small CNN, plain SGD (a tame map from update to model, for comparisons)."""
    exp = quickstart_experiment()
    return replace(
        exp,
        data=replace(exp.data, synthetic_samples=40 * sites),
        partition=replace(exp.partition, num_sites=sites, kind="iid"),
        train=replace(exp.train, rounds=rounds, optimizer="sgd", lr=0.05, batch_size=16),
        strategy=StrategyConfig(name=name),
        participation=replace(exp.participation, min_sites=2),  # a round may lose a site (default: none)
        secure_aggregation=replace(SECAGG, **sa) if secagg else SecureAggregationConfig(),
    )


class Capture:
    """A ClientApp transform that records, at the site, the plaintext arrays it is about to send."""

    def __init__(self) -> None:
        self.updates: dict[str, dict[str, np.ndarray]] = {}  # site -> key -> y - x_global
        self.models: dict[str, dict[str, np.ndarray]] = {}

    def __call__(self, arrays: ArrayRecord, global_arrays: ArrayRecord, exp: Any, site: str) -> ArrayRecord:
        self.models[site] = {k: np.array(a.numpy(), dtype=np.float64) for k, a in arrays.items()}
        self.updates[site] = {k: v - global_arrays[k].numpy().astype(np.float64) for k, v in self.models[site].items()}
        return arrays


def stage_of(msg: Message) -> str | None:
    cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return None if cfg is None else str(cfg.get(Key.STAGE))


class FaultGrid(InProcessGrid):
    """Records every reply (a deep copy, before the coordinator touches it); drops or corrupts on cue.

    ``silent``: (node id, stage) pairs whose message gets no reply; ``corrupt``: (node id, stage) ->
    a function that mangles the reply.
    """

    def __init__(self, client_app: Any, *, num_sites: int) -> None:
        super().__init__(client_app, num_sites=num_sites)
        self.silent: set[tuple[int, str]] = set()
        self.corrupt: dict[tuple[int, str], Callable[[Message], None]] = {}
        self.received: list[tuple[str | None, Message]] = []

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        msgs = list(messages)
        stages = {id(m): stage_of(m) for m in msgs}  # the site's mod pops the stage from the record
        kept = [m for m in msgs if (int(m.metadata.dst_node_id), stages[id(m)]) not in self.silent]
        replies = list(super().send_and_receive(kept, timeout=timeout))
        by_id = {m.metadata.message_id: stages[id(m)] for m in kept}
        for reply in replies:
            stage = by_id.get(reply.metadata.reply_to_message_id)
            mangle = self.corrupt.get((int(reply.metadata.src_node_id), str(stage)))
            if mangle is not None and not reply.has_error():
                mangle(reply)
            self.received.append((stage, copy.deepcopy(reply)))
        return replies


def run(exp: ExperimentConfig, tmp_path: Path, **faults: Any) -> tuple[dict[str, Any], FaultGrid, Capture]:
    capture = Capture()
    grid = FaultGrid(
        build_client_app(load_site=load_partition, transform_update=capture), num_sites=exp.partition.num_sites
    )
    grid.silent = faults.get("silent", set())
    grid.corrupt = faults.get("corrupt", {})
    summary = simulate_inprocess(exp, tmp_path, grid=grid)
    return summary, grid, capture


def final_model(tmp_path: Path) -> dict[str, np.ndarray]:
    state = torch.load(tmp_path / FINAL_MODEL_FILE)
    return {k: v.numpy().astype(np.float64) for k, v in state.items()}


def weighted_mean(updates: dict[str, dict[str, np.ndarray]], weights: dict[str, float]) -> dict[str, np.ndarray]:
    total = sum(weights[s] for s in updates)
    return {k: sum(weights[s] * updates[s][k] for s in updates) / total for k in next(iter(updates.values()))}


def initial_model(exp: ExperimentConfig) -> dict[str, np.ndarray]:
    from medflower.modelspec import build_experiment_model

    torch.manual_seed(exp.seed)
    return {k: v.numpy().astype(np.float64) for k, v in build_experiment_model(exp).state_dict().items()}


def check_mean(summary: dict[str, Any], capture: Capture, tmp_path: Path, exp: ExperimentConfig, sites: set[str]):
    """(b): the new global model is the plaintext weighted mean of ``sites``' updates, within the bound."""
    rec = summary["rounds"][0]
    assert rec["aggregated"], rec
    weights = {s: min(rec["sites_train"][s][keys.NUM_EXAMPLES], exp.secure_aggregation.max_weight) for s in sites}
    mean = weighted_mean({s: capture.updates[s] for s in sites}, weights)
    start = {k: capture.models[next(iter(sites))][k] - capture.updates[next(iter(sites))][k] for k in mean}
    got = final_model(tmp_path)
    bound = rec["secure_aggregation"]["quantization_error_bound"]
    for k, v in mean.items():
        expected = start[k] + v
        tol = bound + 1e-6 * (1 + np.abs(expected))  # plus float32 rounding of the stored model
        assert np.all(np.abs(got[k] - expected) <= tol), (k, float(np.max(np.abs(got[k] - expected))), bound)


# ---------------------------------------------------------------------------------------- the wire


def leaks(grid: FaultGrid, capture: Capture) -> list[str]:
    """Received arrays that equal, or correlate with, a site's plaintext update or model (captured at the site)."""
    received = [
        a.numpy()
        for _, m in grid.received
        if not m.has_error()
        for r in m.content.array_records.values()
        for a in r.values()
    ]
    assert received, "the coordinator received no arrays"
    plaintext = [v for s in capture.updates for v in (*capture.updates[s].values(), *capture.models[s].values())]
    assert plaintext
    found = []
    for a in received:
        x = a.astype(np.float64).ravel()
        for p in plaintext:
            y = p.ravel()
            if x.size != y.size:
                continue
            if np.allclose(x, y):
                found.append(f"an array of {x.size} equals a plaintext one")
            elif x.size >= 64 and x.std() > 0 and y.std() > 0:
                r = float(np.corrcoef(x, y)[0, 1])
                if abs(r) >= 6 / np.sqrt(x.size):  # 6 standard errors of r for independent data
                    found.append(f"an array of {x.size} correlates with a plaintext one (r={r:.3f})")
    return found


def test_the_wire_check_sees_unmasked_updates(tmp_path, flower_identity, monkeypatch):
    """The detector of the wire test has power: with the sites' masks switched off it finds the updates."""
    import medflower.client.secagg as site_secagg

    monkeypatch.setattr(
        site_secagg, "pseudo_rand_gen", lambda seed, num_range, shapes: [np.zeros(s, np.int64) for s in shapes]
    )
    _, grid, capture = run(tiny(), tmp_path)
    assert any("correlates" in leak for leak in leaks(grid, capture))


def test_wire_carries_no_individual_update_and_the_sum_is_the_weighted_mean(tmp_path, flower_identity):
    exp = tiny()
    summary, grid, capture = run(exp, tmp_path)
    rec = summary["rounds"][0]
    info = rec["secure_aggregation"]
    assert info["collect_masked_vectors"] == 3 and not rec["failures"] and "not_aggregated" not in info
    # (a) every array the coordinator received, at every stage
    for stage, m in grid.received:
        if not m.has_error():
            assert set(m.content.array_records) <= {keys.SECAGG_MASKED}, (stage, list(m.content.array_records))
    assert leaks(grid, capture) == []
    # (b) the unmasked aggregate is the plaintext weighted mean, within the quantization error
    check_mean(summary, capture, tmp_path, exp, set(capture.updates))


def test_five_rounds_match_the_same_run_without_secagg(tmp_path, flower_identity):
    """(c): identical seeds; the two runs differ only by SecAgg+'s quantization (and float order)."""
    rounds = 5
    with_sa, _, _ = run(tiny(rounds=rounds), tmp_path / "secagg")
    run(tiny(rounds=rounds, secagg=False), tmp_path / "plain")
    a, b = final_model(tmp_path / "secagg"), final_model(tmp_path / "plain")
    bound = sum(r["secure_aggregation"]["quantization_error_bound"] for r in with_sa["rounds"])
    scale = max(float(np.max(np.abs(v))) for v in b.values())
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in b)
    # each round's error is at most its bound; training maps a model difference to a comparable update difference
    assert worst <= 10 * bound + 1e-6 * scale, (worst, bound)
    assert [r["aggregated"] for r in with_sa["rounds"]] == [True] * rounds


# ---------------------------------------------------------------------------------------- dropouts

FIRST = 1001  # the in-process grid's first node id (site-0)


@pytest.mark.parametrize("stage", [Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK])
def test_one_site_drops_at_each_stage_and_the_round_recovers(stage, tmp_path, flower_identity):
    exp = tiny()
    summary, _, capture = run(exp, tmp_path, silent={(FIRST, stage)})
    rec = summary["rounds"][0]
    assert rec["aggregated"], rec["secure_aggregation"]
    failed = [f for f in rec["failures"] if f["node_id"] == FIRST]
    assert failed and failed[0]["stage"] == stage and "no reply" in failed[0]["reason"]
    # a site that trained and then dropped (its update masked into nothing) is left out of the mean;
    # one that dropped at unmask had its vector summed: its seed is rebuilt from the others' shares
    contributed = set(capture.updates) if stage == Stage.UNMASK else set(capture.updates) - {failed[0]["site"]}
    if stage == Stage.COLLECT_MASKED_VECTORS:
        assert rec["secure_aggregation"]["recovered_dropouts"] == [failed[0]["site"]]
        capture.updates.pop(failed[0]["site"], None)  # it never sent: silence hides what it computed
    check_mean(summary, capture, tmp_path, exp, contributed & set(capture.updates))


def test_below_the_threshold_the_round_is_not_aggregated_and_says_why(tmp_path, flower_identity):
    exp = tiny()
    silent = {(FIRST, Stage.COLLECT_MASKED_VECTORS), (FIRST + 1, Stage.COLLECT_MASKED_VECTORS)}
    summary, _, _ = run(exp, tmp_path, silent=silent)
    rec = summary["rounds"][0]
    assert not rec["aggregated"]
    why = rec["secure_aggregation"]["not_aggregated"]
    assert "collect_masked_vectors" in why and "reconstruction_threshold 2" in why
    start = initial_model(exp)
    got = final_model(tmp_path)
    assert all(np.array_equal(got[k], start[k]) for k in start)  # the global model stayed as it was


def test_a_malformed_masked_vector_is_excluded_and_named(tmp_path, flower_identity):
    def drop_an_entry(reply: Message) -> None:
        rec = reply.content.array_records[keys.SECAGG_MASKED]
        del rec[next(iter(rec.keys()))]

    exp = tiny()
    summary, _, capture = run(exp, tmp_path, corrupt={(FIRST, Stage.COLLECT_MASKED_VECTORS): drop_an_entry})
    rec = summary["rounds"][0]
    bad = [f for f in rec["failures"] if f["node_id"] == FIRST]
    assert bad and bad[0]["reason"].startswith("rejected masked vector")
    assert rec["secure_aggregation"]["recovered_dropouts"] == [bad[0]["site"]]
    check_mean(summary, capture, tmp_path, exp, set(capture.updates) - {bad[0]["site"]})


def test_malformed_shares_are_excluded_and_named(tmp_path, flower_identity):
    def bad_owner(reply: Message) -> None:
        reply.content.config_records[RECORD_KEY_CONFIGS][Key.NODE_ID_LIST] = [99999]

    exp = tiny()
    summary, _, capture = run(exp, tmp_path, corrupt={(FIRST, Stage.UNMASK): bad_owner})
    rec = summary["rounds"][0]
    bad = [f for f in rec["failures"] if f["node_id"] == FIRST]
    assert bad and bad[0]["stage"] == Stage.UNMASK and "malformed shares" in bad[0]["reason"]
    check_mean(summary, capture, tmp_path, exp, set(capture.updates))  # its vector was summed; 2 shares suffice


# ---------------------------------------------------------------------------------------- methods


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedprox", "scaffold"])
def test_methods_on_the_mean_run_under_secagg(name, tmp_path, flower_identity):
    summary, grid, _ = run(tiny(rounds=2, name=name), tmp_path)
    assert all(r["aggregated"] for r in summary["rounds"]), [r["secure_aggregation"] for r in summary["rounds"]]
    assert all(not r["failures"] for r in summary["rounds"])
    masked_keys = {
        k for _, m in grid.received if not m.has_error() for r in m.content.array_records.values() for k in r
    }
    if name == "scaffold":  # the control variate changes are masked too
        assert any(k.startswith("scaffold-dc/") for k in masked_keys)


def test_scaffold_control_variate_is_the_uniform_mean_of_the_sites(tmp_path, flower_identity):
    """After round 1 (every c_i was 0) the server's c is (|S|/N) mean(dc_i) = mean(c_i+): read back from round 2."""
    from medflower.strategies.methods.scaffold import SCAFFOLD_C, STATE_CI

    class Spy(FaultGrid):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.cis: list[dict[str, np.ndarray]] = []
            self.c: dict[str, np.ndarray] = {}

        def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
            msgs = list(messages)
            for m in msgs:
                rnd = m.content.config_records[keys.CONFIG].get(keys.SERVER_ROUND)
                if rnd == 2 and not self.cis:  # the sites' c_i+ as round 1 left them
                    self.cis = [
                        {k: a.numpy().copy() for k, a in c.state[STATE_CI].items()} for c in self.contexts.values()
                    ]
                if rnd == 2 and SCAFFOLD_C in m.content.array_records and not self.c:
                    self.c = {k: a.numpy().copy() for k, a in m.content.array_records[SCAFFOLD_C].items()}
            return super().send_and_receive(msgs, timeout=timeout)

    exp = tiny(rounds=2, name="scaffold")
    grid = Spy(build_client_app(load_site=load_partition), num_sites=3)
    summary = simulate_inprocess(exp, tmp_path, grid=grid)
    assert all(r["aggregated"] for r in summary["rounds"])
    assert grid.cis and grid.c
    step = 2 * exp.secure_aggregation.clipping_range / exp.secure_aggregation.quantization_range
    for k, c in grid.c.items():
        expected = np.mean([ci[k] for ci in grid.cis], axis=0)
        assert np.max(np.abs(c - expected)) <= step + 1e-6 * (1 + np.max(np.abs(expected))), k


@pytest.mark.parametrize("stage", [Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK])
def test_ring_of_neighbours_recovers_a_dropout(stage, tmp_path, flower_identity):
    """5 sites, each sharing with 3 (itself and 2 neighbours): recovery uses only the neighbours' shares."""
    exp = tiny(sites=5, num_shares=3, reconstruction_threshold=2)
    summary, _, capture = run(exp, tmp_path, silent={(FIRST + 2, stage)})
    rec = summary["rounds"][0]
    assert rec["secure_aggregation"]["num_shares"] == 3
    site = next(f["site"] for f in rec["failures"] if f["node_id"] == FIRST + 2)
    contributed = set(capture.updates) - ({site} if stage == Stage.COLLECT_MASKED_VECTORS else set())
    check_mean(summary, capture, tmp_path, exp, contributed)


def test_the_hospital_clientapp_speaks_the_protocol(tmp_path, flower_identity):
    """The deployment's ClientApp (site YAMLs, the hospital's guard and audit log): a SecAgg+ federation of
    3 hospitals; the key stages are not counted as training rounds by a site's ``policy.max_rounds``."""
    from sitekit import experiment, write_site

    from medflower.client.app import app as hospital_app

    exp = experiment(
        partition={"num_sites": 3},
        secure_aggregation={"mode": "secagg+"},
        strategy={"fraction_evaluate": 0.0},
    )
    configs = []
    for i in range(3):
        policy = {"max_rounds": exp.train.rounds} if i == 0 else None
        state = str(tmp_path / f"state-{i}")
        site = write_site(tmp_path / f"h{i}", f"hospital-{i}", policy=policy, state_dir=state, seed=i)
        configs.append({keys.NODE_SITE_CONFIG: str(site)})
    grid = FaultGrid(hospital_app, num_sites=3)
    grid.contexts = {n: replace(c, node_config=cfg) for (n, c), cfg in zip(grid.contexts.items(), configs, strict=True)}
    summary = simulate_inprocess(exp, tmp_path / "out", grid=grid)
    for rec in summary["rounds"]:
        assert rec["aggregated"] and not rec["failures"] and not rec["refusals"], rec
        assert set(rec["sites_train"]) == {"hospital-0", "hospital-1", "hospital-2"}
    for _, m in grid.received:
        assert not m.has_error() and set(m.content.array_records) <= {keys.SECAGG_MASKED}


@pytest.mark.parametrize(
    "privacy",
    [
        PrivacyConfig(mode="client", clipping_side="client", clipping_norm=1.0),  # sites clip, then mask
        PrivacyConfig(mode="sample", target_epsilon=8.0),  # DP-SGD at each site
    ],
    ids=["client-side-clipping", "sample-dp"],
)
def test_site_side_dp_combines_with_secagg(privacy, tmp_path, flower_identity):
    summary, grid, _ = run(replace(tiny(rounds=2), privacy=privacy), tmp_path)
    for rec in summary["rounds"]:
        assert rec["aggregated"] and not rec["failures"], rec["failures"]
        assert keys.DP_EPSILON in rec["train"]
    assert all(set(m.content.array_records) <= {keys.SECAGG_MASKED} for _, m in grid.received if not m.has_error())


def test_secagg_through_flowers_simulation_engine(tmp_path):
    """``medflower simulate``'s path (Flower's engine, Ray workers): node state persists between the stages."""
    from medflower.simulation.runner import simulate

    summary = simulate(tiny(rounds=2), tmp_path)
    for rec in summary["rounds"]:
        assert rec["aggregated"] and not rec["failures"], rec
        assert rec["secure_aggregation"]["collect_masked_vectors"] == 3


def test_a_site_whose_masked_weight_differs_from_its_claim_shows(tmp_path, flower_identity):
    """A site that reports one number of examples in the clear and weighs its update by another."""
    import medflower.client.secagg as site_secagg

    real = site_secagg.quantize_groups

    def inflated(groups: Any, *, weight: float, **kw: Any) -> Any:
        return real(groups, weight=weight * 2, **kw)

    summary, _, _ = run(tiny(), tmp_path)
    assert "weight_mismatch" not in summary["rounds"][0]["secure_aggregation"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(site_secagg, "quantize_groups", inflated)
        summary, _, _ = run(tiny(), tmp_path / "inflated")
    mismatch = summary["rounds"][0]["secure_aggregation"]["weight_mismatch"]
    assert mismatch["masked"] == pytest.approx(2 * mismatch["claimed"], rel=1e-4)


def _garble_shares(reply: Message) -> None:
    """Well-formed but wrong: every share this site reveals is XORed with bytes of its own (lengths kept).

    Not one constant pattern: Shamir works in GF(2^128), where the same XOR on an even number of shares
    can cancel out in the interpolation."""
    import hashlib

    cfg = reply.content.config_records[RECORD_KEY_CONFIGS]
    shares = list(cfg[Key.SHARE_LIST])  # type: ignore[arg-type]
    pads = [
        hashlib.sha256(s + reply.metadata.reply_to_message_id.encode()).digest() * (len(s) // 32 + 1) for s in shares
    ]
    cfg[Key.SHARE_LIST] = [
        s[:4] + bytes(b ^ p for b, p in zip(s[4:], pad, strict=False)) for s, pad in zip(shares, pads, strict=True)
    ]


def test_wrong_shares_are_detected_their_sender_named_and_the_sum_still_right(tmp_path, flower_identity):
    """3 sites, threshold 2: each seed has 3 shares, one wrong; the other two rebuild the committed seed."""
    exp = tiny()
    summary, _, capture = run(exp, tmp_path, corrupt={(FIRST, Stage.UNMASK): _garble_shares})
    rec = summary["rounds"][0]
    bad = [f for f in rec["failures"] if f["node_id"] == FIRST]
    assert bad and all(f["stage"] == Stage.UNMASK and "sent a wrong share" in f["reason"] for f in bad)
    check_mean(summary, capture, tmp_path, exp, set(capture.updates))


def test_wrong_shares_of_a_dropped_sites_key_are_left_out(tmp_path, flower_identity):
    """5 sites sharing with all 5, threshold 3: site 2 drops while training (its key is rebuilt from 4 shares),
    site 0 reveals wrong shares; 3 good shares remain for every secret."""
    exp = tiny(sites=5, num_shares=5, reconstruction_threshold=3)
    summary, _, capture = run(
        exp,
        tmp_path,
        silent={(FIRST + 2, Stage.COLLECT_MASKED_VECTORS)},
        corrupt={(FIRST, Stage.UNMASK): _garble_shares},
    )
    rec = summary["rounds"][0]
    assert rec["aggregated"], rec["secure_aggregation"]
    assert any(f["node_id"] == FIRST and "sent a wrong share" in f["reason"] for f in rec["failures"])
    dropped = next(f["site"] for f in rec["failures"] if f["node_id"] == FIRST + 2)
    check_mean(summary, capture, tmp_path, exp, set(capture.updates) - {dropped})


def test_too_many_wrong_shares_stop_the_round_with_the_reason(tmp_path, flower_identity):
    exp = tiny()
    corrupt = {(FIRST, Stage.UNMASK): _garble_shares, (FIRST + 1, Stage.UNMASK): _garble_shares}
    summary, _, _ = run(exp, tmp_path, corrupt=corrupt)
    rec = summary["rounds"][0]
    assert not rec["aggregated"]
    assert "rebuild it (wrong shares)" in rec["secure_aggregation"]["not_aggregated"]
