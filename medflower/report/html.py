"""The HTML page of :mod:`medflower.report`: sections assembled from whatever the run folder holds."""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from medflower.fileio import atomic_write_text
from medflower.report import plots
from medflower.report.predictions import MODEL_FILE, SUMMARY_FILE, RunFolderError, read_summary

REPORT_FILE = "report.html"
SOURCES = (SUMMARY_FILE, "compare.json", "partition.json", "table.csv", "table.md", "runs.jsonl")
PARTITION_PLOTS = ("labels.png", "samples.png", "intensity.png")

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;
color:#1d2330;background:#fff}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #d8dde6;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #c9ced8;padding:.25em .6em;
text-align:right}th{background:#eef1f6}td.l,th.l{text-align:left}img{max-width:100%;height:auto}
pre{background:#f5f6f8;padding:.8em;overflow-x:auto;font-size:.8em}.warn{color:#8a4b00}.muted{color:#666}
.metrics td{font-size:1.05em}
"""


def esc(value: Any) -> str:
    return html.escape(str(value))


def fmt(value: Any) -> str:
    """Metrics with four decimals (the same text a test or a reader finds in summary.json, rounded)."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.0e}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"  # δ = 1e-05, not 0.0000
    return esc(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, left: int = 1, cls: str = "") -> str:
    """An HTML table; the first ``left`` columns are text (left-aligned), the rest numbers."""
    head = "".join(f'<th class="{"l" if i < left else ""}">{esc(h)}</th>' for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{fmt(v)}</td>' for i, v in enumerate(r)) + "</tr>"
        for r in rows
    )
    thead = f"<thead><tr>{head}</tr></thead>" if any(headers) else ""
    return f'<table class="{cls}">{thead}<tbody>{body}</tbody></table>'


def image(data: bytes | None, alt: str) -> str:
    if not data:
        return ""
    return f'<p><img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}"></p>'


def markdown(text: str) -> str:
    """The subset of Markdown medflower's own ``.md`` outputs use: headings, pipe tables, paragraphs."""
    out: list[str] = []
    rows: list[list[str]] = []

    def flush() -> None:
        if rows:
            body = [r for r in rows[1:] if not all(set(c.strip()) <= set("-: ") for c in r)]
            out.append(table(rows[0], body))
            rows.clear()

    for line in text.splitlines():
        s = line.strip()
        if s.startswith("|"):
            rows.append([c.strip() for c in s.strip("|").split("|")])
            continue
        flush()
        if s.startswith("#"):
            level = min(6, len(s) - len(s.lstrip("#")) + 2)
            out.append(f"<h{level}>{esc(s.lstrip('#').strip())}</h{level}>")
        elif s:
            out.append(f"<p>{esc(s)}</p>")
    flush()
    return "\n".join(out)


# -- sections from summary.json ----------------------------------------------------------------------


def warnings_of(summary: dict[str, Any]) -> list[str]:
    """What went wrong or was unusual, round by round (the log's warnings, recovered from the record)."""
    out = [str(w) for w in summary.get("warnings") or []]
    rounds = summary.get("rounds") or []
    for r in rounds:
        n = r["round"]
        for f in r.get("failures") or []:
            out.append(f"round {n}: {f.get('site')} failed in training: {str(f.get('reason', '')).splitlines()[0]}")
        for f in r.get("evaluate_failures") or []:
            out.append(f"round {n}: {f.get('site')} failed in evaluation: {str(f.get('reason', '')).splitlines()[0]}")
        for f in r.get("refusals") or []:
            out.append(f"round {n}: {f.get('site')} refused {f.get('what', 'training')}: {f.get('reason')}")
        if not r.get("aggregated", True):
            out.append(f"round {n}: nothing aggregated; the global model stayed as it was")
    for f in summary.get("sites_test_refusals") or []:
        out.append(f"final test: {f.get('site')} refused: {f.get('reason')}")
    planned = ((summary.get("experiment") or {}).get("train") or {}).get("rounds")
    if rounds and isinstance(planned, int) and rounds[-1]["round"] < planned:
        out.append(f"the run stopped after round {rounds[-1]['round']} of {planned}")
    return out


def overview(summary: dict[str, Any], run_dir: Path) -> str:
    exp = summary.get("experiment") or {}
    facts = [
        ("experiment", exp.get("name")),
        ("task", exp.get("task")),
        ("data", (exp.get("data") or {}).get("kind")),
        ("sites", (exp.get("partition") or {}).get("num_sites")),
        ("model", (exp.get("model") or {}).get("name")),
        ("strategy", (exp.get("strategy") or {}).get("name")),
        ("privacy", (exp.get("privacy") or {}).get("mode")),
        ("rounds run", len(summary.get("rounds") or [])),
        ("wall time (s)", summary.get("wall_seconds")),
        ("run folder", str(run_dir)),
    ]
    parts = [table(["", ""], [(k, v) for k, v in facts if v is not None], left=2)]
    final = summary.get("final_global_test") or {}
    if final:
        metrics = [m for m in final if not isinstance(final[m], (list, dict))]
        rows = [("final round", *[final.get(m) for m in metrics])]
        chosen = summary.get("selected_global_test") or {}
        if chosen:
            rows.append((f"selected round {summary.get('selected_round')}", *[chosen.get(m) for m in metrics]))
        initial = summary.get("initial_global_test") or {}
        if initial:
            rows.append(("initial model", *[initial.get(m) for m in metrics]))
        parts.append("<h3>Global model on the held-out test split</h3>")
        parts.append(table(["", *metrics], rows, cls="metrics"))
        parts.append(
            '<p class="muted">The selected round is the one the sites\' own validation liked best '
            "(never chosen on the test split).</p>"
        )
    return "\n".join(parts)


def site_table(summary: dict[str, Any]) -> str:
    sites = summary.get("sites_test") or {}
    if not sites:
        return '<p class="muted">No site reported a final test evaluation.</p>'
    cols = sorted({k for m in sites.values() for k in m if k != "num-examples"})
    rows = [(name, m.get("num-examples"), *[m.get(c) for c in cols]) for name, m in sorted(sites.items())]
    return table(["site", "test images", *cols], [(r[0], _int(r[1]), *r[2:]) for r in rows])


def _int(v: Any) -> Any:
    return int(v) if isinstance(v, float) and math.isfinite(v) else v


def rounds_table(summary: dict[str, Any]) -> str:
    rows = []
    for r in summary.get("rounds") or []:
        failed = ", ".join(sorted({str(f.get("site")) for f in (r.get("failures") or [])})) or "-"
        refused = ", ".join(sorted({str(f.get("site")) for f in (r.get("refusals") or [])})) or "-"
        rows.append(
            (
                r["round"],
                r.get("sites_asked"),
                len(r.get("sites_train") or {}),
                failed,
                refused,
                "yes" if r.get("aggregated", True) else "no",
                (r.get("train") or {}).get("train-loss"),
                r.get("seconds"),
            )
        )
    headers = [
        "round",
        "sites asked",
        "sites trained",
        "failed / dropped",
        "refused",
        "aggregated",
        "train loss",
        "seconds",
    ]
    return table(headers, rows, left=0)


def ledger(summary: dict[str, Any]) -> str:
    rows = plots.ledger_rows(summary)
    if not rows:
        return ""
    last: dict[str, dict[str, Any]] = {}
    refusals: dict[str, int] = {}
    for r in rows:
        last[r["site"]] = r
        refusals[r["site"]] = refusals.get(r["site"], 0) + int(r["refused"])
    body = [
        (site, r["epsilon"], r["budget"], r["delta"], r["round"], refusals[site]) for site, r in sorted(last.items())
    ]
    return "\n".join(
        [
            "<h2>Privacy ledger</h2>",
            image(plots.ledger_plot(rows), "epsilon spent per site per round"),
            table(["site", "ε spent", "ε budget", "δ", "last round", "rounds refused"], body),
        ]
    )


def predictions(summary: dict[str, Any], run_dir: Path) -> str:
    """The confusion matrix (classification) or truth/prediction overlays (segmentation)."""
    from medflower.report.predictions import confusion_matrix, load_run, segmentation_overlays

    task = (summary.get("experiment") or {}).get("task", "classification")
    given = (summary.get("final_global_test") or {}).get("confusion-matrix")
    if task == "classification" and given:
        m = np.asarray(given)
        return "<h2>Confusion matrix</h2>" + image(
            plots.confusion_plot(m, [str(i) for i in range(len(m))]), "confusion"
        )
    if not (run_dir / MODEL_FILE).is_file():
        return ""
    try:
        run = load_run(run_dir)
        if task == "segmentation":
            from medflower.data import load_dataset

            pic = segmentation_overlays(run, load_dataset(run.exp).test)
            return (
                "<h2>Test images: truth and prediction</h2>"
                "<p class=\"muted\">Green: the true mask's outline; red: the final global model's prediction.</p>"
                + image(pic, "segmentation overlays")
            )
        matrix, labels = confusion_matrix(run)
        return "<h2>Confusion matrix</h2>" + image(plots.confusion_plot(matrix, labels), "confusion matrix")
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        return f'<h2>Predictions</h2><p class="warn">Could not evaluate {MODEL_FILE}: {esc(err)}</p>'


def summary_sections(summary: dict[str, Any], run_dir: Path) -> list[str]:
    warns = warnings_of(summary)
    config = yaml.safe_dump(
        {k: v for k, v in (summary.get("experiment") or {}).items() if k != "base_dir"}, sort_keys=False
    )
    return [
        "<h2>Run</h2>",
        overview(summary, run_dir),
        "<h2>Warnings</h2>",
        "<ul>" + "".join(f'<li class="warn">{esc(w)}</li>' for w in warns) + "</ul>"
        if warns
        else '<p class="muted">None: every site answered every round and every round aggregated.</p>',
        "<h2>Learning curves</h2>",
        image(plots.learning_curves(summary), "learning curves") or '<p class="muted">No rounds recorded.</p>',
        "<h2>Sites: final test metrics</h2>",
        site_table(summary),
        "<h2>Rounds: participation, failures and dropped sites</h2>",
        rounds_table(summary),
        ledger(summary),
        predictions(summary, run_dir),
        "<h2>Resolved configuration</h2>",
        f"<pre>{esc(config)}</pre>",
    ]


# -- sections from the other tools' files ------------------------------------------------------------


def read_png(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def partition_sections(run_dir: Path) -> list[str]:
    if not (run_dir / "partition.json").is_file():
        return []
    found = [(p, read_png(run_dir / p)) for p in PARTITION_PLOTS]
    return ["<h2>Partition: label mix and scanner shift</h2>"] + [image(data, p) for p, data in found if data]


def compare_sections(run_dir: Path) -> list[str]:
    if not (run_dir / "compare.json").is_file():
        return []
    out = [
        "<h2>Comparison: pooled, local-only and federated</h2>",
        image(read_png(run_dir / "compare.png"), "heat map"),
    ]
    md = run_dir / "compare.md"
    if md.is_file():
        out.append(markdown(md.read_text(encoding="utf-8")))
    return out


def sweep_sections(run_dir: Path) -> list[str]:
    out = []
    csv_path, md_path, runs = run_dir / "table.csv", run_dir / "table.md", run_dir / "runs.jsonl"
    if csv_path.is_file():
        with csv_path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
        if rows:
            out += ["<h2>Sweep</h2>", table(rows[0], [[_number(c) for c in r] for r in rows[1:]])]
    elif md_path.is_file():
        out += ["<h2>Sweep</h2>", markdown(md_path.read_text(encoding="utf-8"))]
    if runs.is_file():
        n = sum(1 for line in runs.read_text(encoding="utf-8").splitlines() if line.strip())
        out.append(f'<p class="muted">{n} runs recorded in runs.jsonl.</p>')
    return out


def _number(cell: str) -> Any:
    try:
        return float(cell) if any(ch in cell for ch in ".eE") else int(cell)
    except ValueError:
        return cell


def explain_sections(run_dir: Path) -> list[str]:
    folder = run_dir / "explain"
    pngs = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if not pngs:
        return []
    out = ["<h2>Saliency of the final global model (medflower explain)</h2>"]
    meta = folder / "explain.json"
    if meta.is_file():
        out.append(f"<p>{esc(json.loads(meta.read_text(encoding='utf-8')).get('note', ''))}</p>")
    return out + [image(p.read_bytes(), p.name) for p in pngs]


def build_report(run_dir: str | Path) -> str:
    """The report's HTML for ``run_dir``; :class:`RunFolderError` when it holds none of the known files."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: no such folder")
    if not any((run_dir / s).is_file() for s in SOURCES):
        raise RunFolderError(
            f"{run_dir}: no {SUMMARY_FILE} in this folder (nor compare.json, partition.json or a sweep's table); "
            "is it a medflower run folder?"
        )
    title = run_dir.name
    body: list[str] = []
    if (run_dir / SUMMARY_FILE).is_file():
        summary = read_summary(run_dir)
        title = str((summary.get("experiment") or {}).get("name") or title)
        body += summary_sections(summary, run_dir)
    body += compare_sections(run_dir) + partition_sections(run_dir) + sweep_sections(run_dir)
    body += explain_sections(run_dir)
    fed = run_dir / "federated" / SUMMARY_FILE
    if fed.is_file():
        body.append('<h2>The federated run</h2><p class="muted">From federated/summary.json.</p>')
        body += summary_sections(read_summary(fed.parent), fed.parent)[2:]
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>medflower report: {esc(title)}</title>'
        f"<style>{STYLE}</style></head><body>\n<h1>medflower report: {esc(title)}</h1>\n" + "\n".join(body) + "\n"
        '<p class="muted">Written by <code>medflower report</code>; everything on this page is inline.</p>'
        "</body></html>\n"
    )


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write ``run_dir/report.html`` (or ``output``); returns its path."""
    path = Path(output) if output else Path(run_dir) / REPORT_FILE
    text = build_report(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path
