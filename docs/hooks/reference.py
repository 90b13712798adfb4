"""mkdocs hook: fill the generated parts of the pages at build time, from the code.

A page asks for a generated part with an HTML comment on a line of its own::

    <!-- generated: experiment-keys -->

and the hook replaces it before the page is rendered (the file in ``docs/`` keeps the marker, so
nothing generated is ever committed). An unknown name fails the build. The generators live in
:mod:`medflower.docgen`, where ``tests/test_docs.py`` checks them.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path

from mkdocs.exceptions import PluginError

log = logging.getLogger("mkdocs.hooks.reference")
_MARKER = re.compile(r"^<!--\s*generated:\s*([a-z0-9-]+)\s*-->[ \t]*$", re.M)
_ROOT: Path | None = None


def _experiment_keys() -> str:
    from medflower import docgen

    return docgen.experiment_keys_markdown()


def _strategy_table() -> str:
    from medflower import docgen
    from medflower.strategies.registry import METHODS

    return docgen.strategy_table_markdown(METHODS)


def _shift_presets() -> str:
    from medflower import docgen

    return docgen.shift_presets_markdown()


def _bench_sections() -> str:
    assert _ROOT is not None
    text = (_ROOT / "bench" / "RESULTS.md").read_text(encoding="utf-8")
    titles = re.findall(r"^## (.+)$", text, re.M)
    return "\n".join(f"* {title}" for title in titles) + "\n"


GENERATORS: dict[str, Callable[[], str]] = {
    "experiment-keys": _experiment_keys,
    "strategy-table": _strategy_table,
    "shift-presets": _shift_presets,
    "bench-sections": _bench_sections,
}


def on_config(config, **kwargs):
    """Import medflower from this checkout (not from another installed copy)."""
    global _ROOT
    _ROOT = Path(config.config_file_path).resolve().parent
    if str(_ROOT) not in sys.path[:1]:
        sys.path.insert(0, str(_ROOT))
    return config


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    def fill(match: re.Match) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise PluginError(f"{page.file.src_path}: unknown generated part {name!r}; known: {', '.join(GENERATORS)}")
        return GENERATORS[name]().rstrip("\n")

    return _MARKER.sub(fill, markdown)
