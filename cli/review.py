"""Looking at a finished run: ``medflower report`` (the HTML page) and ``medflower explain`` (saliency maps).

* ``report RUN_DIR [-o FILE]``: write ``RUN_DIR/report.html`` (``simulate`` and ``compare`` write it too);
* ``explain RUN_DIR [--site NAME] [-n 16] [-o DIR]``: saliency of the final global model on test images;
  ``explain --model model.pt --site-config site.yaml``: the same at a hospital, on its own data, locally.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _report(args: argparse.Namespace) -> int:
    from medflower.report import write_report  # here, not at the top: it imports matplotlib (--help speed)

    path = write_report(args.run_dir, args.output)
    print(f"report: {path}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from medflower.schema import ConfigError  # light; the rest (torch and MONAI) below, per branch

    if args.model or args.site_config:
        if not (args.model and args.site_config):
            raise ConfigError("explain: --model and --site-config go together (a hospital's own model and data)")
        from medflower.client.explain import explain_at_site

        result = explain_at_site(
            args.model, args.site_config, experiment=args.experiment, n=args.n, out_dir=args.output
        )
    elif not args.run_dir:
        raise ConfigError("explain: give a run folder (RUN_DIR), or --model and --site-config")
    else:
        from medflower.explain import explain_run

        split, what = None, "test split"
        if args.site:
            split, what = _site_test(args.run_dir, args.site), f"{args.site}'s test split"
        result = explain_run(args.run_dir, split=split, n=args.n, out_dir=args.output, what=what)
    print(result.note)
    for p in result.paths:
        print(f"written: {p}")
    return 0


def _site_test(run_dir: str, site: str) -> Any:
    """A simulated site's test split, rebuilt as the run built it (partition and scanner shift)."""
    from medflower.config import ExperimentConfig
    from medflower.report.predictions import read_summary
    from medflower.simulation.sites import build_sites

    exp = ExperimentConfig.from_dict(read_summary(Path(run_dir))["experiment"])
    sites = {s.name: s for s in build_sites(exp)}
    if site not in sites:
        raise ValueError(f"--site: no site {site!r} in this run; its sites are {', '.join(sorted(sites))}")
    return sites[site].test


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``report`` and ``explain``."""
    p = sub.add_parser(
        "report",
        help="write a run folder's self-contained HTML report",
        description="Write one self-contained HTML file (images inline, nothing fetched) from a run folder's "
        "summary.json, and compare.json, partition.json or a sweep's tables when present.",
    )
    p.add_argument("run_dir", help="a run folder (medflower simulate/compare/partition/sweep output)")
    p.add_argument("--output", "-o", help="the HTML file (default: RUN_DIR/report.html)")
    p.set_defaults(func=_report)

    p = sub.add_parser(
        "explain",
        help="saliency maps of the final global model on test images",
        description="Grad-CAM (CNNs) or occlusion sensitivity (ViT) of the final global model on test images, "
        "as a PNG grid: image, overlay, label, prediction and its probability. A segmentation model gets "
        "prediction overlays instead. At a hospital: --model model.pt --site-config site.yaml runs locally "
        "on the site's own test split; nothing is sent anywhere.",
    )
    p.add_argument("run_dir", nargs="?", help="a run folder holding summary.json and model.pt")
    p.add_argument("--site", help="a simulated site's test split (default: the data set's test split)")
    p.add_argument("-n", type=int, default=16, help="test images to explain (default 16)")
    p.add_argument("--output", "-o", help="output folder (default: RUN_DIR/explain, or ./explain)")
    p.add_argument("--model", help="a global model's state dict (model.pt), with --site-config")
    p.add_argument("--site-config", help="a hospital's site YAML, with --model")
    p.add_argument("--experiment", help="with --model: the experiment YAML (default: summary.json beside the model)")
    p.set_defaults(func=_explain)
