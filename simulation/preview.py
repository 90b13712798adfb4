"""``medflower partition EXPERIMENT.yaml``: see the simulated hospitals before training anything.

Builds the sites exactly as a simulation would (:func:`medflower.simulation.sites.build_sites`), measures
them (:mod:`medflower.simulation.measure`), prints the tables and writes, under the output folder:

* ``partition.json`` — sizes, label histograms, intensity statistics, scanner parameters, site identifiability;
* ``labels.png`` — per site (one panel each), the count of each class in train/val/test;
* ``samples.png`` — per site (one row each), one reference image through that site's scanner, then
  some of the site's own images, all on the same grey scale so that intensity shifts show;
* ``intensity.png`` — per site (one panel each), its pixel-intensity histogram against the pooled one.

Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medflower.config import ExperimentConfig
from medflower.data import load_dataset
from medflower.device import resolve_device
from medflower.fileio import atomic_write_text
from medflower.simulation.measure import intensity_histograms, measure_shift
from medflower.simulation.shift import site_scanners, value_range
from medflower.simulation.sites import SPLITS, SiteData, build_sites

MAX_SITES_PLOTTED = 16


def json_ready(obj: Any) -> Any:
    """JSON has no NaN or numpy types: undefined metrics become null."""
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> Path:
    atomic_write_text(path, json.dumps(json_ready(obj), indent=2))
    return path


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table with aligned columns (readable in a terminal and in a .md file)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.3f}"
        return "-" if v is None else str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = lambda vs: "| " + " | ".join(v.ljust(w) for v, w in zip(vs, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def scanner_text(info: dict[str, Any]) -> str:
    params = info.get("scanner") or {}
    if not params:
        return "none"
    preset = info.get("preset", "custom")
    return f"{preset}: " + ", ".join(f"{k}={v}" for k, v in params.items())


def site_tables(measured: dict[str, Any]) -> str:
    """The printed report: sites (sizes, case mix, scanner), intensities, identifiability."""
    out = []
    labels = measured.get("labels") or {}
    rows = []
    for name, sz in measured["sizes"].items():
        info = measured["sites"].get(name, {})
        hist = labels.get(name, {}).get("train")
        mix = " ".join(f"{c}:{n}" for c, n in enumerate(hist)) if hist is not None else "-"
        group = ", ".join(f"{k}={v}" for k, v in (info.get("group") or {}).items()) or "-"
        rows.append([name, sz["train"], sz["val"], sz["test"], mix, group, scanner_text(info)])
    out.append(md_table(["site", "train", "val", "test", "train labels (class:count)", "group", "scanner"], rows))
    inten = measured.get("intensity", {})
    out.append(
        "\n"
        + md_table(
            ["site", "mean", "std", "p01", "p50", "p99", "per-image std"],
            [[n, v["mean"], v["std"], v["p01"], v["p50"], v["p99"], v["image_std"]] for n, v in inten.items()],
        )
    )
    ident = measured.get("identifiability")
    if ident:
        out.append(
            f"\nsite identifiability (small CNN predicting the site of held-out images): balanced accuracy "
            f"{ident.get('balanced_accuracy', math.nan):.3f}, chance {ident.get('chance', math.nan):.3f}"
            + (f" ({ident['n_train']} training / {ident['n_heldout']} held-out images)" if "n_train" in ident else "")
        )
        if "confusion" in ident:
            names = ident["sites"]
            out.append(
                md_table(
                    ["true \\ predicted", *names], [[n, *row] for n, row in zip(names, ident["confusion"], strict=True)]
                )
            )
    return "\n".join(out)


def _display(img: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, dict[str, Any]]:
    """An image ``(C, *spatial)`` as something imshow draws on the data set's fixed intensity scale."""
    if img.ndim == 4:  # 3D: middle slice of the last axis
        img = img[..., img.shape[-1] // 2]
    if img.shape[0] == 3:
        return np.clip((np.moveaxis(img, 0, -1) - lo) / (hi - lo), 0, 1), {}
    return img[0], {"cmap": "gray", "vmin": lo, "vmax": hi}


def _panel_grid(n: int, *, ncols: int = 4, size: tuple[float, float] = (3.6, 2.8)):
    import matplotlib.pyplot as plt  # here: see write_plots

    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def _title(site: SiteData) -> str:
    info = site.info
    extra = info.get("preset") or ("scanner: none" if not info.get("scanner") else "custom scanner")
    group = ", ".join(f"{v}" for v in (info.get("group") or {}).values())
    return f"{site.name} ({group + ', ' if group else ''}{extra})"


def plot_labels(
    sites: Sequence[SiteData], num_classes: int, path: Path, class_names: Sequence[str] | None = None
) -> Path:
    import matplotlib.pyplot as plt  # here: see write_plots

    sites = list(sites)[:MAX_SITES_PLOTTED]
    fig, axes = _panel_grid(len(sites))
    x = np.arange(num_classes)
    w = 0.27
    for ax, s in zip(axes, sites, strict=True):
        for k, (split, colour) in enumerate(zip(SPLITS, ("tab:blue", "tab:orange", "tab:green"), strict=True)):
            counts = np.bincount(s.split(split).targets.astype(np.int64), minlength=num_classes)[:num_classes]
            ax.bar(x + (k - 1) * w, counts, width=w, label=split, color=colour)
        ax.set_title(_title(s), fontsize=9)
        ax.set_xlabel("class")
        ax.set_ylabel("images")
        ax.set_xticks(x, list(class_names) if class_names else [str(c) for c in x])
        ax.legend(fontsize=7)
    fig.suptitle("Label histogram per site (train / val / test)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_samples(
    sites: Sequence[SiteData],
    reference: np.ndarray,
    scanners: Sequence[Any],
    path: Path,
    *,
    value_range: tuple[float, float],
    per_site: int = 6,
) -> Path:
    """Row per site: the same reference image through the site's scanner, then the site's own images."""
    import matplotlib.pyplot as plt  # here: see write_plots

    sites = list(sites)[:MAX_SITES_PLOTTED]
    lo, hi = value_range
    fig, axes = plt.subplots(
        len(sites), per_site + 1, figsize=(1.5 * (per_site + 1) + 1.6, 1.6 * len(sites) + 0.6), squeeze=False
    )
    for r, (s, scanner) in enumerate(zip(sites, scanners, strict=True)):
        ref = scanner.apply(reference[None], "test")[0]
        row = [ref] + [s.train.images[i] for i in range(min(per_site, len(s.train)))]
        for c in range(per_site + 1):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(row):
                img, kw = _display(row[c], lo, hi)
                ax.imshow(img, **kw)
                if c > 0 and s.train.targets.ndim == 1:
                    ax.set_xlabel(f"label {int(s.train.targets[c - 1])}", fontsize=7)
            else:
                ax.set_visible(False)
        axes[r, 0].set_ylabel(_title(s).replace(" (", "\n("), fontsize=7, rotation=0, ha="right", va="center")
    axes[0, 0].set_title("reference image\nthrough this scanner", fontsize=8)
    if per_site:
        axes[0, 1].set_title("the site's own images", fontsize=8, loc="left")
    fig.suptitle(f"Sample images per site (grey scale fixed to the data set's range {lo:.2f}..{hi:.2f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_intensity(sites: Sequence[SiteData], path: Path, bins: int = 50) -> Path:
    import matplotlib.pyplot as plt  # here: see write_plots

    sites = list(sites)
    edges, hists = intensity_histograms(sites, bins=bins)
    pooled = np.mean(list(hists.values()), axis=0)
    centres = (edges[:-1] + edges[1:]) / 2
    shown = sites[:MAX_SITES_PLOTTED]
    fig, axes = _panel_grid(len(shown))
    for ax, s in zip(axes, shown, strict=True):
        ax.fill_between(centres, hists[s.name], step="mid", alpha=0.6, label=s.name)
        ax.plot(centres, pooled, drawstyle="steps-mid", color="0.3", lw=1, label="all sites (mean)")
        ax.set_title(_title(s), fontsize=9)
        ax.set_xlabel("pixel intensity (data set units)")
        ax.set_ylabel("fraction of pixels")
        ax.legend(fontsize=7)
    fig.suptitle("Pixel-intensity histogram per site")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(exp: ExperimentConfig, sites: Sequence[SiteData], out_dir: Path) -> list[Path]:
    # matplotlib is imported in the plotting functions, not at the top: the headless backend must be
    # chosen before pyplot loads, and `--no-plots` never pays for it
    import matplotlib

    matplotlib.use("Agg")
    ds = load_dataset(exp)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if ds.task == "classification":
        paths.append(plot_labels(sites, ds.num_classes, out_dir / "labels.png"))
    scanners = site_scanners(exp, ds, [s.name for s in sites])
    source = ds.test if len(ds.test) else ds.train
    paths.append(
        plot_samples(
            sites, source.images[0], scanners, out_dir / "samples.png", value_range=value_range(ds.train.images)
        )
    )
    paths.append(plot_intensity(sites, out_dir / "intensity.png"))
    return paths


def preview(
    exp: ExperimentConfig, out_dir: str | Path, *, identifiability: bool = True, plots: bool = True
) -> dict[str, Any]:
    """Build, measure, print and plot the experiment's sites; returns what ``partition.json`` holds."""
    torch.set_num_threads(max(1, exp.train.num_threads))  # as `compare` does: same identifiability numbers
    # before any work: the identifiability classifier runs on train.device (medflower/device.py)
    device = resolve_device(exp.train.device) if identifiability else None
    out_dir = Path(out_dir)
    ds = load_dataset(exp)
    sites = build_sites(exp)
    measured = measure_shift(
        sites,
        num_classes=ds.num_classes if ds.task == "classification" else None,
        seed=exp.seed,
        identifiability=identifiability,
        device=device,
    )
    total = {n: len(ds.split(n)) for n in SPLITS}
    placed = {n: sum(len(s.split(n)) for s in sites) for n in SPLITS}
    result = {
        "experiment": exp.to_dict(),
        "dataset": {"name": ds.name, "synthetic": ds.synthetic, "sizes": total, "placed": placed},
        **measured,
    }
    print(
        f"data set {ds.name}{' (SYNTHETIC)' if ds.synthetic else ''}: "
        + ", ".join(f"{n} {placed[n]}/{total[n]}" for n in SPLITS)
        + " images placed in "
        + f"{len(sites)} sites ({exp.partition.kind} partition"
        + (f", quantity {exp.partition.quantity}" if exp.partition.quantity != "none" else "")
        + ")\n"
    )
    print(site_tables(measured))
    out_dir.mkdir(parents=True, exist_ok=True)
    if plots:
        result["plots"] = [p.name for p in write_plots(exp, sites, out_dir)]
    write_json(out_dir / "partition.json", result)
    print(f"\nwritten: {out_dir / 'partition.json'}" + "".join(f", {out_dir / p}" for p in result.get("plots", [])))
    return result
