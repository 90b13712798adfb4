"""medflower's ServerApp: the coordinator (``medflower.server.app:app``).

It builds the initial model from the experiment config, runs the rounds through the configured
strategy, evaluates the global model on the held-out test split after each round (server-side),
collects the sites' own evaluations and writes ``summary.json`` to the output folder.

The experiment comes from ``run_config["experiment"]`` (a YAML path; empty = embedded quick start)
under ``flwr run``, or is bound directly by ``medflower simulate`` through :func:`build_server_app`.
"""

from __future__ import annotations

import os
import time
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

import medflower._preload  # noqa: F401  (before any MONAI import: see its docstring)
from medflower import keys
from medflower.config import ExperimentConfig, load_experiment, quickstart_experiment
from medflower.modelspec import initial_model
from medflower.runenv import default_output_dir
from medflower.seeding import seed_everything
from medflower.server.build import build_round
from medflower.server.checkpoint import RUN_CHECKPOINT_DIR, resume_or_start
from medflower.server.featurestats import standardise_head
from medflower.server.globaltest import GlobalTest, PreparationMismatch
from medflower.server.identity import read_directory
from medflower.server.loop import History, RoundAborted, run_rounds
from medflower.server.participation import relax_availability, wait_for_sites
from medflower.server.results import write_summary
from medflower.server.tracking import tracking_for

FINAL_MODEL_FILE = "model.pt"  # torch state dict of the final global model, beside summary.json


def experiment_from_run_config(context: Context) -> ExperimentConfig:
    path = str(context.run_config.get(keys.RUN_EXPERIMENT, "") or "")
    return load_experiment(path) if path else quickstart_experiment()


def output_dir_from_run_config(context: Context, exp: ExperimentConfig) -> Path:
    out = str(context.run_config.get(keys.RUN_OUTPUT, "") or "")
    return Path(out) if out else default_output_dir(exp.name)


def checkpoint_dir_from_run_config(context: Context, out_dir: Path) -> Path:
    """``run_config["checkpoint-dir"]``, else ``<output-dir>/checkpoint`` (resume = same output-dir)."""
    ckpt = str(context.run_config.get(RUN_CHECKPOINT_DIR, "") or "")
    return Path(ckpt) if ckpt else Path(out_dir) / "checkpoint"


def site_directory_from_run_config(context: Context) -> Path | None:
    """The site directory a deployed coordinator names its sites by (None: names from replies)."""
    path = str(context.run_config.get(keys.RUN_SITE_DIRECTORY, "") or os.environ.get(keys.ENV_SITE_DIRECTORY, ""))
    return Path(path) if path else None


def make_global_evaluate(exp: ExperimentConfig) -> GlobalTest | None:
    """Server-side evaluation on the data set's held-out test split (None if there is none)."""
    test = GlobalTest(exp)
    return test if test.runs else None


def run_server(grid: Grid, exp: ExperimentConfig, out_dir: Path, **kwargs: Any) -> Path:
    """:func:`federate`, tracked (TensorBoard, MLflow) when the experiment has a ``tracking:`` section."""
    with tracking_for(exp, Path(out_dir)):
        return federate(grid, exp, out_dir, **kwargs)


def federate(
    grid: Grid,
    exp: ExperimentConfig,
    out_dir: Path,
    *,
    num_sites: int | None = None,
    checkpoint_dir: Path | None = None,
    site_directory: Path | None = None,
) -> Path:
    """Run the whole federation for ``exp`` and write ``out_dir/summary.json``; returns its path.

    With ``checkpoint_dir`` every round is checkpointed there and a run that finds a checkpoint
    resumes after its round (see ``medflower.server.checkpoint``). With ``site_directory`` every reply
    must come from a registered node, under its registered name (see ``medflower.server.identity``).
    """
    t0 = time.time()
    seed_everything(exp.seed)  # the initial model's weights (medflower.seeding)
    torch.set_num_threads(max(1, exp.train.num_threads))
    num_sites = num_sites or exp.partition.num_sites
    model = initial_model(exp)  # seeded random weights, or model.init's
    parts = build_round(
        exp, num_sites=num_sites, site_directory=site_directory
    )  # the method (registry), privacy stage and screens
    global_test = GlobalTest(exp)  # the coordinator's data, prepared as the sites prepare theirs
    if global_test.runs:  # after the identity screen: a reply's preparation is compared once it is known whose
        parts.screens.insert(1 if site_directory is not None else 0, global_test)
    base = ConfigRecord({keys.EXPERIMENT: exp.to_json()})
    arrays, start, hist, on_round_end = ArrayRecord(model.state_dict()), 1, History(), None
    if checkpoint_dir is not None:
        start, arrays, hist, on_round_end = resume_or_start(checkpoint_dir, exp, parts, arrays)
    hist.global_test_note = global_test.note
    names = None
    if site_directory is not None and Path(site_directory).is_file():
        names = parts.refresh_identity  # the waiting line names hospitals by their registered names
        for site in read_directory(site_directory).values():  # fingerprints as `medflower deploy sites` prints them
            log(INFO, "registered: %s (node %d, key sha256 %s)", site.name, site.node_id, site.key_sha256[:16])
    wait_for_sites(grid, expected=num_sites, policy=exp.participation, names=names)
    relax_availability(parts.base, exp.participation)  # later rounds go ahead without a dropped site
    if exp.privacy.feature_stats_noise is not None and start == 1:  # a resumed run's model already carries them
        registered = parts.refresh_identity() if site_directory is not None else None
        arrays, hist.feature_stats = standardise_head(
            grid, exp, arrays, timeout=exp.participation.round_timeout, registered=registered
        )
    try:
        hist = run_rounds(
            grid,
            parts,
            initial_arrays=arrays,
            num_rounds=exp.train.rounds,
            train_config=base,
            evaluate_config=ConfigRecord({**base, keys.EVAL_SPLIT: "val"}),
            timeout=exp.participation.round_timeout,
            min_sites=exp.participation.min_sites,
            on_too_few=exp.participation.on_too_few,
            evaluate_fn=global_test if global_test.runs else None,
            on_round_end=on_round_end,
            start_round=start,
            history=hist,
            seed=exp.seed,
        )
    except PreparationMismatch as err:
        log(ERROR, "run refused: %s", err)
        hist.initial_global_test = {}  # scored on the coordinator's preparation, which the sites do not share
        hist.global_test_note = f"run refused: {err}"
        write_summary(out_dir, exp, hist, wall_seconds=time.time() - t0)
        raise
    except RoundAborted:
        write_summary(out_dir, exp, hist, wall_seconds=time.time() - t0)  # what ran is still reported
        raise
    if hist.arrays is not None:  # the final global model: `medflower compare` evaluates it on every site
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        torch.save(hist.arrays.to_torch_state_dict(), Path(out_dir) / FINAL_MODEL_FILE)
    return write_summary(out_dir, exp, hist, wall_seconds=time.time() - t0)


def build_server_app(exp: ExperimentConfig | None = None, out_dir: str | Path | None = None) -> ServerApp:
    """A ServerApp bound to ``exp``/``out_dir``, or reading both from the run config when None."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        e = exp or experiment_from_run_config(context)
        out = Path(out_dir) if out_dir else output_dir_from_run_config(context, e)
        ckpt = checkpoint_dir_from_run_config(context, out) if exp is None else None  # flwr run only
        directory = site_directory_from_run_config(context) if exp is None else None
        if exp is None and directory is None:
            log(WARNING, "no site directory (run config site-directory): site names are taken from replies, unverified")
        run_server(grid, e, out, checkpoint_dir=ckpt, site_directory=directory)

    return server_app


app = build_server_app()
