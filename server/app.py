"""medflower's ServerApp: the coordinator (``server.app:app``).

It builds the initial model from the experiment config, runs the rounds through the configured
strategy, evaluates the global model on the held-out test split after each round (server-side),
collects the sites' own evaluations and writes ``summary.json`` to the output folder.

The experiment comes from ``run_config["experiment"]`` (a YAML path; empty = embedded quick start)
under ``flwr run``, or is bound directly by ``medflower simulate`` through :func:`build_server_app`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from medflower import keys
from medflower.config import ExperimentConfig, load_experiment, quickstart_experiment
from medflower.modelspec import build_experiment_model
from server.loop import run_rounds
from server.results import write_summary
from strategies import build_strategy


def experiment_from_run_config(context: Context) -> ExperimentConfig:
    path = str(context.run_config.get(keys.RUN_EXPERIMENT, "") or "")
    return load_experiment(path) if path else quickstart_experiment()


def output_dir_from_run_config(context: Context, exp: ExperimentConfig) -> Path:
    out = str(context.run_config.get(keys.RUN_OUTPUT, "") or "")
    return Path(out) if out else Path("runs") / f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def make_global_evaluate(exp: ExperimentConfig):
    """Server-side evaluation on the data set's held-out test split (None if there is none)."""
    from medflower.data import load_dataset
    from medflower.tasks import evaluate

    test = load_dataset(exp).test
    if len(test) == 0:
        return None
    model = build_experiment_model(exp)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        model.load_state_dict(arrays.to_torch_state_dict())
        return evaluate(model, test, task=exp.task, batch_size=exp.train.eval_batch_size)

    return evaluate_fn


def run_server(grid: Grid, exp: ExperimentConfig, out_dir: Path, *, num_sites: int | None = None) -> Path:
    """Run the whole federation for ``exp`` and write ``out_dir/summary.json``; returns its path."""
    t0 = time.time()
    torch.manual_seed(exp.seed)
    torch.set_num_threads(max(1, exp.train.num_threads))
    num_sites = num_sites or exp.partition.num_sites
    model = build_experiment_model(exp)
    strategy = build_strategy(exp, num_sites=num_sites)
    base = {keys.EXPERIMENT: exp.to_json()}
    hist = run_rounds(
        grid, strategy,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=exp.train.rounds,
        train_config=ConfigRecord(base),
        evaluate_config=ConfigRecord({**base, keys.EVAL_SPLIT: "val"}),
        timeout=exp.participation.round_timeout,
        min_sites=exp.participation.min_sites,
        on_too_few=exp.participation.on_too_few,
        evaluate_fn=make_global_evaluate(exp),
    )
    return write_summary(out_dir, exp, hist, wall_seconds=time.time() - t0)


def build_server_app(exp: ExperimentConfig | None = None, out_dir: str | Path | None = None) -> ServerApp:
    """A ServerApp bound to ``exp``/``out_dir``, or reading both from the run config when None."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        e = exp or experiment_from_run_config(context)
        out = Path(out_dir) if out_dir else output_dir_from_run_config(context, e)
        run_server(grid, e, out)

    return server_app


app = build_server_app()
