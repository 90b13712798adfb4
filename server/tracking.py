"""Experiment tracking on the coordinator: TensorBoard scalars and MLflow runs (``tracking:`` section).

A :class:`Tracker` observes the round loop (:mod:`medflower.progress`), so every way of running the
ServerApp (``flwr run``, ``medflower simulate``, the in-process grid) logs the same things:

* per round: the global test metrics (``global_test/<metric>``), the aggregated site validation
  (``evaluate/<metric>``) and training (``train/<metric>``), each site's validation and training metrics
  (``site/<name>/<metric>``), ε spent per site (``privacy/epsilon/<name>``), the round's seconds and
  sites trained (``round/...``);
* MLflow also: the flattened resolved config as params, and at the end the artifacts
  ``summary.json``, ``report.html`` (written then) and ``model.pt``.

Only the coordinator's aggregate view is logged: what the sites reported to it anyway, nothing more.
TensorBoard's writer is torch's ``SummaryWriter``, which writes through the ``tensorboard`` package.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.common.logger import log

from medflower import progress
from medflower.config import ConfigError, ExperimentConfig, TrackingConfig
from medflower.config.tracking import LOCAL

EXTRA_HINT = 'pip install -e ".[tracking]"'
ARTIFACTS = ("summary.json", "report.html", "model.pt")


def require_extra(cfg: TrackingConfig) -> None:
    """Fail before any round when a configured backend's package is missing (the ``tracking`` extra)."""
    for key, module in (("tensorboard", "tensorboard"), ("mlflow", "mlflow")):
        if getattr(cfg, key) is None:
            continue
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(
                f"tracking.{key}: the {module} package is not installed; install the tracking extra: "
                f"{EXTRA_HINT} ({err})"
            ) from err


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": "0.1"}`` (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out |= flatten(v, key + ".")
        else:
            out[key] = str(v)[:6000]
    return out


def round_scalars(record: Any) -> dict[str, float]:
    """The scalars of one round's record (a :class:`medflower.server.loop.RoundRecord`)."""
    out: dict[str, float] = {}

    def put(key: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)

    for group, metrics in (("global_test", record.global_test), ("evaluate", record.evaluate), ("train", record.train)):
        for k, v in metrics.items():
            put(f"{group}/{k}", v)
    for sites in (record.sites_evaluate, record.sites_train):
        for site, metrics in sites.items():
            for k, v in metrics.items():
                if k == "dp-epsilon":
                    put(f"privacy/epsilon/{site}", v)
                elif k != "num-examples":
                    put(f"site/{site}/{k}", v)
    put("round/seconds", record.seconds)
    put("round/sites_trained", len(record.sites_train))
    put("round/failures", len(record.failures))
    return out


class Tracker:
    """A round observer writing each round's scalars to TensorBoard and/or MLflow."""

    def __init__(self, *, exp: ExperimentConfig, out_dir: Path) -> None:
        self.cfg = exp.tracking
        self.out_dir = Path(out_dir)
        self.writer: Any = None
        self.client: Any = None
        self.run_id: str | None = None
        if self.cfg.tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb_dir = self.out_dir / self.cfg.tensorboard  # an absolute folder stays itself
            self.writer = SummaryWriter(log_dir=str(self.tb_dir))
        if self.cfg.mlflow is not None:
            self._start_mlflow(exp)

    def _start_mlflow(self, exp: ExperimentConfig) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        local = self.cfg.mlflow == LOCAL
        folder = (self.out_dir / "mlflow").resolve()
        if local:
            folder.mkdir(parents=True, exist_ok=True)
        self.uri = f"sqlite:///{folder / 'mlflow.db'}" if local else str(self.cfg.mlflow)
        self.client = MlflowClient(tracking_uri=self.uri)
        name = self.cfg.mlflow_experiment or exp.name
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            exp_id = found.experiment_id
        else:
            exp_id = self.client.create_experiment(
                name, artifact_location=(folder / "artifacts").as_uri() if local else None
            )
        run = self.client.create_run(
            exp_id, run_name=self.out_dir.name, tags={"medflower.run_folder": str(self.out_dir)}
        )
        self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in sorted(flatten(exp.to_dict()).items())]
        for i in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    # -- observer ---------------------------------------------------------------------------------

    def round_started(self, server_round: int, num_rounds: int) -> None:
        pass

    def sites_done(self, server_round: int, stage: str, done: int, total: int) -> None:
        pass

    def round_ended(self, server_round: int, num_rounds: int, record: Any) -> None:
        scalars = round_scalars(record)
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, server_round)
            self.writer.flush()
        if self.client is not None and self.run_id is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [Metric(k, v, now, server_round) for k, v in scalars.items()]
            for i in range(0, len(metrics), 1000):
                self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    # -- end --------------------------------------------------------------------------------------

    def close(self, *, ok: bool) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.client is None or self.run_id is None:
            return
        if (self.out_dir / "summary.json").is_file():
            try:
                from medflower.report import write_report

                write_report(self.out_dir)
            except (OSError, ValueError, RuntimeError) as err:  # a report must never fail a run
                log(WARNING, "tracking: report.html not written (%s)", err)
        for name in ARTIFACTS:
            if (self.out_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.out_dir / name))
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


@contextmanager
def tracking_for(exp: ExperimentConfig, out_dir: Path) -> Iterator[Tracker | None]:
    """Track the run inside the ``with`` block (None and nothing done without a ``tracking:`` section)."""
    if not exp.tracking.enabled:
        yield None
        return
    require_extra(exp.tracking)
    tracker = Tracker(exp=exp, out_dir=Path(out_dir))
    ok = False
    try:
        with progress.observe(tracker):
            yield tracker
        ok = True
    finally:
        tracker.close(ok=ok)
