"""``tracking:`` — send a run's metrics to the tools researchers already use (optional).

Example (experiment YAML)::

    tracking:
      tensorboard: tb          # a folder; relative paths are under the run folder
      mlflow: local            # "local": a SQLite store under the run folder; or a tracking URI
      mlflow_experiment: null  # MLflow experiment name (default: the experiment's name)

Both need the ``tracking`` extra (``pip install -e ".[tracking]"``). What is logged, and where, is in
:mod:`medflower.server.tracking`. MLflow's own file store (``./mlruns``) is in maintenance mode from
MLflow 3 (it refuses to open unless ``MLFLOW_ALLOW_FILE_STORE=true``), hence a local SQLite file as
the default: one file under the run folder that ``mlflow ui --backend-store-uri sqlite:///...`` opens.
"""

from __future__ import annotations

from dataclasses import dataclass

from medflower.schema import ConfigError

BACKENDS = ("tensorboard", "mlflow")
LOCAL = "local"
# MLflow tracking URI schemes (its store registry); a path is written as file:///... or sqlite:///...
MLFLOW_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")


@dataclass(frozen=True)
class TrackingConfig:
    # TensorBoard event folder: scalars per round (aggregated and per site), epsilon per site, round
    # seconds; a relative folder is under the run folder
    tensorboard: str | None = None
    # MLflow tracking URI ("local": a SQLite store in <run folder>/mlflow/): params (the flattened
    # resolved config), metrics per round as steps, artifacts summary.json, report.html and model.pt
    mlflow: str | None = None
    # the MLflow experiment to log the run under (default: the experiment's name)
    mlflow_experiment: str | None = None

    def __post_init__(self) -> None:
        if self.tensorboard is not None and not self.tensorboard.strip():
            raise ConfigError("tracking.tensorboard: an empty folder name; give a folder or leave the key out")
        if self.mlflow is not None and self.mlflow != LOCAL:
            scheme = self.mlflow.split("://", 1)[0] if "://" in self.mlflow else ""
            if scheme.split("+", 1)[0] not in MLFLOW_SCHEMES:
                raise ConfigError(
                    f"tracking.mlflow: {self.mlflow!r} is not an MLflow tracking URI; valid: {LOCAL!r} or a URI "
                    f"with scheme {', '.join(MLFLOW_SCHEMES)} (e.g. sqlite:///path/mlflow.db, http://host:5000)"
                )

    @property
    def enabled(self) -> bool:
        return self.tensorboard is not None or self.mlflow is not None
