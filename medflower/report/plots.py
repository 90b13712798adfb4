"""The report's figures, from ``summary.json`` alone: learning curves, the privacy ledger, a confusion matrix.

Each returns PNG bytes. ``matplotlib.figure.Figure`` directly, not ``pyplot``: no global figure
state and no GUI backend, so a report can be written from the ServerApp's thread.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

GLOBAL_METRICS = ("accuracy", "balanced-accuracy", "auc", "dice", "hd95", "loss")
SITE_METRICS = ("val-auc", "val-dice", "val-accuracy", "val-balanced-accuracy", "eval-loss")
UNITS = {"hd95": "voxels", "loss": "loss", "eval-loss": "loss", "train-loss": "loss"}


def png(fig: Figure, *, tight: bool = True) -> bytes:
    """PNG bytes; ``tight=False`` for a figure laid out by :func:`_grid_margins` (one draw, not two)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight" if tight else None)
    return buf.getvalue()


def _grid_margins(fig: Figure, *, nrows: int, ncols: int) -> None:
    """Fixed margins and gaps, in inches, for a grid of equal panels.

    Why not ``layout="constrained"`` and ``bbox_inches="tight"``: each measures every tick label, and
    together they drew the learning-curve grid three times; the report (part of every ``simulate``)
    took 0.8 s, 5 % of a short run (issue 11's engine bar). Panels of one size, with one-line titles and
    labels, need no measuring: these margins fit them at any grid size."""
    width, height = fig.get_size_inches()
    left, right, bottom, top, gap_w, gap_h = 0.75, 0.1, 0.55, 0.35, 0.95, 0.85
    panel_w = (width - left - right - (ncols - 1) * gap_w) / ncols
    panel_h = (height - bottom - top - (nrows - 1) * gap_h) / nrows
    fig.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        bottom=bottom / height,
        top=1 - top / height,
        wspace=gap_w / panel_w,
        hspace=gap_h / panel_h,
    )


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(rounds: Sequence[dict[str, Any]], get: Any) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rounds:
        v = get(r)
        if _finite(v):
            xs.append(int(r["round"]))
            ys.append(float(v))
    return xs, ys


def _axis(ax: Any, metric: str) -> None:
    ax.set_xlabel("round")
    ax.set_ylabel(f"{metric} ({UNITS.get(metric, 'fraction')})")
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def learning_curves(summary: dict[str, Any]) -> bytes | None:
    """Global test metrics per round; each site's validation metric; the training loss (aggregated and per site)."""
    rounds = summary.get("rounds") or []
    if not rounds:
        return None
    initial = summary.get("initial_global_test") or {}
    wanted = [m for m in GLOBAL_METRICS if any(_finite((r.get("global_test") or {}).get(m)) for r in rounds)]
    site_metric = next(
        (
            m
            for m in SITE_METRICS
            if any(_finite(s.get(m)) for r in rounds for s in (r.get("sites_evaluate") or {}).values())
        ),
        None,
    )
    panels = len(wanted) + (site_metric is not None) + 1
    ncols = min(3, panels)
    nrows = math.ceil(panels / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.3 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    _grid_margins(fig, nrows=nrows, ncols=ncols)
    i = 0
    for m in wanted:
        ax = axes[i]
        xs, ys = _series(rounds, lambda r, m=m: (r.get("global_test") or {}).get(m))
        if _finite(initial.get(m)):
            xs, ys = [0, *xs], [float(initial[m]), *ys]
        ax.plot(xs, ys, marker="o", ms=3, label="global model, test split")
        ax.set_title(f"global test {m}")
        _axis(ax, m)
        ax.legend(fontsize=8)
        i += 1
    sites = sorted({s for r in rounds for s in (r.get("sites_evaluate") or {})})
    if site_metric is not None:
        ax = axes[i]
        for site in sites:
            xs, ys = _series(rounds, lambda r, s=site: ((r.get("sites_evaluate") or {}).get(s) or {}).get(site_metric))
            ax.plot(xs, ys, marker=".", label=site)
        xs, ys = _series(rounds, lambda r: (r.get("evaluate") or {}).get(site_metric))
        ax.plot(xs, ys, "k--", lw=2, label="aggregated")
        ax.set_title(f"sites' validation {site_metric}")
        _axis(ax, site_metric)
        ax.legend(fontsize=7, ncol=2)
        i += 1
    ax = axes[i]
    for site in sorted({s for r in rounds for s in (r.get("sites_train") or {})}):
        xs, ys = _series(rounds, lambda r, s=site: ((r.get("sites_train") or {}).get(s) or {}).get("train-loss"))
        ax.plot(xs, ys, marker=".", alpha=0.7, label=site)
    xs, ys = _series(rounds, lambda r: (r.get("train") or {}).get("train-loss"))
    ax.plot(xs, ys, "k--", lw=2, label="aggregated")
    ax.set_title("training loss (last local epoch)")
    _axis(ax, "train-loss")
    ax.legend(fontsize=7, ncol=2)
    for ax in axes[i + 1 :]:
        ax.set_visible(False)
    return png(fig, tight=False)


def ledger_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """ε spent per site per round (sample-level DP) or the federation's (client-level DP), with budgets."""
    rows = []
    for r in summary.get("rounds") or []:
        for site, m in sorted((r.get("sites_train") or {}).items()):
            if _finite(m.get("dp-epsilon")):
                rows.append(
                    {
                        "round": r["round"],
                        "site": site,
                        "epsilon": m["dp-epsilon"],
                        "budget": m.get("dp-target-epsilon"),
                        "delta": m.get("dp-delta"),
                        "refused": bool(m.get("dp-budget-exhausted")),
                    }
                )
        train = r.get("train") or {}
        if _finite(train.get("dp-epsilon")) and not any(x["round"] == r["round"] for x in rows):
            rows.append(
                {
                    "round": r["round"],
                    "site": "federation (client-level DP)",
                    "epsilon": train["dp-epsilon"],
                    "budget": train.get("dp-target-epsilon"),
                    "delta": train.get("dp-delta"),
                    "refused": False,
                }
            )
    return rows


def ledger_plot(rows: Sequence[dict[str, Any]]) -> bytes | None:
    if not rows:
        return None
    fig = Figure(figsize=(6.5, 3.6), layout="constrained")
    ax = fig.subplots()
    for site in sorted({r["site"] for r in rows}):
        mine = [r for r in rows if r["site"] == site]
        (line,) = ax.plot([r["round"] for r in mine], [r["epsilon"] for r in mine], marker="o", ms=3, label=site)
        budgets = {r["budget"] for r in mine if _finite(r["budget"])}
        for b in budgets:
            ax.axhline(b, color=line.get_color(), ls=":", lw=1.2)
        refused = [r for r in mine if r["refused"]]
        if refused:
            ax.scatter(
                [r["round"] for r in refused], [r["epsilon"] for r in refused], marker="x", color="red", zorder=3
            )
    ax.set_title("privacy ledger: ε spent (dotted: each budget; ×: refused)")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("ε (cumulative)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png(fig)


def confusion_plot(matrix: np.ndarray, labels: Sequence[str]) -> bytes:
    """Rows: true class, columns: predicted; counts, with the row-normalised share as colour."""
    matrix = np.asarray(matrix, dtype=float)
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    n = len(labels)
    fig = Figure(figsize=(2.6 + 0.7 * n, 1.6 + 0.6 * n), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(
                j, i, f"{int(matrix[i, j])}", ha="center", va="center", color="white" if share[i, j] > 0.5 else "black"
            )
    ax.set_xticks(range(n), labels)
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("confusion matrix, global test split")
    fig.colorbar(im, ax=ax, label="share of the true class")
    return png(fig)
