"""``medflower explain --model model.pt --site-config site.yaml``: saliency at a hospital, on its own data.

A hospital that received the global model runs this on its own machine: its test split is read by
the same code as its node (:func:`medflower.client.site.load_site_data`) and the maps are written to
a local folder. Nothing is sent anywhere.
"""

from __future__ import annotations

from pathlib import Path

from medflower.client.site import load_site_data
from medflower.config import ConfigError, ExperimentConfig, load_experiment
from medflower.explain import ExplainResult, explain_split
from medflower.report.predictions import SUMMARY_FILE, load_model, read_summary


def experiment_for(model_path: Path, experiment: str | Path | None) -> ExperimentConfig:
    """The experiment the model was trained in: ``--experiment``, else the summary.json beside the model."""
    if experiment is not None:
        return load_experiment(experiment)
    if (model_path.parent / SUMMARY_FILE).is_file():
        return ExperimentConfig.from_dict(read_summary(model_path.parent)["experiment"])
    raise ConfigError(
        f"{model_path}: the model's architecture comes from its experiment: pass --experiment EXPERIMENT.yaml "
        f"(no {SUMMARY_FILE} beside the model)"
    )


def explain_at_site(
    model_path: str | Path,
    site_config: str | Path,
    *,
    experiment: str | Path | None = None,
    n: int = 16,
    out_dir: str | Path | None = None,
) -> ExplainResult:
    model_path = Path(model_path)
    exp = experiment_for(model_path, experiment)
    site = load_site_data(site_config, exp)
    model = load_model(exp, model_path)
    out = Path(out_dir) if out_dir else Path("explain")
    return explain_split(model, exp, site.test, n=n, out_dir=out, title=f"site {site.name}, its own test split")
