"""``report.html``: one self-contained page per run folder (``medflower report RUN_DIR``).

Built from the folder's own files only: ``summary.json`` (a run), ``compare.json``/``compare.md``
(``medflower compare``), ``partition.json`` and its PNGs (``medflower partition``), a sweep's
``table.csv``/``table.md``/``runs.jsonl``, and any ``explain/*.png``. Images are PNGs inlined as
base64 data URIs and the page has no script, stylesheet or font to fetch, so it opens offline
and can be mailed as one file.
"""

from __future__ import annotations

from medflower.report.html import REPORT_FILE, build_report, write_report
from medflower.report.predictions import RunFolderError

__all__ = ["REPORT_FILE", "RunFolderError", "build_report", "write_report"]
