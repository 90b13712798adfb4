"""Looking at a finished run: ``medflower report`` (the HTML page) and ``medflower explain`` (saliency maps).

* ``report RUN_DIR [-o FILE]``: write ``RUN_DIR/report.html`` (``simulate`` and ``compare`` write it too);
* ``explain RUN_DIR [--site NAME] [-n 16] [-o DIR]``: saliency of the final global model on test images;
  ``explain --model model.pt --site-config site.yaml``: the same at a hospital, on its own data, locally.
"""

from __future__ import annotations

import argparse


def _report(args: argparse.Namespace) -> int:
    from medflower.report import write_report  # here, not at the top: it imports matplotlib (--help speed)

    path = write_report(args.run_dir, args.output)
    print(f"report: {path}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from medflower.explain import run_explain  # type: ignore[import-not-found]  # here: torch and MONAI

    result = run_explain(
        run_dir=args.run_dir,
        site=args.site,
        n=args.n,
        out_dir=args.output,
        model_path=args.model,
        site_config=args.site_config,
    )
    print(result.note)
    for p in result.paths:
        print(f"written: {p}")
    return 0


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
    p.set_defaults(func=_explain)
